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

# The peers of the daemon steps (pki dev, sim cloud, sim bms, sim pile) run
# from BMSGW_SIM_BIN: the arm64 lane (arm64.sh) runs `bmsgw run` from a lean
# build, which has no `pki` or `sim` subcommands.
BMSGW_SIM_BIN=${BMSGW_SIM_BIN:-$BMSGW_BIN}

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
    if [ -n "${BMSGW_VCAN_ONLY:-}" ] && [ "$name" != kernel-can ] && ! [[ $name =~ $BMSGW_VCAN_ONLY ]]; then
        echo "step $name: skipped (BMSGW_VCAN_ONLY)" >>"$STEPS/timings.txt"
        return 0
    fi
    local log=$STEPS/$name.log
    REASON_FILE=$STEPS/$name.reason
    : >"$REASON_FILE"
    local t0 t1 rc
    t0=$(date +%s.%N)
    # A subshell, so a step cannot change the environment of later ones;
    # a watchdog ends it after STEP_TIMEOUT (+30 s, so that a cargo-test
    # step's own timeout reports first).
    local timed_out=$STEPS/$name.timed-out
    rm -f "$timed_out"
    ( "$fn" "$@" ) >"$log" 2>&1 &
    local pid=$!
    (
        sleep $((STEP_TIMEOUT + 30)) &
        wait $!
        if kill -0 "$pid" 2>/dev/null; then
            touch "$timed_out"
            pkill -TERM -P "$pid"
            kill -TERM "$pid"
        fi
    ) &
    local dog=$!
    wait "$pid"
    rc=$?
    pkill -P "$dog" 2>/dev/null
    kill "$dog" 2>/dev/null
    wait "$dog" 2>/dev/null
    if [ -e "$timed_out" ]; then
        echo "step timed out after $((STEP_TIMEOUT + 30))s" >"$REASON_FILE"
        rc=124
    fi
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
# $OUT is a 9p share: files work, Unix sockets cannot be bound there (mount a
# tmpfs, as daemon-start does). mosquitto and jq come from the host (run.sh
# installs them).

step kernel-can step_kernel_can
step can-utils-loopback step_can_utils_loopback
BMSGW_VCAN=vcan0 step socketcan step_cargo_tests socketcan "$BMSGW_TEST_VM" vcan_socketcan::

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

# The README's demo on real SocketCAN: the gateway bridges vcan0 (BMS side)
# and vcan1 (pile side) while every scenario runs. Its temporary state (redb,
# the control socket) lives on a tmpfs: $OUT is 9p and / is read-only.
step_demo_socketcan() {
    local tmp=$OUT/demo-tmp
    mkdir -p "$tmp" && mount -t tmpfs -o mode=0700 tmpfs "$tmp" || {
        echo "cannot mount a tmpfs on $tmp" >"$REASON_FILE"
        return 1
    }
    local rc=0
    TMPDIR=$tmp "$BMSGW_BIN" demo --can vcan0 --can-pile vcan1 || rc=$?
    umount "$tmp"
    [ "$rc" -eq 0 ] || { echo "bmsgw demo --can vcan0 --can-pile vcan1 exited $rc" >"$REASON_FILE"; return 1; }
}

step sim-session step_sim_session
step decode-capture step_decode_capture
BMSGW_VCAN=vcan0 BMSGW_LANE_TMP=$OUT step j1939-interop step_cargo_tests j1939 "$BMSGW_TEST_VM" vcan_j1939::
step auth-keys step_auth_keys
step auth-session step_auth_session
step auth-refused-without-gateway step_auth_refused_without_gateway
step auth-expired-and-loose-key step_auth_expired_and_loose_key
step demo-socketcan step_demo_socketcan

# --- the daemon: real processes, as deployed ------------------------------
# mosquitto (TLS 1.3 only, mutual TLS, the dynamic-security ACLs and
# mosquitto.conf of `pki dev`, persistence),
# `bmsgw sim cloud`, `bmsgw run` in bridge mode between vcan0 (BMS side) and
# vcan1 (pile side), and the BMS and pile simulators, each its own process.
# The steps share one setup (daemon-start) and run in order: a step after a
# failed one may fail only because of it.
#
# Files in $OUT/daemon: pki/, mosquitto.conf, gateway.toml, state/, run/
# (control socket), and the logs: mosquitto-N.log, cloud.log, daemon-N.log
# (one per start), sims-<tag>-{bms,pile}.out. A failing step prints them.

