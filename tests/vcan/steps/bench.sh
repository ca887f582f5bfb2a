# shellcheck shell=bash
# The VM lane's benchmark figures (issue 6, deliverable 1), sourced by
# tests/vcan/guest.sh after its own steps (vcan0/vcan1 up, nothing running).
# The ECU figures need real CAN interfaces for the daemon to open, and the
# bridge figure needs the kernel's can-gw as the reference, so both live
# here rather than in bench/run.sh on the host.
#
#   bench-start   its own broker, cloud and daemon (guest.sh's
#                 daemon-start, pointed at $OUT/bench), then the daemon of
#                 the default build is stopped: the figures are the ECU
#                 build's (`--no-default-features`, $BMSGW_ECU_BIN), which
#                 has the cloud link, the store and the control socket the
#                 lane's config uses, only no simulators.
#   bench-ecu     start -> READY: the ECU daemon run BENCH_READY_RUNS times
#                 with NOTIFY_SOCKET on a datagram socket this step listens
#                 on; the time from exec to the READY=1 datagram. Then RSS
#                 (VmRSS/VmHWM from /proc/PID/status): idle with the cloud
#                 link connected, and during one authenticated session
#                 (BMS and pile simulators of the default build).
#   bench-bridge  frames/s from vcan0 to vcan1 through (a) the ECU daemon in
#                 bridge mode and (b) the kernel's can-gw
#                 (`cangw -A -s vcan0 -d vcan1 -e`), the same traffic,
#                 alternating, BENCH_REPS times each; the ratio of medians.
#
# Figures are reported, never asserted: the guest runs under TCG software
# emulation, so absolute times are many times the hardware's; only ratios
# within one guest run compare. A step fails on real failures only (no
# READY, the daemon died, a session failed, 0 frames through).
#
# Results: "BENCH key=value" lines in the step logs, and the same pairs in
# $OUT/bench.txt, which bench/vm-figures.sh turns into the rows of
# docs/performance.md.

BENCH_READY_RUNS=${BMSGW_BENCH_READY_RUNS:-10}
BENCH_REPS=${BMSGW_BENCH_REPS:-3}
# How long the generator offers frames in one bridge or can-gw run.
BENCH_GEN_SECS=${BMSGW_BENCH_GEN_SECS:-5}
# The traffic: BCL (PGN 0x1000, priority 6) from the BMS (0xF4) to the pile
# (0x56), 400.0 V, 100 A (raw 3000: GB/T counts charging current negative),
# CC mode, a single frame the bridge forwards as is once the firewall has
# judged it (allowlist, decode, rate bucket) and the BMS side's field check
# has read it. Between sessions the session observer ignores it, so no
# session starts.
BENCH_ID=181056F4
BENCH_DATA=A00FB80B02

D=$OUT/bench
D_PKI=$D/pki
D_GW=$D/gateway.toml
D_SOCK=$D/run/control.sock
D_MOSQ_CONF=$D/mosquitto.conf
MOSQ_STARTS_FILE=$D/mosquitto.starts
BENCH_FILE=$OUT/bench.txt

# bench_out KEY VALUE: one figure, to the step log and to $BENCH_FILE.
bench_out() {
    echo "BENCH $1=$2"
    printf '%s=%s\n' "$1" "$2" >>"$BENCH_FILE"
}

