#!/usr/bin/env bash
# The real-SocketCAN lane on an arm64 guest (issue 15, deliverable 3).
#
# Boots Debian's arm64 kernel under qemu-system-aarch64 (TCG: software
# emulation, no KVM for arm on x86_64 hosts) with an arm64 Debian userland
# as its initramfs, and runs guest.sh's daemon steps there (kernel-can,
# daemon-start, daemon-online: PKI, mosquitto, sim cloud, `bmsgw run` in
# bridge mode, one BMS-to-pile session) against the arm64 build.
#
#   1. installs what is missing (apt: qemu-system-arm, mmdebstrap, ...),
#   2. downloads and unpacks linux-image-*-arm64 (cached under $CACHE),
#   3. builds the arm64 rootfs with mmdebstrap (cached as a tarball under
#      $CACHE, keyed by its package list; CI starts cold),
#   4. packs rootfs + the CAN/9p/virtio modules into an initramfs; the guest
#      mounts the worktree (read-only) and $OUT (writable) over 9p at the
#      same paths as on the host, and runs tests/vcan/guest.sh,
#   5. prints "vcan arm64 lane: N passed, M failed"; exits non-zero on any
#      failure or when the guest produced no results.
#
# Usage: BMSGW_ARM64_BIN=path/to/aarch64/bmsgw tests/vcan/arm64.sh
# Environment:
#   BMSGW_ARM64_BIN      (required) the arm64 bmsgw: runs `bmsgw run`,
#                        `status`, `check-config`
#   BMSGW_ARM64_SIM_BIN  arm64 bmsgw with the `sim` feature for the peers
#                        (`pki dev`, `sim cloud|bms|pile`); default
#                        BMSGW_ARM64_BIN. The lean ECU build
#                        (--no-default-features) has no `pki`/`sim`
#                        subcommands, so with a lean BMSGW_ARM64_BIN this
#                        must be given.
#   BMSGW_ARM64_ECU_BIN  the build steps/bench.sh measures (start -> READY,
#                        RSS, the bridge against can-gw): an aarch64 or an
#                        armv7 (gnueabihf, run in the kernel's 32-bit
#                        compat mode) lean build; default BMSGW_ARM64_BIN
#   BMSGW_ARM64_ONLY     steps to run (bash regex, as BMSGW_VCAN_ONLY;
#                        default '^daemon-(start|online)$'; kernel-can always)
#   BMSGW_ARM64_OUT      output directory (default target/arm64-lane/out)
#   BMSGW_ARM64_CACHE    downloads, kernel, rootfs (default target/arm64-lane)
#   BMSGW_ARM64_MEMORY   guest memory (default 1G)
#   BMSGW_ARM64_CPUS     guest CPUs (default 2)
#   BMSGW_ARM64_CPU      qemu CPU model (default cortex-a72: no pointer
#                        authentication, which is slow under TCG)
#   BMSGW_ARM64_TIMEOUT  limit for the VM run in seconds (default 480)
#   BMSGW_STEP_TIMEOUT   limit for one step inside the guest (default 300)
#   BMSGW_VCAN_NO_INSTALL=1  fail instead of installing missing packages

set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
# shellcheck source=tests/vcan/host.sh
. "$HERE/host.sh"
CACHE=${BMSGW_ARM64_CACHE:-$ROOT/target/arm64-lane}
OUT=${BMSGW_ARM64_OUT:-$CACHE/out}
MEMORY=${BMSGW_ARM64_MEMORY:-1G}
CPUS=${BMSGW_ARM64_CPUS:-2}
CPU=${BMSGW_ARM64_CPU:-cortex-a72}
LANE_TIMEOUT=${BMSGW_ARM64_TIMEOUT:-480}
ONLY=${BMSGW_ARM64_ONLY:-'^daemon-(start|online)$'}
SUITE=bookworm
MIRRORS=("deb http://deb.debian.org/debian $SUITE main"
    "deb http://deb.debian.org/debian-security $SUITE-security main")
