#!/usr/bin/env bash
# The real-SocketCAN lane.
#
# Our CI and dev machines run kernels without CONFIG_CAN, so the tests that
# need real SocketCAN (vcan, can-raw, can-j1939) run inside a small VM that
# boots Debian's kernel with virtme-ng, sharing the host's root filesystem
# read-only. This script:
#   1. installs what is missing (apt: qemu, kernel, can-utils, ...; pip: virtme-ng),
#   2. builds on the host: `cargo build --release` and the test executables,
#   3. boots the VM, which runs tests/vcan/guest.sh (the list of steps),
#   4. prints "vcan lane: N passed, M failed" and exits non-zero on any
#      failure, or when the VM produced no results.
#
# Usage: tests/vcan/run.sh
# Environment (all optional):
#   BMSGW_VCAN_OUT      output directory (default target/vcan-lane): results.txt,
#                       steps/*.log, console.log, captures
#   BMSGW_VCAN_KERNEL   kernel image (default: newest /boot/vmlinuz-*-amd64
#                       with its modules installed)
#   BMSGW_VCAN_MEMORY   guest memory (default 1G)
#   BMSGW_VCAN_CPUS     guest CPUs (default 2)
#   BMSGW_VCAN_TIMEOUT  limit for the whole VM run in seconds (default 1200)
#   BMSGW_STEP_TIMEOUT  limit for one step inside the guest (default 300)
#   BMSGW_VCAN_ONLY     run only the steps whose name matches this bash regex
#                       (kernel-can always runs), e.g. '^daemon-' while
#                       working on those; the lane then reports fewer steps
#   BMSGW_VCAN_NO_INSTALL=1  fail instead of installing missing packages
#   BMSGW_BENCH_READY_RUNS, BMSGW_BENCH_REPS, BMSGW_BENCH_GEN_SECS
#                       the sizes of steps/bench.sh (defaults 10, 3, 5)

set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
# shellcheck source=tests/vcan/host.sh
. "$HERE/host.sh"
OUT=${BMSGW_VCAN_OUT:-$ROOT/target/vcan-lane}
MEMORY=${BMSGW_VCAN_MEMORY:-1G}
CPUS=${BMSGW_VCAN_CPUS:-2}
LANE_TIMEOUT=${BMSGW_VCAN_TIMEOUT:-1200}

# cargo test targets built for the guest; each one's executable is passed in
# guest.env as BMSGW_TEST_<TARGET IN UPPER CASE>. Add new targets here.
TEST_TARGETS=(vm)


log() { printf '[vcan lane] %s\n' "$*" >&2; }