# bench_kib PID FIELD: a field of /proc/PID/status (VmRSS, VmHWM) in KiB.
bench_kib() { awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status" 2>/dev/null; }

# median and max of the numbers on stdin.
bench_median() { sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
bench_max() { sort -g | tail -n 1; }

step_bench_start() {
    # A tmpfs left mounted by an earlier run of this function.
    if mountpoint -q "$D/run" 2>/dev/null; then umount "$D/run"; fi
    D_GW_EXTRA=
    step_daemon_start || return 1
    stop_proc daemon TERM 15 || { echo "the default build's daemon did not stop" >"$REASON_FILE"; return 1; }
    # The ECU daemon's own config: the lane's, with its state on the tmpfs
    # (a gateway's state is on local flash; $D is the 9p share, whose
    # latency under emulation would dominate start-up).
    sed -e "s|^path = .*|path = \"$D/run/state/state.redb\"|" \
        -e "s|^wallet_key = .*|wallet_key = \"$D/run/state/wallet.key\"|" "$D_GW" >"$D/ecu.toml"
    mkdir -p "$D/run/state"
    "$BMSGW_ECU_BIN" check-config "$D/ecu.toml" || {
        echo "the ECU build refuses the lane's config ($D/ecu.toml)" >"$REASON_FILE"
        return 1
    }
    : >"$BENCH_FILE"
    bench_out lane_date "$(date -u +%Y-%m-%dT%H:%MZ)"
    bench_out commit "${BMSGW_COMMIT:-unknown}"
    bench_out host_load_before_vm "${BMSGW_HOST_LOADAVG:-unknown}"
    bench_out guest_cpus "$(nproc)"
    bench_out guest_kernel "$(uname -r)"
    bench_out guest_load "$(cut -d' ' -f1-3 /proc/loadavg)"
    bench_out ecu_binary_bytes "$(stat -c %s "$BMSGW_ECU_BIN")"
    # ELF e_machine: the arm64 lane measures an aarch64 or an armv7 build.
    local machine
    machine=$(od -An -tx1 -j18 -N2 "$BMSGW_ECU_BIN" | tr -d ' \n')
    case $machine in
    3e00) machine=x86_64 ;; b700) machine=aarch64 ;; 2800) machine=arm ;;
    esac
    bench_out ecu_binary_machine "$machine"
    bench_out guest_machine "$(uname -m)"
    # The emulation's slowdown on a CPU-bound reference (run.sh timed the
    # same code on the host just before the VM booted).
    if [ -n "${BMSGW_BENCH_REF_PY:-}" ] && [ -n "${BMSGW_HOST_REF_MS:-}" ]; then
        local ref
        ref=$(python3 -c "$BMSGW_BENCH_REF_PY") || ref=
        bench_out ref_ms_host "$BMSGW_HOST_REF_MS"
        bench_out ref_ms_guest "$ref"
        [ -z "$ref" ] || bench_out tcg_slowdown "$(awk -v g="$ref" -v h="$BMSGW_HOST_REF_MS" 'BEGIN { printf "%.1f", g / h }')"
    fi
    touch "$D/bench-started"
}

need_bench() {
    [ -e "$D/bench-started" ] || { echo "bench-start did not pass" >"$REASON_FILE"; return 1; }
}

# Runs the command after "--" RUNS times with NOTIFY_SOCKET set, printing
# the milliseconds from exec to READY=1 for each, one per line; SIGTERM
# after READY, exit 0 required. Fails (non-zero) when a run dies or sends
# no READY within 30 s.
BENCH_READY_PY='
import os, signal, socket, subprocess, sys, time
sock_path, runs, log_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
cmd = sys.argv[5:]
if os.path.exists(sock_path):
    os.unlink(sock_path)
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sock_path)
s.settimeout(0.05)
env = dict(os.environ, NOTIFY_SOCKET=sock_path)
with open(log_path, "ab") as log:
    for run in range(runs):
        t0 = time.monotonic()
        p = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        ready = None
        while ready is None:
            try:
                msg = s.recv(4096)
            except socket.timeout:
                msg = b""
            if b"READY=1" in msg.split(b"\n"):
                ready = time.monotonic()
            elif p.poll() is not None:
                sys.exit("run %d: exited %d before READY (see %s)" % (run, p.returncode, log_path))
            elif time.monotonic() - t0 > 30:
                p.kill()
                sys.exit("run %d: no READY within 30 s" % run)
        print("%.1f" % ((ready - t0) * 1000), flush=True)
        p.send_signal(signal.SIGTERM)
        try:
            rc = p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            sys.exit("run %d: no exit within 15 s of SIGTERM" % run)
        if rc != 0:
            sys.exit("run %d: exit %d on SIGTERM" % (run, rc))
'

