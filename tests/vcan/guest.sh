#!/usr/bin/env bash
# Runs inside the VM that tests/vcan/run.sh boots: sets up vcan0/vcan1 and
# runs the lane's steps against real SocketCAN.
#
# Usage (from run.sh): guest.sh OUTDIR
#   OUTDIR is the VM's writable directory. It holds guest.env (written by
#   run.sh), and receives results.txt (one "PASS name" / "FAIL name: reason"
#   line per step), steps/<name>.log and a DONE marker.
#
# The guest sees the host's root filesystem read-only, so the binaries
# built on the host, can-utils and iproute2 are all here.

set -uo pipefail

OUT=${1:?usage: guest.sh OUTDIR}
# shellcheck source=/dev/null
. "$OUT/guest.env"

echo "BMSGW_GUEST_START"
RESULTS=$OUT/results.txt
STEPS=$OUT/steps
mkdir -p "$STEPS"
: >"$RESULTS"

# Each step runs under this timeout so one hang cannot eat the lane.
STEP_TIMEOUT=${BMSGW_STEP_TIMEOUT:-300}

pass() { echo "PASS $1" | tee -a "$RESULTS"; }
fail() { echo "FAIL $1: $2" | tee -a "$RESULTS"; }

# step NAME FUNCTION [ARGS...]
#   Runs FUNCTION with its output in steps/NAME.log. The step passes when
#   the function returns 0. On failure the reason is what the function
#   wrote to $REASON_FILE, or else the last line of its log. A function may
#   also report sub-results itself with `pass`/`fail` (see step_cargo_tests).
step() {
    local name=$1 fn=$2
    shift 2
    local log=$STEPS/$name.log
    REASON_FILE=$STEPS/$name.reason
    : >"$REASON_FILE"
    local t0 t1 rc
    t0=$(date +%s.%N)
    # A subshell, so a step cannot change the environment of later ones.
    ( "$fn" "$@" ) >"$log" 2>&1
    rc=$?
    t1=$(date +%s.%N)
    local secs
    secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
    echo "step $name: exit $rc in ${secs}s" >>"$STEPS/timings.txt"
    if [ "$rc" -eq 0 ]; then
        pass "$name (${secs}s)"
    else
        local reason
        reason=$(head -c 300 "$REASON_FILE")
        [ -n "$reason" ] || reason="exit $rc: $(grep -v '^[[:space:]]*$' "$log" | tail -n 1 | head -c 300)"
        fail "$name" "$reason (see steps/$name.log)"
    fi
}

# --- steps -----------------------------------------------------------------

step_kernel_can() {
    modprobe vcan && modprobe can-raw && modprobe can-j1939 || {
        echo "modprobe failed" >"$REASON_FILE"
        return 1
    }
    local ifc
    for ifc in vcan0 vcan1; do
        ip link add dev "$ifc" type vcan && ip link set up "$ifc" || {
            echo "could not create $ifc" >"$REASON_FILE"
            return 1
        }
    done
    ip -details link show type vcan
}

# can-utils alone, without our code: tells a broken VM apart from a bug.
step_can_utils_loopback() {
    local cap=$OUT/steps/can-utils.capture
    timeout 20 candump -L -n 1 vcan1 >"$cap" &
    local dump=$!
    # candump has no ready signal; resend until it has captured one frame.
    local i
    for i in $(seq 1 100); do
        kill -0 "$dump" 2>/dev/null || break
        cansend vcan1 18EC56F4#1122334455667788
        sleep 0.1
    done
    wait "$dump" || { echo "candump saw nothing on vcan1" >"$REASON_FILE"; return 1; }
    cat "$cap"
    grep -q ' vcan1 18EC56F4#1122334455667788' "$cap" || {
        echo "unexpected capture: $(head -c 200 "$cap")" >"$REASON_FILE"
        return 1
    }
}

# Runs a cargo test executable and reports every test as its own result
# line ("PASS socketcan/<test>"), besides the step's own line.
step_cargo_tests() {
    local prefix=$1 bin=$2
    shift 2
    local log=$OUT/steps/$prefix.tests.log
    # --show-output keeps the tracing logs of passing tests in the log too.
    timeout "$STEP_TIMEOUT" "$bin" --ignored --test-threads=1 --show-output "$@" 2>&1 | tee "$log"
    local rc=${PIPESTATUS[0]}
    local line name verdict
    while IFS= read -r line; do
        if [[ $line =~ ^test\ ([^ ]+)\ \.\.\.\ (ok|FAILED)$ ]]; then
            name=${BASH_REMATCH[1]}
            verdict=${BASH_REMATCH[2]}
            if [ "$verdict" = ok ]; then pass "$prefix/$name"; else fail "$prefix/$name" "see steps/$prefix.tests.log"; fi
        fi
    done <"$log"
    if [ "$rc" -eq 124 ]; then
        echo "timed out after ${STEP_TIMEOUT}s" >"$REASON_FILE"
    elif [ "$rc" -ne 0 ]; then
        grep -E '^test .* FAILED$' "$log" | sed -E 's/^test (.*) \.\.\. FAILED$/\1/' | paste -sd, - |
            sed 's/^/failed: /' >"$REASON_FILE"
    fi
    return "$rc"
}

# --- the lane ----------------------------------------------------------------
# Add steps below. A step is a shell function; `step NAME FUNCTION ARGS...`
# runs it and records PASS/FAIL. The binaries come from guest.env:
#   BMSGW_BIN             the release build of bmsgw
#   BMSGW_TEST_<NAME>     test executables listed in run.sh's TEST_TARGETS
# Two vcan interfaces, vcan0 and vcan1, are up; can-raw and can-j1939 are
# loaded; $OUT is writable (captures, logs), the rest of the filesystem is not.

step kernel-can step_kernel_can
step can-utils-loopback step_can_utils_loopback
BMSGW_VCAN=vcan0 step socketcan step_cargo_tests socketcan "$BMSGW_TEST_VCAN_SOCKETCAN"

# ---- LATER STEPS GO HERE ------------------------------------------------------
# e.g. (owners: sim / gateway / j1939):
#   step sim-session    step_sim_session      # two-process BMS <-> pile over vcan0,
#                                             # with `candump -L vcan0` capture in $OUT
#   step decode-capture step_decode_capture   # `bmsgw decode` on that capture
#   step j1939-interop  step_j1939_interop    # kernel can-j1939 (j1939cat/testj1939)
#                                             # as an independent TP peer
# ------------------------------------------------------------------------------

touch "$OUT/DONE"
echo "BMSGW_GUEST_DONE"
