#!/usr/bin/env bash
# How long `pinkeeper inventory` takes to list the image names of ~1 GiB archives, against the
# plain tool pipeline (`zstd -dc FILE | tar -t`, `gzip -dc FILE | tar -t`), and its peak memory.
# The numbers in README.md's "Performance" section come from this script.
#
#   scripts/bench-inventory.sh
#   scripts/bench-inventory.sh hostile     the hostile directories of issue 9 instead (below)
#
# Slow, and not part of `make test`: the first run generates the archives (about 6 GiB, a few
# minutes) into $PINKEEPER_BENCH_DIR (default /tmp/pinkeeper-bench) and reuses them afterwards;
# each run then takes about five minutes. Settings (see benches/inventory.rs):
# PINKEEPER_BENCH_RUNS (5), PINKEEPER_BENCH_ONLY (a case name part), PINKEEPER_BENCH_MIB (1024).
#
# Needs zstd, gzip, tar and GNU time (`/usr/bin/time`, Debian package `time`, for the peak
# memory); with hyperfine installed (Debian package `hyperfine`) it also cross-checks the
# headline cases with it.
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in zstd gzip tar; do
    command -v "$tool" >/dev/null || { echo "bench-inventory: needs $tool" >&2; exit 1; }
done
[ -x /usr/bin/time ] || echo "bench-inventory: no /usr/bin/time (apt-get install time): peak memory not measured" >&2

cargo build --release --bin pinkeeper
pinkeeper="$PWD/target/release/pinkeeper"

if [ "${1:-}" = hostile ]; then
    # A 4.2 MB pull list of 100,000 names, one of 100,000 lines naming 1,000 images, a
    # manifest.json of 450,000 RepoTags, 100,000 empty .tar files: time and peak RSS of
    # `pinkeeper inventory` on each, then what a daemon would keep of the junk (the bench's
    # `retained`: a scan, the ledger's cache changes, the problem report, a malloc_trim).
    dir="${PINKEEPER_BENCH_DIR:-/tmp/pinkeeper-bench}/hostile"
    [ -d "$dir/junk" ] || cargo bench -q --bench inventory -- hostile "$dir"
    for case in list list-dup manifest junk; do
        /usr/bin/time -f "$case: %e s, peak RSS %M KiB" "$pinkeeper" inventory --images-dir "$dir/$case" >/dev/null
    done
    cargo bench -q --bench inventory -- retained "$dir/junk"
    exit 0
fi
if "$pinkeeper" inventory --help >/dev/null 2>&1; then
    # Time the real command; without it the bench times its own Scanner::scan() executable.
    export PINKEEPER_BENCH_CMD="$pinkeeper inventory --images-dir"
fi

cargo bench --bench inventory

if command -v hyperfine >/dev/null && [ -n "${PINKEEPER_BENCH_CMD:-}" ]; then
    dir=$(cargo bench -q --bench inventory -- generate)
    for case in docker-save-tar-zst docker-save-tar-gz oci-tar-zst oci-tar-gz; do
        [[ $case == *"${PINKEEPER_BENCH_ONLY:-}"* ]] || continue
        file=$(echo "$dir/$case"/airgap-images.*)
        case $file in
        *.zst) decompress=zstd ;;
        *) decompress=gzip ;;
        esac
        hyperfine --warmup 1 --runs "${PINKEEPER_BENCH_RUNS:-5}" \
            --command-name "pinkeeper inventory ($case)" "$PINKEEPER_BENCH_CMD $dir/$case" \
            --command-name "$decompress -dc | tar -t ($case)" "$decompress -dc '$file' | tar -t >/dev/null"
    done
fi