# The guest's userland. guest.sh needs bash, coreutils, procps (pkill),
# util-linux (mount, mountpoint), mawk, grep, sed; the daemon steps
# mosquitto and jq; kernel-can kmod and iproute2; steps/bench.sh python3
# (start -> READY) and cangw/cangen (can-utils). armhf is a second
# architecture so that the armv7 build runs too: Debian's arm64 kernel
# runs 32-bit ARM programs (CONFIG_COMPAT), given their loader and libc.
ARCHES=arm64,armhf
PACKAGES=can-utils,iproute2,mosquitto,jq,kmod,procps,python3-minimal,libc6:armhf,libgcc-s1:armhf
# Modules loaded in the guest (their dependencies come along).
MODULES=(vcan vxcan can-raw can-j1939 can-gw can-bcm can-isotp
    virtio_pci virtio_mmio virtio-rng 9p 9pnet_virtio)

log() { printf '[arm64 lane] %s\n' "$*" >&2; }

ensure_tools() {
    local apt=()
    command -v qemu-system-aarch64 >/dev/null || apt+=(qemu-system-arm)
    command -v mmdebstrap >/dev/null || apt+=(mmdebstrap)
    command -v arch-test >/dev/null || apt+=(arch-test)
    # mmdebstrap runs the arm64 maintainer scripts through binfmt_misc.
    [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || apt+=(qemu-user-static binfmt-support)
    command -v zstd >/dev/null || apt+=(zstd)
    command -v cpio >/dev/null || apt+=(cpio)
    command -v depmod >/dev/null || apt+=(kmod)
    if [ ${#apt[@]} -gt 0 ]; then
        [ -z "${BMSGW_VCAN_NO_INSTALL:-}" ] || { log "missing packages: ${apt[*]}"; exit 2; }
        log "installing: ${apt[*]}"
        as_root apt-get -o DPkg::Lock::Timeout=600 update -q
        as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 \
            install -y -q --no-install-recommends "${apt[@]}"
    fi
    local foreign
    foreign=$(dpkg --print-foreign-architectures)
    grep -qx arm64 <<<"$foreign" || {
        log "adding arm64 as a foreign architecture"
        as_root dpkg --add-architecture arm64
        as_root apt-get -o DPkg::Lock::Timeout=600 update -q
    }
}

# Sets KVER and KDIR: Debian's current arm64 kernel, unpacked, with
# modules.dep for the modules we take.
fetch_kernel() {
    local pkg
    pkg=$(apt-cache depends linux-image-arm64:arm64 | sed -n 's/^ *Depends: \(linux-image-[^ ]*-arm64\)\(:arm64\)\?$/\1/p' | head -n 1)
    [ -n "$pkg" ] || { log "cannot resolve linux-image-arm64:arm64 (apt-get update?)"; exit 2; }
    KVER=${pkg#linux-image-}
    KDIR=$CACHE/kernel-$KVER
    if [ ! -e "$KDIR/.done" ]; then
        log "downloading $pkg:arm64"
        rm -rf "$KDIR" "$CACHE"/deb
        mkdir -p "$CACHE/deb"
        (cd "$CACHE/deb" && apt-get download "$pkg:arm64")
        dpkg-deb -x "$CACHE"/deb/"$pkg"_*_arm64.deb "$KDIR"
        depmod -b "$KDIR" "$KVER"
        rm -rf "$CACHE/deb"
        touch "$KDIR/.done"
    fi
    [ -e "$KDIR/boot/vmlinuz-$KVER" ] || { log "no $KDIR/boot/vmlinuz-$KVER"; exit 2; }
}

# Sets ROOTFS_TAR: the arm64 userland, built once per package list.
build_rootfs() {
    local key
    key=$(printf '%s\n' "$SUITE" "$ARCHES" "$PACKAGES" "${MIRRORS[@]}" v1 | sha256sum | cut -c1-12)
    ROOTFS_TAR=$CACHE/rootfs-$SUITE-arm64-$key.tar
    if [ -e "$ROOTFS_TAR" ]; then
        ROOTFS_BUILT=cached
        return
    fi
    log "building the arm64 rootfs (mmdebstrap, maintainer scripts under qemu-user)"
    mmdebstrap --mode=root --format=tar --architectures="$ARCHES" --variant=minbase --include="$PACKAGES" \
        --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
        "$SUITE" "$ROOTFS_TAR.tmp" "${MIRRORS[@]}" >"$CACHE/mmdebstrap.log" 2>&1 || {
        tail -n 20 "$CACHE/mmdebstrap.log" >&2
        log "mmdebstrap failed (log: $CACHE/mmdebstrap.log)"
        exit 2
    }
    mv "$ROOTFS_TAR.tmp" "$ROOTFS_TAR"
    ROOTFS_BUILT=cold
}

# Sets INITRD: rootfs + modules + /init, one zstd-compressed cpio, cached
# per rootfs and kernel; the small lane-specific part (/init, /lane.env) is
# a second, uncompressed cpio appended each run.
build_initrd() {
    local mkey
    mkey=$(printf '%s\n' "${MODULES[@]}" | sha256sum | cut -c1-8)
    local base=$CACHE/base-$(basename "$ROOTFS_TAR" .tar)-$KVER-$mkey.cpio.zst
    if [ ! -e "$base" ]; then
        log "packing the initramfs"
        local stage=$CACHE/stage
        rm -rf "$stage"
        mkdir -p "$stage"
        tar -xf "$ROOTFS_TAR" -C "$stage"
        local m f rel
        for m in "${MODULES[@]}"; do
            modprobe -d "$KDIR" -S "$KVER" --show-depends "$m" | awk '$1 == "insmod" { print $2 }'
        done | sort -u | while read -r f; do
            rel=${f#"$KDIR"/}
            mkdir -p "$stage/$(dirname "$rel")"
            cp "$f" "$stage/$rel"
        done
        cp "$KDIR/lib/modules/$KVER/modules.order" "$KDIR/lib/modules/$KVER/modules.builtin"* \
            "$stage/lib/modules/$KVER/"
        depmod -b "$stage" "$KVER"
        (cd "$stage" && find . -print0 | cpio --null -o -H newc --quiet) | zstd -q -T0 -3 >"$base.tmp"
        mv "$base.tmp" "$base"
        rm -rf "$stage"
    fi

    local ov=$OUT/.overlay
    rm -rf "$ov"
    mkdir -p "$ov"
    printf 'ROOT=%q\nOUT=%q\n' "$ROOT" "$OUT" >"$ov/lane.env"
    cat >"$ov/init" <<'EOF'
#!/bin/bash
# The arm64 lane's guest init (written by tests/vcan/arm64.sh).
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
. /lane.env
for m in virtio_pci virtio_mmio virtio-rng 9pnet_virtio 9p; do modprobe "$m"; done
mkdir -p "$ROOT"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,ro bmsgw_root "$ROOT" &&
    mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 bmsgw_out "$OUT" || {
    echo "BMSGW_GUEST_NO_SHARES"
    echo o >/proc/sysrq-trigger
}
ip link set lo up
hostname bmsgw-arm64
echo "guest: $(uname -m) $(uname -r), $(nproc) CPUs"
cd "$OUT" && bash "$ROOT/tests/vcan/guest.sh" "$OUT"
sync
echo o >/proc/sysrq-trigger
sleep 30
EOF
    chmod 0755 "$ov/init"
    INITRD=$OUT/initrd.img
    cp "$base" "$INITRD"
    # The kernel takes an uncompressed cpio after a compressed one only at a
    # 4-byte boundary (zeros between archives are skipped).
    local size
    size=$(stat -c %s "$INITRD")
    head -c $(((512 - size % 512) % 512)) /dev/zero >>"$INITRD"
    (cd "$ov" && printf '%s\n' init lane.env | cpio -o -H newc --quiet -R 0:0) >>"$INITRD"
}

main() {
    [ -n "${BMSGW_ARM64_BIN:-}" ] || { log "set BMSGW_ARM64_BIN to the arm64 bmsgw"; exit 2; }
    local bin sim_bin=${BMSGW_ARM64_SIM_BIN:-$BMSGW_ARM64_BIN}
    local ecu_bin=${BMSGW_ARM64_ECU_BIN:-$BMSGW_ARM64_BIN}
    for bin in "$BMSGW_ARM64_BIN" "$sim_bin" "$ecu_bin"; do
        [ -f "$bin" ] || { log "no such file: $bin"; exit 2; }
        # ELF, 64-bit little-endian, e_machine AArch64 (0xb7); the ECU
        # build may also be 32-bit ARM (0x28).
        head -c 20 "$bin" | od -An -tx1 | tr -d ' \n' | grep -q '^7f454c460201.\{24\}b700' ||
            { [ "$bin" = "$ecu_bin" ] &&
                head -c 20 "$bin" | od -An -tx1 | tr -d ' \n' | grep -q '^7f454c460101.\{24\}2800'; } ||
            { log "$bin is not an aarch64 ELF (nor, for BMSGW_ARM64_ECU_BIN, a 32-bit ARM one)"; exit 2; }
    done
    # The peers need `pki` and `sim` (the default features). The arm64 ELF
    # runs here through binfmt_misc (qemu-user).
    if [[ daemon-start =~ $ONLY ]] && [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] &&
        ! "$sim_bin" sim --help >/dev/null 2>&1; then
        log "$sim_bin has no \`sim\` subcommand (a lean --no-default-features build?):"
        log "set BMSGW_ARM64_SIM_BIN to an arm64 build with the default features (see tests/vcan/ARM64.md)"
        exit 2
    fi
    local t_start t_tools t_kernel t_rootfs t_initrd t_vm t_end
    t_start=$(now)
    ensure_tools
    t_tools=$(now)
    mkdir -p "$CACHE"
    fetch_kernel
    t_kernel=$(now)
    build_rootfs
    t_rootfs=$(now)

    rm -rf "$OUT"
    mkdir -p "$OUT/bin"
    cp "$BMSGW_ARM64_BIN" "$OUT/bin/bmsgw"
    cp "$sim_bin" "$OUT/bin/bmsgw-sim"
    cp "$ecu_bin" "$OUT/bin/bmsgw-ecu"
    build_initrd
    {
        printf 'BMSGW_ROOT=%q\n' "$ROOT"
        printf 'BMSGW_BIN=%q\n' "$OUT/bin/bmsgw"
        printf 'BMSGW_SIM_BIN=%q\n' "$OUT/bin/bmsgw-sim"
        printf 'BMSGW_ECU_BIN=%q\n' "$OUT/bin/bmsgw-ecu"
        bench_env
        printf 'BMSGW_VCAN_ONLY=%q\n' "$ONLY"
        [ -z "${BMSGW_STEP_TIMEOUT:-}" ] || printf 'BMSGW_STEP_TIMEOUT=%q\n' "$BMSGW_STEP_TIMEOUT"
        # guest.sh names the cargo test executables of the amd64 lane at top
        # level; none is built for arm64 (their steps are filtered out).
        local t
        for t in VM; do
            printf 'BMSGW_TEST_%s=%q\n' "$t" /nonexistent
        done
    } >"$OUT/guest.env"
    t_initrd=$(now)

    log "booting $KVER under qemu-system-aarch64 (TCG, $CPU, $CPUS CPUs, $MEMORY)"
    t_vm=$(now)
    local rc
    set +e
    timeout "$LANE_TIMEOUT" qemu-system-aarch64 -M virt -cpu "$CPU" -smp "$CPUS" -m "$MEMORY" \
        -accel tcg,thread=multi -nographic -no-reboot -monitor none \
        -kernel "$KDIR/boot/vmlinuz-$KVER" -initrd "$INITRD" \
        -append "console=ttyAMA0 panic=-1 loglevel=4" \
        -device virtio-rng-pci \
        -virtfs "local,path=$ROOT,mount_tag=bmsgw_root,security_model=none,readonly=on" \
        -virtfs "local,path=$OUT,mount_tag=bmsgw_out,security_model=none" \
        </dev/null 2>&1 | watch_console | tee "$OUT/console.log"
    rc=${PIPESTATUS[0]}
    set -e
    t_end=$(now)

    lane_verdict "vcan arm64 lane" qemu "$rc" "$t_vm" "$t_end" \
        "install $(elapsed "$t_start" "$t_tools")s, kernel $(elapsed "$t_tools" "$t_kernel")s,\
 rootfs ($ROOTFS_BUILT) $(elapsed "$t_kernel" "$t_rootfs")s,\
 initramfs $(elapsed "$t_rootfs" "$t_initrd")s," "$t_start"
}

main "$@"