step_bench_ecu() {
    need_bench || return 1
    echo "--- start -> READY, $BENCH_READY_RUNS runs of the ECU build"
    local ms
    ms=$(python3 -c "$BENCH_READY_PY" "$D/run/notify.sock" "$BENCH_READY_RUNS" "$D/ready-runs.log" \
        -- "$BMSGW_ECU_BIN" run --config "$D/ecu.toml" 2>"$D/ready.err") || {
        cat "$D/ready.err"
        echo "--- the daemons' log ($D/ready-runs.log), last 30 lines"
        tail -n 30 "$D/ready-runs.log"
        echo "start -> READY: $(tail -n 1 "$D/ready.err")" >"$REASON_FILE"
        return 1
    }
    echo "$ms"
    [ "$(wc -l <<<"$ms")" -eq "$BENCH_READY_RUNS" ] || { echo "expected $BENCH_READY_RUNS READY times, got: $ms" >"$REASON_FILE"; return 1; }
    bench_out ecu_ready_runs "$BENCH_READY_RUNS"
    bench_out ecu_ready_ms_all "$(paste -sd, <<<"$ms")"
    # The first run reads the binary through the 9p share (cold page cache).
    bench_out ecu_ready_ms_first "$(head -n 1 <<<"$ms")"
    bench_out ecu_ready_ms_median "$(bench_median <<<"$ms")"
    bench_out ecu_ready_ms_max "$(bench_max <<<"$ms")"

    echo "--- RSS idle: the ECU daemon, cloud link connected"
    BMSGW_BIN=$BMSGW_ECU_BIN D_GW=$D/ecu.toml start_daemon || return 1
    BMSGW_BIN=$BMSGW_ECU_BIN wait_for "the ECU daemon's cloud link to connect" 60 \
        st_true '.cloud.state == "connected"' || return 1
    local pid
    pid=$(pid_of daemon)
    # Steady state: a few seconds after start-up, sampled once a second.
    sleep 3
    local i rss rss_idle=0
    for i in 1 2 3 4 5; do
        rss=$(bench_kib "$pid" VmRSS)
        echo "idle sample $i: VmRSS ${rss} KiB"
        [ "${rss:-0}" -gt "$rss_idle" ] && rss_idle=$rss
        sleep 1
    done
    bench_out ecu_rss_idle_kib "$rss_idle"
    bench_out ecu_hwm_idle_kib "$(bench_kib "$pid" VmHWM)"

    echo "--- RSS during a session through the ECU daemon"
    local t0 rss_session=0
    t0=$(date +%s)
    run_sims bench
    while kill -0 "$SIM_BMS" 2>/dev/null; do
        rss=$(bench_kib "$pid" VmRSS)
        [ "${rss:-0}" -gt "$rss_session" ] && rss_session=$rss
        sleep 0.2
    done
    wait_sims bench
    [ "$RC_BMS" -eq 0 ] && [ "$RC_PILE" -eq 0 ] || {
        echo "session through the ECU daemon: bms exit $RC_BMS, pile exit $RC_PILE" >"$REASON_FILE"
        return 1
    }
    running daemon || { echo "the ECU daemon died in the session" >"$REASON_FILE"; return 1; }
    BMSGW_BIN=$BMSGW_ECU_BIN wait_for "the ECU daemon's last_session to show this session" 30 \
        last_session_since "$t0" || return 1
    local result cred
    result=$(BMSGW_BIN=$BMSGW_ECU_BIN st '.last_session.result')
    cred=$(BMSGW_BIN=$BMSGW_ECU_BIN st '.last_session.credential')
    [ "$result" = completed ] && [ "$cred" = online ] || {
        echo "session through the ECU daemon: result '$result', credential '$cred' (want completed, online)" >"$REASON_FILE"
        return 1
    }
    bench_out ecu_rss_session_max_kib "$rss_session"
    bench_out ecu_hwm_after_session_kib "$(bench_kib "$pid" VmHWM)"
    stop_proc daemon TERM 15 || { echo "the ECU daemon did not stop on SIGTERM" >"$REASON_FILE"; return 1; }
}

# One forwarding run: cangen offers BENCH_ID#BENCH_DATA on vcan0 as fast as
# it can for GEN_SECS seconds; the forwarded frames are vcan1's tx_packets
# (what a real bus would carry; read from sysfs, so counting costs nothing
# per frame). Prints "sent=N forwarded=N secs=S fps=F": fps over the span
# from the first to the last forwarded frame (polled every 20 ms), after
# vcan1 was quiet for 1 s. Exits non-zero when nothing was forwarded.
BENCH_FWD_PY='
import subprocess, sys, time
gen_secs = float(sys.argv[1])
cmd = sys.argv[3:]
def count(ifc):
    with open("/sys/class/net/%s/statistics/tx_packets" % ifc) as f:
        return int(f.read())
sent0, fwd0 = count("vcan0"), count("vcan1")
gen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
t_start = time.monotonic()
first = last = None
seen = fwd0
while True:
    time.sleep(0.02)
    now = time.monotonic()
    n = count("vcan1")
    if n != seen:
        seen = n
        last = now
        if first is None:
            first = now
    if gen.poll() is None and now - t_start >= gen_secs:
        gen.terminate()
        gen.wait()
    if gen.poll() is not None and now - (last or t_start) >= 1.0:
        break
    if now - t_start > gen_secs + 60:
        sys.exit("vcan1 still busy %.0f s after the generator started" % (now - t_start))
sent, fwd = count("vcan0") - sent0, seen - fwd0
if fwd == 0 or first is None or last is None or last <= first:
    sys.exit("sent=%d forwarded=%d: nothing (or too little) reached vcan1" % (sent, fwd))
print("sent=%d forwarded=%d secs=%.3f fps=%.0f" % (sent, fwd, last - first, fwd / (last - first)))
'

