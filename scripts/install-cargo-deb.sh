#!/bin/sh
# Installs cargo-deb (for `make deb`) with `cargo install --locked` when `cargo deb` is missing.
# Building it takes about two minutes on two cores; it is not needed by `make build` or the
# Rust tests, only by `make deb` and scripts/test-packaging.sh.
set -eu

# The version `make deb` was checked with; any installed cargo-deb is used as it is.
version="${CARGO_DEB_VERSION:-3.8.0}"
cargo="${CARGO:-cargo}"

if "$cargo" deb --version >/dev/null 2>&1; then
    exit 0
fi
echo "install-cargo-deb: installing cargo-deb $version (cargo install --locked, about 2 minutes)"
"$cargo" install cargo-deb --locked --version "$version"