find_kernel() {
    if [ -n "${BMSGW_VCAN_KERNEL:-}" ]; then
        echo "$BMSGW_VCAN_KERNEL"
        return
    fi
    local k ver best=""
    for k in /boot/vmlinuz-*-amd64; do
        [ -e "$k" ] || continue
        ver=${k#/boot/vmlinuz-}
        [ -d "/lib/modules/$ver/kernel/drivers/net/can" ] && best=$k
    done
    # The glob is sorted; keep the newest that has its CAN modules.
    echo "$best"
}

have_static_busybox() {
    local b p
    for b in busybox-static busybox.static busybox; do
        p=$(command -v "$b") || continue
        # ldd fails on a static executable ("not a dynamic executable").
        ldd "$p" >/dev/null 2>&1 || return 0
    done
    return 1
}

ensure_tools() {
    local apt=()
    command -v qemu-system-x86_64 >/dev/null || apt+=(qemu-system-x86)
    [ -n "$(find_kernel)" ] || apt+=(linux-image-amd64)
    { command -v candump && command -v cansend && command -v canplayer; } >/dev/null || apt+=(can-utils)
    command -v ip >/dev/null || apt+=(iproute2)
    command -v modprobe >/dev/null || apt+=(kmod)
    # The broker for later steps (cloud link over mosquitto inside the VM).
    command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || apt+=(mosquitto)
    # The daemon steps read `bmsgw status --json` with jq.
    command -v jq >/dev/null || apt+=(jq)
    # virtme-ng builds an initramfs (Debian's kernel has virtio/9p as
    # modules) and insists on a statically linked busybox for it.
    have_static_busybox || apt+=(busybox-static)
    command -v python3 >/dev/null || apt+=(python3)
    if ! command -v vng >/dev/null && ! python3 -m pip --version >/dev/null 2>&1; then
        apt+=(python3-pip)
    fi

    if [ ${#apt[@]} -gt 0 ]; then
        [ -z "${BMSGW_VCAN_NO_INSTALL:-}" ] || { log "missing packages: ${apt[*]}"; exit 2; }
        log "installing: ${apt[*]}"
        # The lock timeout lets this wait for an apt run already in progress.
        as_root apt-get -o DPkg::Lock::Timeout=600 update -q
        as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 \
            install -y -q --no-install-recommends "${apt[@]}"
    fi
    if ! command -v vng >/dev/null; then
        [ -z "${BMSGW_VCAN_NO_INSTALL:-}" ] || { log "missing: vng (pip install virtme-ng)"; exit 2; }
        log "installing virtme-ng (pip)"
        python3 -m pip install --user virtme-ng ||
            python3 -m pip install --user --break-system-packages virtme-ng
        export PATH="$HOME/.local/bin:$PATH"
        command -v vng >/dev/null || { log "vng still not found after pip install"; exit 2; }
    fi
}

# Prints the executable of the cargo test target $1, building it if needed.
test_executable() {
    (cd "$ROOT" && cargo test --no-run --test "$1" --message-format=json) |
        python3 -c '
import json, sys
name = sys.argv[1]
exe = None
for line in sys.stdin:
    try:
        msg = json.loads(line)
    except ValueError:
        continue
    t = msg.get("target", {})
    if msg.get("reason") == "compiler-artifact" and t.get("name") == name \
            and "test" in t.get("kind", []) and msg.get("executable"):
        exe = msg["executable"]
if not exe:
    sys.exit("no executable for test target " + name)
print(exe)
' "$1"
}

main() {
    local t_start t_tools t_built t_vm t_end
    t_start=$(now)
    ensure_tools
    t_tools=$(now)
    local kernel
    kernel=$(find_kernel)
    [ -n "$kernel" ] || { log "no /boot/vmlinuz-*-amd64 with CAN modules found"; exit 2; }

    log "building on the host"
    (cd "$ROOT" && cargo build --release)
    # The lean ECU build, as bench/run.sh builds it, for steps/bench.sh.
    (cd "$ROOT" && cargo build --release --no-default-features --target-dir target/ecu)
    rm -rf "$OUT"
    mkdir -p "$OUT"
    {
        printf 'BMSGW_ROOT=%q\n' "$ROOT"
        printf 'BMSGW_BIN=%q\n' "$ROOT/target/release/bmsgw"
        printf 'BMSGW_ECU_BIN=%q\n' "$ROOT/target/ecu/release/bmsgw"
        bench_env
        [ -z "${BMSGW_VCAN_ONLY:-}" ] || printf 'BMSGW_VCAN_ONLY=%q\n' "$BMSGW_VCAN_ONLY"
        [ -z "${BMSGW_STEP_TIMEOUT:-}" ] || printf 'BMSGW_STEP_TIMEOUT=%q\n' "$BMSGW_STEP_TIMEOUT"
        [ -z "${BMSGW_FAULT_KILLS:-}" ] || printf 'BMSGW_FAULT_KILLS=%q\n' "$BMSGW_FAULT_KILLS"
        [ -z "${BMSGW_FAULT_SEED:-}" ] || printf 'BMSGW_FAULT_SEED=%q\n' "$BMSGW_FAULT_SEED"
        local t exe var
        for t in "${TEST_TARGETS[@]}"; do
            exe=$(test_executable "$t")
            var=BMSGW_TEST_$(echo "$t" | tr '[:lower:]-' '[:upper:]_')
            printf '%s=%q\n' "$var" "$exe"
        done
    } >"$OUT/guest.env"
    t_built=$(now)

    log "booting $kernel (software emulation, $CPUS CPUs, $MEMORY)"
    t_vm=$(now)
    local rc
    set +e
    # KVM hung on these machines, hence --disable-kvm (see VCAN-LANE notes).
    timeout "$LANE_TIMEOUT" vng --run "$kernel" --disable-kvm --cpus "$CPUS" --memory "$MEMORY" \
        --rwdir="$OUT" --exec "bash $HERE/guest.sh $OUT" </dev/null 2>&1 |
        watch_console | tee "$OUT/console.log"
    rc=${PIPESTATUS[0]}
    set -e
    t_end=$(now)

    lane_verdict "vcan lane" vng "$rc" "$t_vm" "$t_end" \
        "install $(elapsed "$t_start" "$t_tools")s, build $(elapsed "$t_tools" "$t_built")s," "$t_start"
}

main "$@"
