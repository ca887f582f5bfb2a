#!/usr/bin/env bash
# Installs the cross lane's arm64 and armhf packages with apt on a clean
# Debian of their own architecture (issue 15, deliverable 5), which
# `dpkg --dry-run` on the amd64 host cannot do: it does not resolve
# `Depends: systemd` for a foreign architecture.
#
# Per package: mmdebstrap builds a bookworm chroot of the package's
# architecture (maintainer scripts under qemu-user through binfmt_misc),
# lets apt resolve and install the .deb with its dependencies, and then
# checks, inside the chroot:
#   - the maintainer script made the `bmsgw` system user (sysusers);
#   - /etc/bmsgw is 0750 and /etc/bmsgw/bmsgw.toml 0640, root:bmsgw;
#   - the unit file is where systemd looks, and `systemd-analyze verify`
#     accepts it;
#   - the installed binary runs (`bmsgw --version`, `bmsgw --help`).
# The chroot is thrown away. It prints "cross install: N passed, M failed".
#
# Not run by CI (about 3 minutes per architecture, mostly systemd's
# installation under emulation); run it after tests/cross/run.sh:
#   bash tests/cross/install.sh [path/to/bmsgw_*.deb ...]
# Default: every .deb under target/cross-lane/*/deb/.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
OUT=${BMSGW_CROSS_OUT:-$ROOT/target/cross-lane}
SUITE=bookworm
MIRRORS=("deb http://deb.debian.org/debian $SUITE main"
    "deb http://deb.debian.org/debian-security $SUITE-security main")

log() { printf '[cross install] %s\n' "$*" >&2; }

command -v mmdebstrap >/dev/null || {
    log "installing mmdebstrap"
    apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends mmdebstrap arch-test >/dev/null
}

debs=("$@")
if [ ${#debs[@]} -eq 0 ]; then
    shopt -s nullglob
    debs=("$OUT"/*/deb/bmsgw_*.deb)
    shopt -u nullglob
fi
[ ${#debs[@]} -gt 0 ] || { log "no packages: run tests/cross/run.sh first, or name them"; exit 2; }

# The checks, run by mmdebstrap as a customize hook with the chroot as $1.
# shellcheck disable=SC2016
CHECKS='
set -e
r=$1
fail() { echo "CHECK FAILED: $*"; exit 1; }
chroot "$r" getent passwd bmsgw >/dev/null || fail "no bmsgw user (sysusers in postinst)"
# Owners by name inside the chroot: the host would name its own groups.
mode() { chroot "$r" stat -c %a:%U:%G "$1"; }
[ "$(mode /etc/bmsgw)" = 750:root:bmsgw ] || fail "/etc/bmsgw is $(mode /etc/bmsgw)"
[ "$(mode /etc/bmsgw/bmsgw.toml)" = 640:root:bmsgw ] ||
    fail "/etc/bmsgw/bmsgw.toml is $(mode /etc/bmsgw/bmsgw.toml)"
[ -f "$r/lib/systemd/system/bmsgw.service" ] || fail "no unit in /lib/systemd/system"
chroot "$r" systemd-analyze verify --man=no /lib/systemd/system/bmsgw.service ||
    fail "systemd-analyze verify refused the unit"
chroot "$r" /usr/bin/bmsgw --version || fail "bmsgw --version"
chroot "$r" /usr/bin/bmsgw --help >/dev/null || fail "bmsgw --help"
echo "CHECKS PASSED: $(chroot "$r" dpkg-query -W -f="\${Package} \${Version} \${Architecture}" bmsgw), systemd $(chroot "$r" dpkg-query -W -f="\${Version}" systemd)"
'

passed=0
failed=0
for deb in "${debs[@]}"; do
    deb=$(realpath "$deb")
    arch=$(dpkg-deb -f "$deb" Architecture)
    [ -e "/proc/sys/fs/binfmt_misc/qemu-$( [ "$arch" = arm64 ] && echo aarch64 || echo arm)" ] ||
        { log "binfmt_misc has no qemu entry for $arch (run tests/cross/run.sh first)"; exit 2; }
    logf=$OUT/install-$arch.log
    mkdir -p "$OUT"
    log "$arch: apt installs $(basename "$deb") into a clean $SUITE chroot"
    t0=$(date +%s)
    if mmdebstrap --mode=root --variant=apt --architectures="$arch" \
        --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
        --hook-dir=/usr/share/mmdebstrap/hooks/file-mirror-automount \
        --include="$deb" --customize-hook="$CHECKS" \
        "$SUITE" /dev/null "${MIRRORS[@]}" >"$logf" 2>&1; then
        passed=$((passed + 1))
        log "$arch: $(grep -m1 '^CHECKS PASSED' "$logf") ($(($(date +%s) - t0)) s)"
    else
        failed=$((failed + 1))
        tail -n 15 "$logf" >&2
        log "$arch: FAILED ($(($(date +%s) - t0)) s; log: $logf)"
    fi
done
echo "cross install: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