D=$OUT/daemon
D_PKI=$D/pki
D_PORT=8883
D_GW=$D/gateway.toml
D_SOCK=$D/run/control.sock
D_MOSQ_CONF=$D/mosquitto.conf

# spawn NAME LOG CMD...: runs CMD in the background with its output in LOG
# (appended). $D/NAME.pid holds its pid; $D/NAME.rc appears with its exit
# status when it ends, so a later step (another shell) can tell how it ended.
spawn() {
    local name=$1 log=$2
    shift 2
    rm -f "$D/$name.pid" "$D/$name.rc"
    (
        "$@" >>"$log" 2>&1 </dev/null &
        local pid=$!
        echo "$pid" >"$D/$name.pid.tmp" && mv "$D/$name.pid.tmp" "$D/$name.pid"
        wait "$pid"
        echo $? >"$D/$name.rc"
    ) >/dev/null 2>&1 &
    local i
    for i in $(seq 1 100); do
        [ -s "$D/$name.pid" ] && return 0
        sleep 0.1
    done
    echo "$name: no pid after 10 s" >"$REASON_FILE"
    return 1
}

pid_of() { cat "$D/$1.pid" 2>/dev/null; }
running() {
    local pid
    pid=$(pid_of "$1") && [ -n "$pid" ] && [ ! -e "$D/$1.rc" ] && kill -0 "$pid" 2>/dev/null
}

# stop_proc NAME SIGNAL SECS: signals NAME and waits for it to end; 1 if
# it did not end in time.
stop_proc() {
    local name=$1 sig=$2 secs=$3 pid i
    pid=$(pid_of "$name") || return 0
    [ -e "$D/$name.rc" ] && return 0
    kill "-$sig" "$pid" 2>/dev/null
    for i in $(seq 1 $((secs * 10))); do
        [ -e "$D/$name.rc" ] && return 0
        sleep 0.1
    done
    return 1
}

# wait_for DESC SECS CMD...: polls CMD until it succeeds; on timeout writes
# "timed out after SECS s waiting for DESC" as the reason and returns 1.
wait_for() {
    local desc=$1 secs=$2
    shift 2
    local end=$((SECONDS + secs))
    while :; do
        "$@" >/dev/null 2>&1 && return 0
        [ "$SECONDS" -lt "$end" ] || break
        sleep 0.3
    done
    echo "timed out after ${secs}s waiting for $desc" >"$REASON_FILE"
    echo "!!! timed out after ${secs}s waiting for $desc"
    return 1
}

# The daemon's status as JSON (bmsgw status --json), and one value of it:
#   st JQ_FILTER  prints the filter's result; fails if the daemon does not answer
#   st_true JQ_FILTER  succeeds if the filter gives true
status_json() { timeout 10 "$BMSGW_BIN" status --socket "$D_SOCK" --json 2>/dev/null; }
st() {
    local j
    j=$(status_json) || return 1
    jq -r "$1" <<<"$j"
}
st_true() { [ "$(st "$1")" = true ]; }
# Vouchers left for charger 1 (0 when the wallet has none).
J_VOUCHERS='[.vouchers[]? | select(.charger_number == 1) | .remaining] | add // 0'
J_OUTBOX='.outbox.records // 0'

# Session records the cloud has received (distinct record ids; the cloud
# refuses a second copy of one).
cloud_records() {
    grep 'session record received' "$D/cloud.log" 2>/dev/null | grep -o 'record=[0-9a-f]*' | sort -u | wc -l
}
cloud_records_above() { [ "$(cloud_records)" -gt "$1" ]; }
cloud_has() { grep -q "$1" "$D/cloud.log" 2>/dev/null; }

mosquitto_bin() { command -v mosquitto 2>/dev/null || echo /usr/sbin/mosquitto; }
MOSQ_STARTS_FILE=$D/mosquitto.starts

