# pinkeeper: the two commands of the README, and their parts.
#   make demo   install what is missing, build, and play a K3s restart against a private containerd
#   make test   install what is missing, then fmt check, clippy -D warnings, and every test
SHELL := /bin/bash
CARGO ?= cargo
PREFIX ?= /usr/local

.PHONY: all deps build demo test fmt-check clippy unit-tests

all: build

# apt packages (protoc, containerd 1.6, compressors) and the unpacked containerd 1.7 / 2.x.
deps:
	@scripts/install-deps.sh

build: deps
	$(CARGO) build --release --workspace --bins

demo: build
	target/release/pinkeeper-demo --pinkeeper target/release/pinkeeper

fmt-check:
	$(CARGO) fmt --all -- --check

clippy: deps
	$(CARGO) clippy --workspace --all-targets -- -D warnings

unit-tests: deps
	$(CARGO) test --workspace

test: deps fmt-check clippy unit-tests
