#!/bin/sh
# Installs what building and testing pinkeeper needs on Debian bookworm (run as root):
# protoc (containerd-client and ttrpc codegen, FACTS.md 5), containerd 1.6 from bookworm (its
# `containerd` and `ctr` binaries, for the integration tests; the host service is NOT started),
# the compressors of K3s's archive formats, procps (`kill`, which the tests and the demo run to
# stop daemons; not in a minimal bookworm), Debian's docker-registry (distribution 2.8: a
# private registry on loopback that CRI pulls from in tests/policy.rs; its service is NOT
# started), Debian's prometheus for `promtool` (tests/prometheus_rules.rs checks and unit-tests
# packaging/prometheus/pinkeeper.rules.yaml; its service is NOT started), then the unpacked
# containerd 1.7 and 2.x
# (scripts/containerd-cache.sh). Idempotent, and quick when everything is there.
set -eu

here="$(cd "$(dirname "$0")" && pwd)"

# package:command-or-file that proves it is installed
wanted="protobuf-compiler:/usr/bin/protoc containerd:/usr/bin/containerd containerd:/usr/bin/ctr
zstd:/usr/bin/zstd lz4:/usr/bin/lz4 bzip2:/usr/bin/bzip2
ca-certificates:/etc/ssl/certs/ca-certificates.crt procps:/bin/kill
docker-registry:/usr/bin/docker-registry prometheus:/usr/bin/promtool"

missing=""
for item in $wanted; do
    pkg="${item%%:*}"
    file="${item#*:}"
    if [ ! -e "$file" ]; then
        case " $missing " in
            *" $pkg "*) ;;
            *) missing="$missing $pkg" ;;
        esac
    fi
done

if [ -n "$missing" ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "install-deps: missing:$missing; run this script as root" >&2
        exit 1
    fi
    echo "install-deps: installing:$missing"
    # Never start (or enable) a host containerd: invoke-rc.d consults policy-rc.d, and 101
    # means "action not allowed". Restore whatever was there before.
    policy=/usr/sbin/policy-rc.d
    saved=""
    if [ -e "$policy" ]; then
        saved="$(mktemp)"
        cp -p "$policy" "$saved"
    fi
    restore_policy() {
        if [ -n "$saved" ]; then mv "$saved" "$policy"; else rm -f "$policy"; fi
    }
    trap restore_policy EXIT INT TERM
    printf '#!/bin/sh\nexit 101\n' > "$policy"
    chmod 755 "$policy"

    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # shellcheck disable=SC2086 # word splitting of the package list is intended
    apt-get install -y -qq --no-install-recommends $missing
    restore_policy
    trap - EXIT INT TERM
    # The package enables its unit for boot; the tests run their own private daemons instead.
    # (deb-systemd-helper refuses to run outside dpkg maintainer scripts; systemctl disable works
    # offline too, and keeps dpkg's state so upgrades do not re-enable the unit.)
    for unit in containerd docker-registry prometheus; do
        case " $missing " in
            *" $unit "*)
                if command -v systemctl >/dev/null 2>&1; then
                    systemctl disable "$unit.service" >/dev/null 2>&1 || true
                else
                    rm -f "/etc/systemd/system/multi-user.target.wants/$unit.service"
                fi
                ;;
        esac
    done
else
    echo "install-deps: apt packages already installed"
fi

"$here/containerd-cache.sh"

# The DaemonSet manifest's check (scripts/check-daemonset.py, `make test`): kubernetes-validate,
# which bundles Kubernetes' JSON schemas (so it needs no network), in a venv of its own under
# /var/cache/pinkeeper so that reruns install nothing.
venv=/var/cache/pinkeeper/python
if "$venv/bin/python" -c 'import kubernetes_validate, yaml' >/dev/null 2>&1; then
    echo "install-deps: kubernetes-validate already installed"
else
    if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv
    fi
    echo "install-deps: installing kubernetes-validate into $venv"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "kubernetes-validate==1.37.0"
fi