start_mosquitto() {
    local n
    n=$(($(cat "$MOSQ_STARTS_FILE" 2>/dev/null || echo 0) + 1))
    echo "$n" >"$MOSQ_STARTS_FILE"
    local log=$D/mosquitto-$n.log
    echo "--- starting mosquitto ($log)"
    spawn mosquitto "$log" "$(mosquitto_bin)" -c "$D_MOSQ_CONF" || return 1
    # "running" comes after the listeners are open.
    wait_for "mosquitto to start" 30 grep -q "mosquitto version .* running" "$log" || {
        running mosquitto || echo "mosquitto exited: $(tail -n 1 "$log")" >"$REASON_FILE"
        return 1
    }
}

stop_mosquitto() {
    echo "--- stopping mosquitto (SIGTERM)"
    stop_proc mosquitto TERM 20 || {
        echo "mosquitto did not stop on SIGTERM" >"$REASON_FILE"
        return 1
    }
}

# start_daemon: `bmsgw run` in the background (log daemon-N.log), then waits
# until it answers on its control socket.
start_daemon() {
    local n
    n=$(($(cat "$D/daemon.starts" 2>/dev/null || echo 0) + 1))
    echo "$n" >"$D/daemon.starts"
    local log=$D/daemon-$n.log
    echo "--- starting bmsgw run ($log)"
    spawn daemon "$log" "$BMSGW_BIN" run --config "$D_GW" || return 1
    wait_for "bmsgw run to answer on $D_SOCK" 60 answers_or_exited
    status_json >/dev/null || {
        running daemon || echo "bmsgw run exited $(cat "$D/daemon.rc" 2>/dev/null): $(tail -n 1 "$log")" >"$REASON_FILE"
        return 1
    }
}
answers_or_exited() { status_json || ! running daemon; }

