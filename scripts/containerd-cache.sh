#!/bin/sh
# Downloads containerd 1.7 (Debian trixie) and 2.x (Debian forky) .debs and unpacks them into a
# cache dir, WITHOUT installing them: the integration tests run these binaries directly
# (FACTS.md 3a: they run unpacked on bookworm). The host's apt state is not touched: a separate
# sources list, package lists and archive cache live under the cache dir.
#
# Idempotent: does nothing when both binaries are already unpacked.
# Env: PINKEEPER_CONTAINERD_CACHE (default /var/cache/pinkeeper/containerd).
set -eu

CACHE="${PINKEEPER_CONTAINERD_CACHE:-/var/cache/pinkeeper/containerd}"

if [ -x "$CACHE/1.7/usr/bin/containerd" ] && [ -x "$CACHE/2.x/usr/bin/containerd" ]; then
    echo "containerd-cache: 1.7 and 2.x already in $CACHE"
    exit 0
fi

mkdir -p "$CACHE/lists/partial" "$CACHE/apt-cache/archives/partial" "$CACHE/debs"
cat > "$CACHE/sources.list" <<SRC
deb http://deb.debian.org/debian trixie main
deb http://deb.debian.org/debian forky main
SRC

# Keep the host's apt state out of it; run as root without the _apt sandbox warnings. forky is
# testing: its InRelease carries a Valid-Until a week ahead, which a frozen or lagging mirror (or
# a fast clock) lets expire; the signature is still checked, and these .debs are only unpacked.
apt_opts() {
    tool="$1"
    shift
    "$tool" \
        -o "Dir::Etc::SourceList=$CACHE/sources.list" \
        -o "Dir::Etc::SourceParts=/dev/null" \
        -o "Dir::Etc::Preferences=/dev/null" \
        -o "Dir::Etc::PreferencesParts=/dev/null" \
        -o "Dir::State::Lists=$CACHE/lists" \
        -o "Dir::Cache=$CACHE/apt-cache" \
        -o "APT::Sandbox::User=root" \
        -o "Acquire::Check-Valid-Until=false" \
        "$@"
}

echo "containerd-cache: fetching trixie and forky package lists into $CACHE/lists"
apt_opts apt-get -qq update

# `apt-cache madison` prints "containerd | VERSION | URL SUITE/main amd64 Packages".
versions="$(apt_opts apt-cache madison containerd)"
pick() { # $1 = suite, $2 = version prefix
    printf '%s\n' "$versions" | awk -F' [|] ' -v s=" $1/" -v p="$2" \
        'index($3, s) && index($2, p) == 1 { print $2; exit }'
}
v17="$(pick trixie 1.7.)"
v2="$(pick forky 2.)"
if [ -z "$v17" ] || [ -z "$v2" ]; then
    echo "containerd-cache: could not find containerd 1.7.x in trixie and 2.x in forky:" >&2
    printf '%s\n' "$versions" >&2
    exit 1
fi

unpack() { # $1 = version, $2 = target dir name (1.7 or 2.x)
    if [ -x "$CACHE/$2/usr/bin/containerd" ]; then
        return 0
    fi
    echo "containerd-cache: downloading containerd=$1 into $CACHE/$2"
    rm -rf "$CACHE/debs"/containerd_*.deb "$CACHE/$2.tmp"
    mkdir -p "$CACHE/$2.tmp"
    (cd "$CACHE/debs" && apt_opts apt-get -qq download "containerd=$1")
    deb=""
    for f in "$CACHE"/debs/containerd_*.deb; do
        [ -e "$f" ] && deb="$f"
    done
    if [ -z "$deb" ]; then
        echo "containerd-cache: apt-get download containerd=$1 produced no .deb" >&2
        exit 1
    fi
    dpkg-deb -x "$deb" "$CACHE/$2.tmp"
    "$CACHE/$2.tmp/usr/bin/containerd" --version
    rm -rf "${CACHE:?}/$2"
    mv "$CACHE/$2.tmp" "$CACHE/$2"
    rm -f "$deb"
}
unpack "$v17" 1.7
unpack "$v2" 2.x
# The package lists (about 60 MB) are only needed to find the versions: drop them.
rm -rf "$CACHE/apt-cache" "$CACHE/lists" "$CACHE/debs"
echo "containerd-cache: ready: $CACHE/1.7/usr/bin/containerd $CACHE/2.x/usr/bin/containerd"
