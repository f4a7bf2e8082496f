# pinkeeper: the two commands of the README, and their parts.
#   make demo   install what is missing, build, and play a K3s restart against a private containerd
#   make test   install what is missing, then fmt check, clippy -D warnings, and every test
#   make install [DESTDIR=...] [PREFIX=/usr/local]   the binary, the systemd unit and drop-ins,
#               and /etc/pinkeeper/config.toml.example
#   make deb    a Debian package (cargo-deb), in target/debian/
#   make simulate [SEEDS=N] [FROM=S] | [SEED=S]   the deterministic simulation (sim/): N seeds
#               from S, or one seed with its story
SHELL := /bin/bash
CARGO ?= cargo
PREFIX ?= /usr/local
BINDIR ?= $(PREFIX)/bin
# systemd reads units from /usr/local/lib/systemd/system and /usr/lib/systemd/system; for
# another PREFIX, set UNITDIR=/etc/systemd/system.
UNITDIR ?= $(PREFIX)/lib/systemd/system
# Not under PREFIX: the daemon reads /etc/pinkeeper/config.toml, and K3s's and RKE2's units are
# extended by the administrator's drop-ins in /etc/systemd/system/<unit>.d/.
CONFDIR := /etc/pinkeeper
DROPINDIR := /etc/systemd/system
DROPIN_UNITS := k3s k3s-agent rke2-server rke2-agent
TARGET_DIR ?= $(or $(CARGO_TARGET_DIR),target)

.PHONY: all deps build demo image test fmt-check clippy unit-tests packaging-test install uninstall \
	deb cargo-deb simulate

all: build

# apt packages (protoc, containerd 1.6, compressors) and the unpacked containerd 1.7 / 2.x.
deps:
	@scripts/install-deps.sh

build: deps
	$(CARGO) build --release --workspace --bins

demo: build
	target/release/pinkeeper-demo --pinkeeper target/release/pinkeeper

# pinkeeper's own image, offline (scripts/make-image.py): target/image/pinkeeper-VERSION-amd64.tar
# and .tar.zst, for K3s's images directory on an air-gapped node.
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
image: build
	python3 scripts/make-image.py $(TARGET_DIR)/release/pinkeeper $(TARGET_DIR)/image $(VERSION) \
		$$(git rev-parse HEAD 2>/dev/null || echo unknown)

fmt-check:
	$(CARGO) fmt --all -- --check

clippy: deps
	$(CARGO) clippy --workspace --all-targets -- -D warnings

unit-tests: deps
	$(CARGO) test --workspace

# `make test` plays 10,000 seeds (sim/tests/seeds.rs); this plays as many as asked, in release,
# stops at the first broken invariant and prints its story and the command that replays it.
SEEDS ?= 100000
FROM ?= 0
simulate: deps
	$(CARGO) run --release -p pinkeeper-sim -- \
		$(if $(SEED),--seed $(SEED),--seeds $(SEEDS) --from $(FROM))

# The unit (systemd-analyze verify and security), `make install` into a temp dir, `make deb`.
packaging-test: deps
	@scripts/test-packaging.sh

test: deps fmt-check clippy unit-tests packaging-test
	/var/cache/pinkeeper/python/bin/python scripts/check-daemonset.py

# ExecStart in the unit names /usr/bin/pinkeeper (the .deb's path): rewritten to $(BINDIR).
# The example config replaces the previous example; /etc/pinkeeper/config.toml is never written.
install: build
	install -d -m 0755 $(DESTDIR)$(BINDIR) $(DESTDIR)$(UNITDIR) $(DESTDIR)$(CONFDIR)
	install -m 0755 $(TARGET_DIR)/release/pinkeeper $(DESTDIR)$(BINDIR)/pinkeeper
	sed 's|^ExecStart=/usr/bin/pinkeeper |ExecStart=$(BINDIR)/pinkeeper |' \
		packaging/systemd/pinkeeper.service > $(DESTDIR)$(UNITDIR)/pinkeeper.service.tmp
	chmod 0644 $(DESTDIR)$(UNITDIR)/pinkeeper.service.tmp
	mv -f $(DESTDIR)$(UNITDIR)/pinkeeper.service.tmp $(DESTDIR)$(UNITDIR)/pinkeeper.service
	for unit in $(DROPIN_UNITS); do \
		install -D -m 0644 packaging/systemd/$$unit.service.d/10-pinkeeper.conf \
			$(DESTDIR)$(DROPINDIR)/$$unit.service.d/10-pinkeeper.conf || exit 1; \
	done
	install -m 0644 packaging/config.toml $(DESTDIR)$(CONFDIR)/config.toml.example
	@if [ -z "$(DESTDIR)" ]; then \
		echo "installed; now: systemctl daemon-reload && systemctl enable --now pinkeeper.service"; \
	fi

# Leaves /etc/pinkeeper/config.toml and the ledger (/var/lib/pinkeeper) alone.
uninstall:
	rm -f $(DESTDIR)$(BINDIR)/pinkeeper $(DESTDIR)$(UNITDIR)/pinkeeper.service \
		$(DESTDIR)$(CONFDIR)/config.toml.example
	for unit in $(DROPIN_UNITS); do \
		rm -f $(DESTDIR)$(DROPINDIR)/$$unit.service.d/10-pinkeeper.conf; \
		rmdir $(DESTDIR)$(DROPINDIR)/$$unit.service.d 2>/dev/null || true; \
	done

cargo-deb:
	@CARGO="$(CARGO)" scripts/install-cargo-deb.sh

# Packages the release binary `build` made ([package.metadata.deb] in Cargo.toml).
deb: build cargo-deb
	$(CARGO) deb --no-build
