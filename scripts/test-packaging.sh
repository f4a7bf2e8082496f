#!/usr/bin/env bash
# Checks the packaging (`make packaging-test`, part of `make test`), as root on Debian:
#  1. the files of packaging/ themselves: the drop-ins add Wants=/After= and nothing else, the
#     example config names exactly the keys of `pinkeeper run`'s config file (src/config.rs);
#  2. `make install DESTDIR=... PREFIX=/usr` (and PREFIX=/usr/local): every file, its mode,
#     ExecStart pointing at the installed binary, a real config.toml left alone, uninstall;
#  3. `systemd-analyze verify` of the installed unit and of stand-in K3s/RKE2 units in a root
#     made of the install tree plus this host's own systemd units (sysinit.target, ...), which
#     must print nothing, and a probe that systemd really reads each drop-in for its unit;
#  4. `systemd-analyze security --offline=true`: the unit must score OK or better (exposure
#     below 5.0; systemd's levels: PERFECT 0, SAFE < 1, OK < 5, MEDIUM < 7.5, EXPOSED < 9,
#     UNSAFE < 10, DANGEROUS), also with the loopback-metrics drop-in its comment documents;
#  5. `make deb`: what `dpkg-deb -c` lists, the conffiles, the maintainer scripts (enable,
#     daemon-reload, start on install, restart after upgrade, stop only on removal), and 3 and 4
#     again on the tree the package unpacks to.
# Installs systemd's tools with apt only when systemd-analyze is missing, starting nothing.
# Reuses the release build (cargo rebuilds only what changed).
set -euo pipefail

cd "$(dirname "$0")/.."
MAKE="${MAKE:-make}"
UNITS="pinkeeper.service k3s.service k3s-agent.service rke2-server.service rke2-agent.service"
DROPIN_UNITS="k3s k3s-agent rke2-server rke2-agent"

say() { echo "test-packaging: $*"; }
indent() { printf '%s\n' "$1" | sed 's/^/    /'; }
fail() {
    echo "test-packaging: FAIL: $*" >&2
    exit 1
}

tmp="$(mktemp -d /tmp/pk-packaging.XXXXXX)"
cleanup() { rm -rf "$tmp"; }
trap cleanup EXIT

# ---------------------------------------------------------------------------------------------
# systemd-analyze (Debian's `systemd` package), without starting anything.
if ! command -v systemd-analyze >/dev/null 2>&1; then
    [ "$(id -u)" -eq 0 ] || fail "systemd-analyze is missing; run as root to install it"
    say "installing systemd (for systemd-analyze) with apt"
    policy=/usr/sbin/policy-rc.d
    saved=""
    if [ -e "$policy" ]; then
        saved="$tmp/policy-rc.d.saved"
        cp -p "$policy" "$saved"
    fi
    restore_policy() {
        if [ -n "$saved" ]; then mv "$saved" "$policy"; else rm -f "$policy"; fi
    }
    trap 'restore_policy; cleanup' EXIT
    # invoke-rc.d (and deb-systemd-invoke) ask policy-rc.d; 101 = action not allowed.
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    export DEBIAN_FRONTEND=noninteractive
    if ! compgen -G '/var/lib/apt/lists/*_Packages' >/dev/null; then
        apt-get update -qq
    fi
    apt-get install -y -qq --no-install-recommends systemd
    restore_policy
    trap cleanup EXIT
fi
say "$(systemd-analyze --version | head -1)"

# The host's own units (sysinit.target, basic.target, ...) that every service depends on.
host_units=""
for dir in /usr/lib/systemd/system /lib/systemd/system; do
    if [ -e "$dir/sysinit.target" ]; then
        host_units="$dir"
        break
    fi
done
[ -n "$host_units" ] || fail "no sysinit.target in /usr/lib/systemd/system or /lib/systemd/system"

# ---------------------------------------------------------------------------------------------
# 1. The files themselves.
for unit in $DROPIN_UNITS; do
    file="packaging/systemd/$unit.service.d/10-pinkeeper.conf"
    settings="$(grep -v -e '^#' -e '^[[:space:]]*$' "$file")"
    [ "$settings" = $'[Unit]\nWants=pinkeeper.service\nAfter=pinkeeper.service' ] ||
        fail "$file must hold [Unit] Wants=pinkeeper.service and After=pinkeeper.service only, has:
$settings"
done
say "drop-ins: Wants= + After= pinkeeper.service only (no PartOf=/BindsTo=)"

# Every key of FileConfig (the config file's keys) is in the example, and nothing else.
config_keys="$(sed -n '/^pub struct FileConfig {/,/^}/s/^ *pub \([a-z_][a-z0-9_]*\):.*/\1/p' \
    src/config.rs | sort)"
