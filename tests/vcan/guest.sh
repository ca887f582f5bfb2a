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
    # Every test the runner announced must have reported: a result line
    # garbled by stray output must not vanish from the count.
    local announced reported
    announced=$(sed -nE 's/^running ([0-9]+) tests?$/\1/p' "$log" | head -n 1)
    reported=$(grep -cE '^test [^ ]+ \.\.\. (ok|FAILED)$' "$log" || true)
    if [ "$rc" -eq 0 ] && [ "${announced:-0}" != "$reported" ]; then
        echo "the runner announced ${announced:-no} tests but $reported reported a result" >"$REASON_FILE"
        return 1
    fi
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

# Two separate processes, BMS sim and pile sim, to a complete session on
# vcan0, while candump records the bus.
step_sim_session() {
    local cap=$OUT/session.log
    candump -L vcan0 >"$cap" &
    local dump=$!
    # candump has no ready signal: send a marker until it shows in the
    # capture. A standard-id frame, which the J1939 layer ignores.
    local i
    for i in $(seq 1 100); do
        cansend vcan0 7FF#00
        grep -q ' vcan0 7FF#00' "$cap" && break
        sleep 0.1
    done
    grep -q ' vcan0 7FF#00' "$cap" || { echo "candump never started" >"$REASON_FILE"; return 1; }

    "$BMSGW_BIN" --log-level info sim bms --can vcan0 --soc-start 40 --soc-end 43 \
        --current 150 --duration 3s --wait 30s >"$OUT/sim-bms.out" 2>&1 &
    local bms=$!
    "$BMSGW_BIN" --log-level info sim pile --can vcan0 --charger-number 12345678 \
        --region-code 310 >"$OUT/sim-pile.out" 2>&1 &
    local pile=$!
    local rc_bms=0 rc_pile=0
    wait "$bms" || rc_bms=$?
    wait "$pile" || rc_pile=$?
    sleep 0.3
    kill "$dump" 2>/dev/null
    wait "$dump" 2>/dev/null
    echo "--- sim bms (exit $rc_bms)"; cat "$OUT/sim-bms.out"
    echo "--- sim pile (exit $rc_pile)"; cat "$OUT/sim-pile.out"
    echo "--- capture: $(wc -l <"$cap") frames"
    if [ "$rc_bms" -ne 0 ] || [ "$rc_pile" -ne 0 ]; then
        echo "bms exit $rc_bms: $(tail -n 1 "$OUT/sim-bms.out"); pile exit $rc_pile: $(tail -n 1 "$OUT/sim-pile.out")" >"$REASON_FILE"
        return 1
    fi
    grep -q 'session completed' "$OUT/sim-bms.out" && grep -q 'session completed' "$OUT/sim-pile.out"
}

# Decode that capture and check that every phase appears, in order.
step_decode_capture() {
    local cap=$OUT/session.log decoded=$OUT/session.decoded
    [ -s "$cap" ] || { echo "no capture from sim-session" >"$REASON_FILE"; return 1; }
    "$BMSGW_BIN" decode "$cap" >"$decoded" || { echo "bmsgw decode failed" >"$REASON_FILE"; return 1; }
    "$BMSGW_BIN" decode --changes "$cap"
    local want='phases: handshake -> recognition -> configuration -> charging -> stopping -> statistics'
    grep -qx "$want" "$decoded" || {
        echo "expected '$want', got '$(grep '^phases:' "$decoded")'" >"$REASON_FILE"
        return 1
    }
    if grep -q 'MALFORMED\|incomplete' "$decoded"; then
        echo "capture has malformed messages or incomplete transfers" >"$REASON_FILE"
        grep 'MALFORMED\|incomplete' "$decoded"
        return 1
    fi
    # The TP-carried messages were reassembled, in both directions' flow.
    local m
    for m in BRM BCP BCS; do
        grep -q " BMS→pile  $m " "$decoded" || { echo "no $m in the decoded capture" >"$REASON_FILE"; return 1; }
    done
}