# bench_forward WHAT: one run, printing its result line; checks a sample of
# what arrived on vcan1 is the frame offered, unchanged.
bench_forward() {
    local what=$1 sample=$D/sample-$1.log line
    timeout 60 candump -L -n 3 vcan1 >"$sample" 2>&1 &
    local dump=$!
    line=$(python3 -c "$BENCH_FWD_PY" "$BENCH_GEN_SECS" -- \
        cangen vcan0 -e -I "$BENCH_ID" -L 5 -D "$BENCH_DATA" -g 0 -i 2>&1) || {
        kill "$dump" 2>/dev/null
        echo "$line"
        echo "$what: $(tail -n 1 <<<"${line:-the forwarding run failed}")" >"$REASON_FILE"
        return 1
    }
    line=$(tail -n 1 <<<"$line")
    wait "$dump"
    echo "$what: $line"
    local bad
    bad=$(grep -vc " vcan1 $BENCH_ID#$BENCH_DATA\$" "$sample" || true)
    [ "$(grep -c . "$sample")" -eq 3 ] && [ "$bad" -eq 0 ] || {
        cat "$sample"
        echo "$what: vcan1 did not carry the offered frame unchanged ($(head -n 1 "$sample"))" >"$REASON_FILE"
        return 1
    }
    BENCH_FPS=$(sed -nE 's/.* fps=([0-9]+).*/\1/p' <<<"$line")
    BENCH_LINE=$line
}

step_bench_bridge() {
    need_bench || return 1
    modprobe can-gw || { echo "modprobe can-gw failed" >"$REASON_FILE"; return 1; }
    cangw -F
    # The lane's config with the firewall's rate limit opened: by default
    # every allowed message is held to 100/s per (direction, PGN, source,
    # destination), which would measure the limit, not the bridge. The
    # bucket is still consulted for every frame.
    {
        cat "$D/ecu.toml"
        printf '\n[firewall]\nrate_per_second = 1000000\nburst = 1000000\n'
    } >"$D/bridge.toml"
    "$BMSGW_ECU_BIN" check-config "$D/bridge.toml" || { echo "check-config $D/bridge.toml failed" >"$REASON_FILE"; return 1; }
    local rep bridge_fps=() cangw_fps=() fw
    for rep in $(seq 1 "$BENCH_REPS"); do
        echo "=== repetition $rep: our bridge (ECU build, bridge mode)"
        BMSGW_BIN=$BMSGW_ECU_BIN D_GW=$D/bridge.toml start_daemon || return 1
        bench_forward bridge || return 1
        running daemon || { echo "the daemon died while bridging" >"$REASON_FILE"; return 1; }
        fw=$(BMSGW_BIN=$BMSGW_ECU_BIN st '.firewall | {forwarded_bms_to_pile, dropped_rate_limited, dropped_busy, dropped_malformed}' | jq -c .)
        echo "firewall: $fw"
        bench_out "bridge_run_$rep" "${BENCH_LINE// /,}"
        bridge_fps+=("$BENCH_FPS")
        stop_proc daemon TERM 15 || { echo "the daemon did not stop on SIGTERM" >"$REASON_FILE"; return 1; }

        echo "=== repetition $rep: the kernel's can-gw"
        cangw -A -s vcan0 -d vcan1 -e || { echo "cangw -A failed" >"$REASON_FILE"; return 1; }
        bench_forward cangw || { cangw -F; return 1; }
        cangw -L
        cangw -F
        bench_out "cangw_run_$rep" "${BENCH_LINE// /,}"
        cangw_fps+=("$BENCH_FPS")
    done
    local b c
    b=$(printf '%s\n' "${bridge_fps[@]}" | bench_median)
    c=$(printf '%s\n' "${cangw_fps[@]}" | bench_median)
    bench_out bridge_reps "$BENCH_REPS"
    bench_out bridge_gen_secs "$BENCH_GEN_SECS"
    bench_out bridge_fps_median "$b"
    bench_out cangw_fps_median "$c"
    bench_out bridge_cangw_ratio "$(awk -v b="$b" -v c="$c" 'BEGIN { printf "%.3f", b / c }')"
}

bench_stop_all() {
    cangw -F 2>/dev/null
    local p
    for p in daemon cloud mosquitto; do
        stop_proc "$p" TERM 15 || stop_proc "$p" KILL 5
    done
    if mountpoint -q "$D/run" 2>/dev/null; then umount "$D/run"; fi
}

daemon_step bench-start step_bench_start
daemon_step bench-ecu step_bench_ecu
daemon_step bench-bridge step_bench_bridge
bench_stop_all