# run_sims TAG [BMS ARGS...]: the pile sim on vcan1 (authentication
# required, charger 1) and the BMS sim on vcan0; waits for both. Sets
# RC_BMS and RC_PILE; the outputs are sims-TAG-{bms,pile}.out.
run_sims() {
    local tag=$1
    shift
    local bms_args=("$@")
    [ ${#bms_args[@]} -gt 0 ] || bms_args=(--soc-start 60 --soc-end 62 --duration 2s)
    "$BMSGW_SIM_BIN" --log-level info sim pile --can vcan1 --charger-number 1 --region-code 310 \
        --require-auth --root-key-file "$D_PKI/pile-1-root.key" --key-offset 0 \
        >"$D/sims-$tag-pile.out" 2>&1 &
    SIM_PILE=$!
    "$BMSGW_SIM_BIN" --log-level info sim bms --can vcan0 "${bms_args[@]}" --wait 30s \
        >"$D/sims-$tag-bms.out" 2>&1 &
    SIM_BMS=$!
}

# wait_bounded PID SECS: waits for PID (a child), killing it after SECS;
# returns its exit status.
wait_bounded() {
    local pid=$1 secs=$2 i
    for i in $(seq 1 $((secs * 5))); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.2
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "!!! pid $pid still running after ${secs}s: killed"
        kill "$pid" 2>/dev/null
    fi
    wait "$pid"
}

wait_sims() {
    local tag=$1
    RC_BMS=0
    RC_PILE=0
    wait_bounded "$SIM_BMS" 120 || RC_BMS=$?
    wait_bounded "$SIM_PILE" 30 || RC_PILE=$?
    echo "--- sim bms (exit $RC_BMS)"; cat "$D/sims-$tag-bms.out"
    echo "--- sim pile (exit $RC_PILE)"; cat "$D/sims-$tag-pile.out"
}

# session TAG: one whole session; fails unless both simulators completed.
session() {
    local tag=$1
    echo "--- session $tag"
    run_sims "$tag"
    wait_sims "$tag"
    if [ "$RC_BMS" -ne 0 ] || [ "$RC_PILE" -ne 0 ]; then
        echo "session $tag: bms exit $RC_BMS ($(tail -n 1 "$D/sims-$tag-bms.out")); pile exit $RC_PILE ($(tail -n 1 "$D/sims-$tag-pile.out"))" >"$REASON_FILE"
        return 1
    fi
}

# last_session_since T: the daemon's last_session started at or after Unix
# time T and no session is running.
last_session_since() { st_true "(.session == null) and ((.last_session.started_at // 0) >= $1)"; }

show_status() { echo "--- bmsgw status"; timeout 10 "$BMSGW_BIN" status --socket "$D_SOCK" 2>&1; }

dump_logs() {
    echo
    echo "=================== logs ==================="
    local f
    for f in "$D"/daemon-*.log "$D"/cloud.log "$D"/mosquitto-*.log; do
        [ -e "$f" ] || continue
        echo "--- $f (last 200 lines)"
        tail -n 200 "$f"
    done
}

# daemon_step NAME FUNCTION: a step whose log ends with every process's log
# when it fails.
daemon_step() {
    local name=$1 fn=$2
    step "$name" with_logs "$fn"
}
with_logs() {
    local rc=0
    "$1" || rc=$?
    [ "$rc" -eq 0 ] || { show_status; dump_logs; }
    return "$rc"
}

# own_daemon DIR BODY: daemon-start's whole setup (PKI, broker, cloud,
# `bmsgw run`) in $OUT/DIR, its own directory so the logs do not mix with
# the daemon-* steps', then the function BODY; every process is stopped
# afterwards and the logs are shown on failure. For the suites in steps/:
# a step runs in a subshell, so the globals set here stay local to it.
own_daemon() {
    D=$OUT/$1
    D_PKI=$D/pki
    D_GW=$D/gateway.toml
    D_SOCK=$D/run/control.sock
    D_MOSQ_CONF=$D/mosquitto.conf
    MOSQ_STARTS_FILE=$D/mosquitto.starts
    if mountpoint -q "$D/run" 2>/dev/null; then umount "$D/run"; fi
    local rc=0
    step_daemon_start && "$2" || rc=$?
    [ "$rc" -eq 0 ] || { show_status; dump_logs; }
    local p
    for p in daemon cloud mosquitto; do
        stop_proc "$p" TERM 15 || stop_proc "$p" KILL 5
    done
    if mountpoint -q "$D/run" 2>/dev/null; then umount "$D/run"; fi
    return "$rc"
}

need_daemon() {
    [ -e "$D/started" ] || { echo "daemon-start did not pass" >"$REASON_FILE"; return 1; }
    running daemon || { echo "the daemon is not running (exit $(cat "$D/daemon.rc" 2>/dev/null))" >"$REASON_FILE"; return 1; }
}

# Setup: the PKI, the broker, the cloud and the daemon, each a process.
step_daemon_start() {
    rm -rf "$D"
    mkdir -p "$D/state" "$D/run"
    # $OUT is a 9p share, on which a Unix socket cannot be bound (ENXIO):
    # the control socket lives on a tmpfs, as /run/bmsgw does.
    mount -t tmpfs -o mode=0755 tmpfs "$D/run" || {
        echo "cannot mount a tmpfs on $D/run" >"$REASON_FILE"
        return 1
    }
    "$BMSGW_SIM_BIN" pki dev --out "$D_PKI" --broker-port "$D_PORT" >/dev/null || {
        echo "bmsgw pki dev failed" >"$REASON_FILE"
        return 1
    }
    # Three vouchers with each grant (the gateway asks for as many).
    sed -i 's/^vouchers_per_grant = .*/vouchers_per_grant = 3/' "$D_PKI/cloud.toml"
    grep -qx 'vouchers_per_grant = 3' "$D_PKI/cloud.toml" || {
        echo "cloud.toml has no vouchers_per_grant line to set" >"$REASON_FILE"
        return 1
    }

    # The shipped production broker config (config/mosquitto/mosquitto.conf:
    # TLS 1.3 only, client certificates whose CN is the user name and the
    # client id, the dynamic-security ACLs, persistence) as `pki dev` writes
    # it, with only its paths and listener moved into $D_PKI.
    cp "$D_PKI/mosquitto.conf" "$D_MOSQ_CONF" || {
        echo "pki dev wrote no mosquitto.conf" >"$REASON_FILE"
        return 1
    }
    grep -qx "listener $D_PORT 127.0.0.1" "$D_MOSQ_CONF" &&
        grep -qx "plugin_opt_config_file $D_PKI/dynamic-security.json" "$D_MOSQ_CONF" &&
        grep -qx "use_username_as_clientid true" "$D_MOSQ_CONF" || {
        echo "pki dev's mosquitto.conf lacks the listener, dynsec or client-id lines" >"$REASON_FILE"
        return 1
    }
    # Log to the step (the file already keeps the current user).
    cat >>"$D_MOSQ_CONF" <<EOF
log_dest stderr
log_type all
connection_messages true
EOF

    cat >"$D_GW" <<EOF
# bmsgw run config of the VM lane (tests/vcan/guest.sh)
[vehicle]
id = "veh-a"
hpke_key = "$D_PKI/vehicle-veh-a-hpke.key"
cloud_public_key = "$D_PKI/cloud-hpke.pub"

[can]
mode = "bridge"
bms_interface = "vcan0"
pile_interface = "vcan1"

[cloud]
host = "127.0.0.1"
port = $D_PORT
ca = "$D_PKI/ca.pem"
cert = "$D_PKI/vehicle-veh-a.pem"
key = "$D_PKI/vehicle-veh-a.key"
request_timeout = "2s"
want_vouchers = 3
keep_alive = "${D_KEEP_ALIVE:-30s}"
# Back within a few seconds of the broker's return (default 60 s).
reconnect_max = "5s"

[store]
path = "$D/state/state.redb"
wallet_key = "$D/state/wallet.key"

[control]
socket = "$D_SOCK"

[log]
level = "info"
EOF
    # A suite that reuses this setup may add sections (tests/vcan/steps/).
    [ -z "${D_GW_EXTRA:-}" ] || printf '%s\n' "$D_GW_EXTRA" >>"$D_GW"
    echo "--- bmsgw check-config"
    "$BMSGW_BIN" check-config "$D_GW" || {
        echo "bmsgw check-config $D_GW failed" >"$REASON_FILE"
        return 1
    }

    start_mosquitto || return 1
    echo "--- starting bmsgw sim cloud"
    spawn cloud "$D/cloud.log" "$BMSGW_SIM_BIN" --log-level info sim cloud --config "$D_PKI/cloud.toml" || return 1
    wait_for "sim cloud to connect to the broker" 60 cloud_has 'connected session_present' || return 1
    start_daemon || return 1
    wait_for "the daemon's cloud link to connect" 60 st_true '.cloud.state == "connected"' || return 1
    show_status
    running cloud || { echo "sim cloud exited" >"$REASON_FILE"; return 1; }
    touch "$D/started"
}

# An online session: the grant from the cloud, the record to the cloud, and
# vouchers for later.
step_daemon_online() {
    need_daemon || return 1
    local t0 before
    t0=$(date +%s)
    before=$(cloud_records)
    session online || return 1
    wait_for "the daemon's last_session to show this session" 30 last_session_since "$t0" || return 1
    show_status
    local result cred
    result=$(st '.last_session.result')
    cred=$(st '.last_session.credential')
    [ "$result" = completed ] && [ "$cred" = online ] || {
        echo "last_session: result '$result', credential '$cred' (want completed, online)" >"$REASON_FILE"
        return 1
    }
    wait_for "the cloud to receive the session record" 30 cloud_records_above "$before" || return 1
    local vouchers
    vouchers=$(st "$J_VOUCHERS")
    echo "vouchers for charger 1: $vouchers"
    [ "$vouchers" -gt 0 ] || { echo "no vouchers for charger 1 after an online session" >"$REASON_FILE"; return 1; }
}

# An offline session: broker down, a voucher, the record queued and
# delivered once the broker is back.
step_daemon_offline() {
    need_daemon || return 1
    local v0
    v0=$(st "$J_VOUCHERS")
    echo "vouchers for charger 1 before: $v0"
    [ "$v0" -gt 0 ] || { echo "no voucher to charge offline with" >"$REASON_FILE"; return 1; }
    stop_mosquitto || return 1
    wait_for "the daemon to see the broker gone" 60 st_true '.cloud.state != "connected"' || return 1
    local t0 before
    t0=$(date +%s)
    before=$(cloud_records)
    session offline || return 1
    wait_for "the daemon's last_session to show this session" 30 last_session_since "$t0" || return 1
    show_status
    local result cred outbox v1
    result=$(st '.last_session.result')
    cred=$(st '.last_session.credential')
    [ "$result" = completed ] && [ "$cred" = voucher ] || {
        echo "last_session: result '$result', credential '$cred' (want completed, voucher)" >"$REASON_FILE"
        return 1
    }
    v1=$(st "$J_VOUCHERS")
    [ "$v1" -eq $((v0 - 1)) ] || { echo "vouchers for charger 1 went from $v0 to $v1 (want one fewer)" >"$REASON_FILE"; return 1; }
    wait_for "the record in the outbox" 30 st_true "($J_OUTBOX) >= 1" || return 1
    [ "$(cloud_records)" -eq "$before" ] || { echo "the cloud got a record with the broker down?" >"$REASON_FILE"; return 1; }
    start_mosquitto || return 1
    wait_for "the cloud to receive the queued record" 90 cloud_records_above "$before" || return 1
    wait_for "an empty outbox" 60 st_true "($J_OUTBOX) == 0" || return 1
    wait_for "the daemon's cloud link to reconnect" 60 st_true '.cloud.state == "connected"' || return 1
    show_status
}

# kill -9 of the daemon in the middle of a voucher session, then a restart:
# the interrupted session's record is recovered and delivered, its voucher
# stays spent (once), and the daemon serves the next session.
step_daemon_kill9() {
    need_daemon || return 1
    local v0 before
    v0=$(st "$J_VOUCHERS")
    echo "vouchers for charger 1 before: $v0"
    [ "$v0" -gt 0 ] || { echo "no voucher to charge offline with" >"$REASON_FILE"; return 1; }
    stop_mosquitto || return 1
    wait_for "the daemon to see the broker gone" 60 st_true '.cloud.state != "connected"' || return 1
    before=$(cloud_records)

    # A longer charge, so that the kill lands in the charging phase.
    run_sims kill9 --soc-start 60 --soc-end 70 --duration 60s
    wait_for "a session in the charging phase with a voucher" 60 \
        st_true '.session.phase == "charging" and .session.credential == "voucher"' || {
        kill "$SIM_BMS" "$SIM_PILE" 2>/dev/null
        wait_sims kill9
        return 1
    }
    show_status
    echo "--- kill -9 the daemon"
    stop_proc daemon KILL 10 || { echo "the daemon survived kill -9?" >"$REASON_FILE"; return 1; }
    echo "daemon exit: $(cat "$D/daemon.rc")"
    # The simulators fail without the gateway; end them so that the next
    # daemon starts on a quiet bus.
    kill "$SIM_BMS" "$SIM_PILE" 2>/dev/null
    wait_sims kill9
    [ -S "$D_SOCK" ] && echo "the killed daemon left its control socket behind (expected)"

    start_daemon || return 1
    show_status
    local out v1
    out=$(st "$J_OUTBOX")
    v1=$(st "$J_VOUCHERS")
    echo "after restart: outbox records $out, vouchers for charger 1 $v1"
    grep -q 'sessions interrupted by a crash were queued' "$D/daemon-$(cat "$D/daemon.starts").log" || {
        echo "the restarted daemon did not recover the interrupted session (no 'sessions interrupted by a crash' in its log)" >"$REASON_FILE"
        return 1
    }
    [ "$out" -ge 1 ] || { echo "outbox empty after the restart: the interrupted session's record is lost" >"$REASON_FILE"; return 1; }
    [ "$v1" -eq $((v0 - 1)) ] || {
        echo "vouchers for charger 1: $v0 before the session, $v1 after the kill and restart (want exactly one fewer)" >"$REASON_FILE"
        return 1
    }

    start_mosquitto || return 1
    wait_for "the cloud to receive the recovered record" 90 cloud_records_above "$before" || return 1
    wait_for "an empty outbox" 60 st_true "($J_OUTBOX) == 0" || return 1
    wait_for "the daemon's cloud link to reconnect" 60 st_true '.cloud.state == "connected"' || return 1
    local v2
    v2=$(st "$J_VOUCHERS")
    [ "$v2" -eq $((v0 - 1)) ] || {
        echo "vouchers for charger 1 changed to $v2 after the record was delivered (want $((v0 - 1)))" >"$REASON_FILE"
        return 1
    }
    if grep -q 'already recorded' "$D/cloud.log"; then
        echo "the cloud got a session record twice" >"$REASON_FILE"
        return 1
    fi

    # The daemon works after recovery: one more whole session (online).
    local t0 after
    t0=$(date +%s)
    after=$(cloud_records)
    session after-kill9 || return 1
    wait_for "the daemon's last_session to show this session" 30 last_session_since "$t0" || return 1
    local result cred
    result=$(st '.last_session.result')
    cred=$(st '.last_session.credential')
    [ "$result" = completed ] && [ "$cred" = online ] || {
        echo "session after the restart: result '$result', credential '$cred' (want completed, online)" >"$REASON_FILE"
        return 1
    }
    wait_for "the cloud to receive that session's record" 30 cloud_records_above "$after" || return 1
    show_status
}

# sigterm_daemon: SIGTERM; the daemon must exit 0 within 15 s and remove
# its control socket.
sigterm_daemon() {
    local t0 t1 rc log
    log=$D/daemon-$(cat "$D/daemon.starts").log
    t0=$(date +%s.%N)
    stop_proc daemon TERM 15 || { echo "the daemon did not exit within 15 s of SIGTERM" >"$REASON_FILE"; return 1; }
    t1=$(date +%s.%N)
    rc=$(cat "$D/daemon.rc")
    echo "exit $rc after $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')s; the end of its log:"
    tail -n 6 "$log"
    [ "$rc" -eq 0 ] || { echo "exit $rc on SIGTERM (want 0)" >"$REASON_FILE"; return 1; }
    [ ! -e "$D_SOCK" ] || { echo "the control socket $D_SOCK is still there after SIGTERM" >"$REASON_FILE"; return 1; }
    grep -q 'INFO stopped' "$log" || { echo "no 'stopped' at the end of $log" >"$REASON_FILE"; return 1; }
}

# SIGTERM in the middle of a session: the daemon ends the session, queues
# its record and exits 0 within seconds, removing its control socket; the
# next start finds no interrupted session (a clean end, not a crash) and
# delivers the record. Then SIGTERM when idle, the same way.
step_daemon_sigterm() {
    need_daemon || return 1
    st_true '.cloud.state == "connected"' || { echo "the cloud link is not connected" >"$REASON_FILE"; return 1; }
    local before
    before=$(cloud_records)
    run_sims sigterm --soc-start 60 --soc-end 70 --duration 60s
    wait_for "a session in the charging phase" 60 st_true '.session.phase == "charging" and .session.credential != null' || {
        kill "$SIM_BMS" "$SIM_PILE" 2>/dev/null
        wait_sims sigterm
        return 1
    }
    show_status
    echo "--- SIGTERM in the charging phase"
    sigterm_daemon || { kill "$SIM_BMS" "$SIM_PILE" 2>/dev/null; wait_sims sigterm; return 1; }
    kill "$SIM_BMS" "$SIM_PILE" 2>/dev/null
    wait_sims sigterm
    grep -q 'session ended' "$D/daemon-$(cat "$D/daemon.starts").log" || {
        echo "the daemon did not end the session on SIGTERM (no 'session ended' in its log)" >"$REASON_FILE"
        return 1
    }

    start_daemon || return 1
    if grep -q 'sessions interrupted by a crash' "$D/daemon-$(cat "$D/daemon.starts").log"; then
        echo "after SIGTERM the next start recovered an interrupted session: the session was not ended cleanly" >"$REASON_FILE"
        return 1
    fi
    wait_for "the cloud to receive the record of the session SIGTERM ended" 90 cloud_records_above "$before" || return 1
    wait_for "an empty outbox" 60 st_true "($J_OUTBOX) == 0" || return 1
    show_status

    echo "--- SIGTERM when idle"
    sigterm_daemon
}

daemon_step daemon-start step_daemon_start
daemon_step daemon-online step_daemon_online
daemon_step daemon-offline step_daemon_offline
daemon_step daemon-kill9 step_daemon_kill9
daemon_step daemon-sigterm step_daemon_sigterm

# Whatever is still running (after a failure): stop it, so the VM can end.
for p in daemon cloud mosquitto; do
    stop_proc "$p" TERM 10 || stop_proc "$p" KILL 5
done

# Further suites, one file per concept (benchmarks, faults, attacks): each
# defines its step functions and runs them with `step`. They start with
# vcan0/vcan1 up and nothing else running, and must stop what they start.
for f in "$BMSGW_ROOT"/tests/vcan/steps/*.sh; do
    [ -e "$f" ] || continue
    # shellcheck source=/dev/null
    . "$f"
done

touch "$OUT/DONE"
echo "BMSGW_GUEST_DONE"