# Vehicle authentication: dev keys and a credential, as the cloud would issue.
step_auth_keys() {
    local pki=$OUT/pki
    "$BMSGW_BIN" pki dev --out "$pki" || return 1
    "$BMSGW_BIN" sim ticket --root-key-file "$pki/pile-1-root.key" --key-offset 3 \
        --charger-number 12345678 --valid-for 10m --out "$pki/vehicle.credential" || return 1
    "$BMSGW_BIN" sim ticket --root-key-file "$pki/pile-1-root.key" --key-offset 3 \
        --charger-number 12345678 --start-ago 2h --valid-for 1h --out "$pki/expired.credential" || return 1
    stat -c '%a %n' "$pki"/*
    [ "$(stat -c %a "$pki/pile-1-root.key")" = 600 ] || { echo "root key is not 0600" >"$REASON_FILE"; return 1; }
}

# Starts candump on vcan0 into $1 and waits until it records; sets DUMP_PID.
start_capture() {
    candump -L vcan0 >"$1" &
    DUMP_PID=$!
    local i
    for i in $(seq 1 100); do
        cansend vcan0 7FF#00
        grep -q ' vcan0 7FF#00' "$1" && return 0
        sleep 0.1
    done
    echo "candump never started" >"$REASON_FILE"
    return 1
}

stop_capture() {
    sleep 0.3
    kill "$DUMP_PID" 2>/dev/null
    wait "$DUMP_PID" 2>/dev/null
}

# Pile requiring authentication, BMS, and the vehicle side: three processes.
step_auth_session() {
    local pki=$OUT/pki cap=$OUT/auth-session.log
    start_capture "$cap" || return 1
    "$BMSGW_BIN" --log-level info sim pile --can vcan0 --charger-number 12345678 \
        --require-auth --root-key-file "$pki/pile-1-root.key" --key-offset 3 >"$OUT/auth-pile.out" 2>&1 &
    local pile=$!
    "$BMSGW_BIN" --log-level info sim bms --can vcan0 --soc-start 60 --soc-end 62 \
        --duration 2s --wait 30s >"$OUT/auth-bms.out" 2>&1 &
    local bms=$!
    "$BMSGW_BIN" --log-level info sim vehicle --can vcan0 --credential "$pki/vehicle.credential" \
        --wait 30s >"$OUT/auth-vehicle.out" 2>&1 &
    local vehicle=$!
    local rc_p=0 rc_b=0 rc_v=0
    wait "$vehicle" || rc_v=$?
    wait "$pile" || rc_p=$?
    wait "$bms" || rc_b=$?
    stop_capture
    local f
    for f in pile bms vehicle; do echo "--- $f"; cat "$OUT/auth-$f.out"; done
    "$BMSGW_BIN" decode --changes "$cap" | tee "$OUT/auth-session.decoded"
    if [ "$rc_p$rc_b$rc_v" != 000 ]; then
        echo "exit codes pile=$rc_p bms=$rc_b vehicle=$rc_v: $(tail -n 1 "$OUT/auth-pile.out")" >"$REASON_FILE"
        return 1
    fi
    local want='phases: handshake -> recognition -> configuration -> charging -> stopping -> statistics'
    grep -qx "$want" "$OUT/auth-session.decoded" || { echo "phases missing in the capture" >"$REASON_FILE"; return 1; }
    # The authentication messages are on the wire between BRM and CRM(0xAA).
    grep -q 'AuthRequest' "$OUT/auth-session.decoded" && grep -q 'AuthResult' "$OUT/auth-session.decoded" || {
        echo "no authentication messages in the capture" >"$REASON_FILE"
        return 1
    }
}

# With no gateway on the bus, a pile requiring authentication refuses: the
# BMS never gets CRM(0xAA), both simulators fail with a reason.
step_auth_refused_without_gateway() {
    local pki=$OUT/pki
    "$BMSGW_BIN" sim pile --can vcan0 --charger-number 12345678 \
        --require-auth --root-key-file "$pki/pile-1-root.key" --key-offset 3 >"$OUT/noauth-pile.out" 2>&1 &
    local pile=$!
    "$BMSGW_BIN" sim bms --can vcan0 --wait 30s >"$OUT/noauth-bms.out" 2>&1 &
    local bms=$!
    local rc_p=0 rc_b=0
    wait "$pile" || rc_p=$?
    wait "$bms" || rc_b=$?
    cat "$OUT/noauth-pile.out" "$OUT/noauth-bms.out"
    [ "$rc_p" -ne 0 ] && [ "$rc_b" -ne 0 ] || { echo "expected both to fail: pile=$rc_p bms=$rc_b" >"$REASON_FILE"; return 1; }
    grep -q 'vehicle not authenticated' "$OUT/noauth-pile.out" || { echo "pile gave no auth reason" >"$REASON_FILE"; return 1; }
    grep -q 'timed out waiting for CRM' "$OUT/noauth-bms.out" || { echo "BMS did not time out on CRM" >"$REASON_FILE"; return 1; }
}

# An expired credential is refused with its own code; a loose key file is refused.
step_auth_expired_and_loose_key() {
    local pki=$OUT/pki
    "$BMSGW_BIN" sim pile --can vcan0 --charger-number 12345678 \
        --require-auth --root-key-file "$pki/pile-1-root.key" --key-offset 3 >"$OUT/expired-pile.out" 2>&1 &
    local pile=$!
    "$BMSGW_BIN" sim bms --can vcan0 --wait 30s >"$OUT/expired-bms.out" 2>&1 &
    local bms=$!
    local rc_v=0
    "$BMSGW_BIN" sim vehicle --can vcan0 --credential "$pki/expired.credential" --wait 30s \
        >"$OUT/expired-vehicle.out" 2>&1 || rc_v=$?
    wait "$pile"; wait "$bms"
    cat "$OUT/expired-vehicle.out" "$OUT/expired-pile.out"
    [ "$rc_v" -ne 0 ] && grep -q 'Expired' "$OUT/expired-vehicle.out" || {
        echo "expired credential not refused as Expired (exit $rc_v)" >"$REASON_FILE"
        return 1
    }
    cp "$pki/pile-1-root.key" "$OUT/loose.key" && chmod 644 "$OUT/loose.key"
    local out rc=0
    out=$("$BMSGW_BIN" sim pile --can vcan0 --require-auth --root-key-file "$OUT/loose.key" --key-offset 3 2>&1) || rc=$?
    echo "$out"
    [ "$rc" -ne 0 ] && echo "$out" | grep -q 'chmod 600' || { echo "loose key file was not refused" >"$REASON_FILE"; return 1; }
}

step sim-session step_sim_session
step decode-capture step_decode_capture
BMSGW_VCAN=vcan0 BMSGW_LANE_TMP=$OUT step j1939-interop step_cargo_tests j1939 "$BMSGW_TEST_VCAN_J1939"
step auth-keys step_auth_keys
step auth-session step_auth_session
step auth-refused-without-gateway step_auth_refused_without_gateway
step auth-expired-and-loose-key step_auth_expired_and_loose_key

touch "$OUT/DONE"
echo "BMSGW_GUEST_DONE"