example_keys="$(sed -n 's/^#\{0,1\}\([a-z_][a-z0-9_]*\) = .*/\1/p' packaging/config.toml | sort)"
[ -n "$config_keys" ] || fail "found no keys of FileConfig in src/config.rs"
[ "$config_keys" = "$example_keys" ] ||
    fail "packaging/config.toml does not name the keys of FileConfig in src/config.rs:
$(diff <(echo "$config_keys") <(echo "$example_keys") || true)"
say "config example: the $(echo "$config_keys" | wc -l) keys of src/config.rs"

# ---------------------------------------------------------------------------------------------
# 3 and 4 on a tree: $1 the tree (an install or an unpacked .deb), $2 where its drop-ins are
# (relative), $3 a label.
check_units() {
    local tree="$1" dropins="$2" label="$3" root="$tmp/root-$3"
    rm -rf "$root"
    cp -a "$tree" "$root"
    mkdir -p "$root/usr/lib/systemd/system" "$root/etc/systemd/system" "$root/usr/local/bin"
    # merged /usr, as on bookworm: /lib is /usr/lib, /bin is /usr/bin.
    [ -e "$root/lib" ] || ln -s usr/lib "$root/lib"
    mkdir -p "$root/usr/bin"
    [ -e "$root/bin" ] || ln -s usr/bin "$root/bin"
    # ExecReload= runs the shell's kill (/bin/sh is essential on every Debian system).
    [ -e "$root/usr/bin/sh" ] || { printf '#!/bin/sh\nexit 0\n' >"$root/usr/bin/sh"; chmod 755 "$root/usr/bin/sh"; }
    cp -an "$host_units/." "$root/usr/lib/systemd/system/"
    # K3s's installer writes its units to /etc/systemd/system; RKE2's are alike.
    printf '#!/bin/sh\nexit 0\n' >"$root/usr/local/bin/k3s"
    chmod 755 "$root/usr/local/bin/k3s"
    for unit in $DROPIN_UNITS; do
        printf '[Unit]\nDescription=stand-in for %s\n[Service]\nType=notify\nExecStart=/usr/local/bin/k3s server\n[Install]\nWantedBy=multi-user.target\n' \
            "$unit" >"$root/etc/systemd/system/$unit.service"
    done

    local out
    # shellcheck disable=SC2086 # the unit list is split on purpose
    if ! out="$(systemd-analyze verify --man=no --root="$root" $UNITS 2>&1)"; then
        fail "$label: systemd-analyze verify failed:
$out"
    fi
    [ -z "$out" ] || fail "$label: systemd-analyze verify printed (must print nothing):
$out"
    say "$label: systemd-analyze verify $UNITS: clean"

    # The probe: an unknown key in each drop-in must be reported for that drop-in's file, which
    # proves systemd reads it as part of its unit in this layout.
    local probe="$tmp/probe-$label"
    rm -rf "$probe"
    cp -a "$root" "$probe"
    for unit in $DROPIN_UNITS; do
        echo "PinkeeperDropInProbe=1" >>"$probe/$dropins/$unit.service.d/10-pinkeeper.conf"
        out="$(systemd-analyze verify --man=no --root="$probe" "$unit.service" 2>&1 || true)"
        case "$out" in
            *"$dropins/$unit.service.d/10-pinkeeper.conf"*"PinkeeperDropInProbe"*) ;;
            *) fail "$label: systemd does not read /$dropins/$unit.service.d/10-pinkeeper.conf for $unit.service:
$out" ;;
        esac
    done
    say "$label: systemd applies /$dropins/<unit>.service.d/10-pinkeeper.conf to $DROPIN_UNITS"

    # [Install] works: enabling creates multi-user.target.wants/pinkeeper.service.
    systemctl --root="$probe" enable pinkeeper.service >/dev/null 2>&1 ||
        fail "$label: systemctl --root enable pinkeeper.service failed"
    [ -L "$probe/etc/systemd/system/multi-user.target.wants/pinkeeper.service" ] ||
        fail "$label: enabling did not link multi-user.target.wants/pinkeeper.service"

    security "$root" "$label"
    # The loopback-metrics relaxation, exactly as the unit's comment shows it.
    mkdir -p "$root/etc/systemd/system/pinkeeper.service.d"
    sed -n 's/^#   //p' "$root/$(unit_path "$root")" \
        >"$root/etc/systemd/system/pinkeeper.service.d/metrics.conf"
    grep -qx 'PrivateNetwork=no' "$root/etc/systemd/system/pinkeeper.service.d/metrics.conf" ||
        fail "$label: the unit's comment lost its loopback-metrics drop-in"
    security "$root" "$label (with the loopback-metrics drop-in of its comment)"
}

# Where the unit is in a tree (relative).
unit_path() {
    local p
    for p in usr/lib/systemd/system/pinkeeper.service usr/local/lib/systemd/system/pinkeeper.service \
        lib/systemd/system/pinkeeper.service; do
        if [ -f "$1/$p" ]; then
            echo "$p"
            return
        fi
    done
    fail "no pinkeeper.service in $1"
}

# 4: the overall exposure level, from the last line:
# "→ Overall exposure level for pinkeeper.service: 0.7 SAFE 😀"
security() {
    local root="$1" label="$2" out last exposure level
    out="$(systemd-analyze security --offline=true --root="$root" pinkeeper.service 2>&1)" ||
        fail "$label: systemd-analyze security failed:
$out"
    last="$(printf '%s\n' "$out" | tail -n 1)"
    exposure="$(printf '%s\n' "$last" | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\) \([A-Z]*\).*/\1/p')"
    level="$(printf '%s\n' "$last" | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\) \([A-Z]*\).*/\2/p')"
    [ -n "$level" ] || fail "$label: cannot read the exposure level from: $last"
    case "$level" in
        PERFECT | SAFE | OK) say "$label: systemd-analyze security: exposure $exposure $level" ;;
        *) fail "$label: systemd-analyze security: exposure $exposure $level, expected OK or better:
$out" ;;
    esac
}

# ---------------------------------------------------------------------------------------------
# 2. make install.
# The release binary `make build` made is reused as it is (`make -o build`: the packaging is
# under test, not the binary); without one, `make install` builds it (minutes on two cores).
make_opts=()
if [ -x "${CARGO_TARGET_DIR:-target}/release/pinkeeper" ]; then
    make_opts=(-o build)
    say "reusing ${CARGO_TARGET_DIR:-target}/release/pinkeeper"
fi
check_mode() {
    local file="$1" mode="$2" got
    [ -f "$file" ] || fail "missing: $file"
    got="$(stat -c %a "$file")"
    [ "$got" = "$mode" ] || fail "$file: mode $got, expected $mode"
}

dest="$tmp/install-usr"
say "make install DESTDIR=$dest PREFIX=/usr"
"$MAKE" --no-print-directory "${make_opts[@]}" install DESTDIR="$dest" PREFIX=/usr >"$tmp/install.log" 2>&1 ||
    fail "make install failed:
$(tail -n 30 "$tmp/install.log")"
expected="etc/pinkeeper/config.toml.example 644
usr/bin/pinkeeper 755
usr/lib/systemd/system/pinkeeper.service 644"
for unit in $DROPIN_UNITS; do
    expected="$expected
etc/systemd/system/$unit.service.d/10-pinkeeper.conf 644"
done
expected="$(echo "$expected" | sort)"
got="$(cd "$dest" && find . -type f -printf '%P %m\n' | sort)"
[ "$got" = "$expected" ] || fail "make install: the tree differs from the expected one:
$(diff <(echo "$expected") <(echo "$got") || true)"
got_other="$(cd "$dest" && find . ! -type f ! -type d -printf '%P\n')"
[ -z "$got_other" ] || fail "make install: unexpected non-files: $got_other"
cmp -s packaging/systemd/pinkeeper.service "$dest/usr/lib/systemd/system/pinkeeper.service" ||
    fail "make install PREFIX=/usr changed the unit"
cmp -s packaging/config.toml "$dest/etc/pinkeeper/config.toml.example" ||
    fail "make install: config.toml.example is not packaging/config.toml"
"$dest/usr/bin/pinkeeper" --version >/dev/null || fail "the installed binary does not run"
say "make install: $(echo "$expected" | wc -l) files, modes as expected:"
indent "$got"

# A real config is never touched; the example is replaced; PREFIX=/usr/local moves the unit
# and rewrites ExecStart.
echo 'settle_ms = 5000' >"$dest/etc/pinkeeper/config.toml"
echo '# old example' >"$dest/etc/pinkeeper/config.toml.example"
"$MAKE" --no-print-directory "${make_opts[@]}" install DESTDIR="$dest" PREFIX=/usr >"$tmp/install.log" 2>&1 ||
    fail "make install (again) failed:
$(tail -n 30 "$tmp/install.log")"
[ "$(cat "$dest/etc/pinkeeper/config.toml")" = 'settle_ms = 5000' ] ||
    fail "make install changed an existing /etc/pinkeeper/config.toml"
cmp -s packaging/config.toml "$dest/etc/pinkeeper/config.toml.example" ||
    fail "make install did not replace an old config.toml.example"
rm "$dest/etc/pinkeeper/config.toml"

local_dest="$tmp/install-local"
"$MAKE" --no-print-directory "${make_opts[@]}" install DESTDIR="$local_dest" PREFIX=/usr/local >"$tmp/install.log" 2>&1 ||
    fail "make install PREFIX=/usr/local failed:
$(tail -n 30 "$tmp/install.log")"
check_mode "$local_dest/usr/local/bin/pinkeeper" 755
check_mode "$local_dest/usr/local/lib/systemd/system/pinkeeper.service" 644
exec_start="$(grep '^ExecStart=' "$local_dest/usr/local/lib/systemd/system/pinkeeper.service")"
[ "$exec_start" = "ExecStart=/usr/local/bin/pinkeeper run" ] ||
    fail "PREFIX=/usr/local: unit has $exec_start"
say "make install PREFIX=/usr/local: unit in /usr/local/lib/systemd/system, $exec_start"

check_units "$dest" etc/systemd/system install
check_units "$local_dest" etc/systemd/system install-usr-local

echo 'settle_ms = 5000' >"$local_dest/etc/pinkeeper/config.toml"
"$MAKE" --no-print-directory "${make_opts[@]}" uninstall DESTDIR="$local_dest" PREFIX=/usr/local >"$tmp/install.log" 2>&1 ||
    fail "make uninstall failed:
$(tail -n 30 "$tmp/install.log")"
left="$(cd "$local_dest" && find . -type f -printf '%P\n')"
[ "$left" = "etc/pinkeeper/config.toml" ] || fail "make uninstall left or removed the wrong files: $left"
say "make uninstall: removes everything it installed, keeps /etc/pinkeeper/config.toml"


# ---------------------------------------------------------------------------------------------
# 5. make deb.
say "make deb"
"$MAKE" --no-print-directory "${make_opts[@]}" deb >"$tmp/deb.log" 2>&1 || fail "make deb failed:
$(tail -n 30 "$tmp/deb.log")"
deb="$(grep -E '\.deb$' "$tmp/deb.log" | tail -n 1)"
[ -f "$deb" ] || fail "make deb: no .deb named in its output:
$(tail -n 30 "$tmp/deb.log")"
say "package: $deb"

listing="$(dpkg-deb -c "$deb")"
indent "$listing"
expected_files="./usr/bin/pinkeeper
./usr/lib/systemd/system/pinkeeper.service
./etc/pinkeeper/config.toml.example"
for unit in $DROPIN_UNITS; do
    expected_files="$expected_files
./usr/lib/systemd/system/$unit.service.d/10-pinkeeper.conf"
done
while read -r want; do
    echo "$listing" | awk '{print $6}' | grep -qx -- "$want" || fail "dpkg-deb -c lists no $want"
done <<<"$expected_files"
if echo "$listing" | awk '{print $6}' | grep -qx './etc/pinkeeper/config.toml'; then
    fail "the package ships /etc/pinkeeper/config.toml: that file is the operator's"
fi
echo "$listing" | grep -q '^-rwxr-xr-x .* \./usr/bin/pinkeeper$' || fail "usr/bin/pinkeeper is not 0755"

control="$tmp/control"
dpkg-deb -e "$deb" "$control"
info="$(dpkg-deb -I "$deb")"
indent "$info"
for script in postinst prerm postrm; do
    [ -x "$control/$script" ] || fail "the package has no executable $script"
done
grep -qx '/etc/pinkeeper/config.toml.example' "$control/conffiles" ||
    fail "config.toml.example is not a conffile"
grep -q 'deb-systemd-helper enable pinkeeper.service' "$control/postinst" ||
    fail "postinst does not enable pinkeeper.service"
grep -q 'systemctl --system daemon-reload' "$control/postinst" ||
    fail "postinst does not reload systemd"
if ! grep -q '_dh_action=restart' "$control/postinst" ||
    ! grep -q '_dh_action=start' "$control/postinst"; then
    fail "postinst does not start pinkeeper at install and restart it after an upgrade"
fi
# shellcheck disable=SC2016 # "$1" is the text of the script, not a variable here
if ! grep -q '\[ "$1" = remove \]' "$control/prerm" ||
    ! grep -q 'deb-systemd-invoke stop pinkeeper.service' "$control/prerm"; then
    fail "prerm must stop pinkeeper at removal only (not before an upgrade)"
fi
say "maintainer scripts: enable + daemon-reload + start (install) / restart (upgrade); stop at removal only"

unpacked="$tmp/deb-tree"
dpkg-deb -x "$deb" "$unpacked"
cmp -s packaging/systemd/pinkeeper.service "$unpacked/usr/lib/systemd/system/pinkeeper.service" ||
    fail "the package's unit is not packaging/systemd/pinkeeper.service"
check_units "$unpacked" usr/lib/systemd/system deb

say "ok"
