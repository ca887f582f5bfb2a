#!/usr/bin/env bash
# Runs the measurements of issue 6 that need no VM and writes
# docs/performance.md: the bridge's cost per frame (criterion), the
# authorization latency online and offline against the bus-time lower bound
# (`bmsgw bench latency`), the ECU build's stripped size, and the cloud's
# grants per second with 1 and 2 instances (`bmsgw bench cloud`, needs
# mosquitto). The VM lane's figures (ECU RSS and start to READY, bridge vs
# can-gw) come from the last lane run's target/vcan-lane/bench.txt,
# through bench/vm-figures.sh.
#
# usage: bench/run.sh            1000 sessions per path (about 15 min each)
#        BENCH_SESSIONS=100 bench/run.sh    a quicker pass
#
# The figures depend on the machine and on what else runs on it; the doc
# records both, with the command behind every figure.
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in jq strip; do
    command -v "$tool" >/dev/null || { echo "bench/run.sh needs $tool (apt-get install jq binutils)" >&2; exit 1; }
done
SESSIONS=${BENCH_SESSIONS:-1000}
OUT=target/bench
mkdir -p "$OUT"

echo "== release build"
cargo build --release --quiet
echo "== criterion: benches/bridge.rs"
cargo bench --quiet --bench bridge -- --noplot 2>&1 | tee "$OUT/bridge.txt"
echo "== bmsgw bench latency --sessions $SESSIONS"
./target/release/bmsgw bench latency --sessions "$SESSIONS" --json "$OUT/latency.json" \
    | tee "$OUT/latency.txt"
CLOUD_REQUESTS=${BENCH_CLOUD_REQUESTS:-3000}
CLOUD_REPEATS=${BENCH_CLOUD_REPEATS:-5}
# The cloud figure is about how instances share the cores, so background
# jobs (a fuzzing run, other builds) must not take them: where allowed the
# bench and everything it starts run at real-time priority, as on a
# dedicated machine (BENCH_CLOUD_CHRT= turns it off). The kernel still keeps 5% of
# each core for other tasks.
CLOUD_PRIO=${BENCH_CLOUD_CHRT-chrt -f 10}
# Only where it is allowed (root with CAP_SYS_NICE; not in every container).
if [ -n "$CLOUD_PRIO" ] && ! $CLOUD_PRIO true 2>/dev/null; then
    echo "bench/run.sh: cannot run at real-time priority ($CLOUD_PRIO); the cloud figure shares the cores" >&2
    CLOUD_PRIO=""
fi
CLOUD_CMD="${CLOUD_PRIO:+$CLOUD_PRIO }./target/release/bmsgw bench cloud --instances 1,2 --requests $CLOUD_REQUESTS --repeats $CLOUD_REPEATS"
echo "== $CLOUD_CMD"
CLOUD_LOAD=$(cut -d' ' -f1-3 /proc/loadavg)
$CLOUD_CMD --json "$OUT/cloud.json" | tee "$OUT/cloud.txt"
echo "== bmsgw bench startup --runs 21"
./target/release/bmsgw bench startup --runs 21 --json "$OUT/startup.json" | tee "$OUT/startup.txt"
echo "== ECU build (--no-default-features)"
cargo build --release --quiet --no-default-features --target-dir target/ecu
ECU_BIN=target/ecu/release/bmsgw
cp "$ECU_BIN" "$OUT/bmsgw-ecu"
strip "$OUT/bmsgw-ecu"
ECU_SIZE=$(stat -c %s "$OUT/bmsgw-ecu")

# --- the doc --------------------------------------------------------------
crit() { # group/name -> "ns_per_frame frames_per_s frames"
    local dir=target/criterion/$1/new
    local ns frames
    ns=$(jq '.median.point_estimate' "$dir/estimates.json")
    frames=$(jq '.throughput.Elements' "$dir/benchmark.json")
    awk -v ns="$ns" -v n="$frames" 'BEGIN { printf "%.0f %.0f %d\n", ns / n, n * 1e9 / ns, n }'
}
lat() { # path field
    jq -r --arg p "$1" ".paths[] | select(.path == \$p) | .$2" "$OUT/latency.json"
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
fmt() { awk -v a="$1" 'BEGIN { printf "%.1f", a }'; }

read -r S_NS S_FPS S_N < <(crit bridge/session)
read -r C_NS C_FPS _ < <(crit bridge/charging)
read -r T_NS T_FPS _ < <(crit bridge/start)
CPU=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')
NPROC=$(nproc)
LOAD=$(cut -d' ' -f1-3 /proc/loadavg)
LAT_CMD="./target/release/bmsgw bench latency --sessions $SESSIONS"

row_latency() { # path target
    local p=$1 target=$2
    local p50 p99 max bound r99
    p50=$(lat "$p" p50_ms); p99=$(lat "$p" p99_ms); max=$(lat "$p" max_ms)
    bound=$(lat "$p" bound_ms); r99=$(lat "$p" ratio_p99)
    printf '| Authorization latency, %s, p50 / p99 / max (%s sessions) | p99 <= %s x bound | %s / %s / %s ms; bound %s ms | p99 = %s x bound | `%s` |\n' \
        "$p" "$(lat "$p" sessions)" "$target" "$(fmt "$p50")" "$(fmt "$p99")" "$(fmt "$max")" \
        "$(fmt "$bound")" "$(awk -v r="$r99" 'BEGIN{printf "%.2f", r}')" "$LAT_CMD"
}

cloud() { jq -r "$1" "$OUT/cloud.json"; }
row_cloud() {
    local c1 c2 r k1 k2 cores
    c1=$(cloud '.by_instances[] | select(.instances == 1) | .median_grants_per_s')
    c2=$(cloud '.by_instances[] | select(.instances == 2) | .median_grants_per_s')
    r=$(cloud '.ratio'); cores=$(cloud '.cores')
    k1=$(cloud '.by_instances[] | select(.instances == 1) | .ceiling_grants_per_s')
    k2=$(cloud '.by_instances[] | select(.instances == 2) | .ceiling_grants_per_s')
    printf '| Cloud grants/s, 1 / 2 instances on a shared subscription (mosquitto; median of %s runs of %s requests; %s cores shared with mosquitto and the load generator) | 2 >= 1.8 x 1 | %s / %s grants/s, ratio %s (CPU ceiling on %s cores: %s / %s, ratio %s) | %s | `%s` |\n' \
        "$(cloud '.repeats')" "$(cloud '.requests')" "$cores" \
        "$(fmt0 "$c1")" "$(fmt0 "$c2")" "$(awk -v r="$r" 'BEGIN{printf "%.2f", r}')" \
        "$cores" "$(fmt0 "$k1")" "$(fmt0 "$k2")" "$(ratio "$k2" "$k1")" \
        "$(awk -v r="$r" 'BEGIN{printf "%.2f", r / 1.8}')" "$CLOUD_CMD"
}
fmt0() { awk -v a="$1" 'BEGIN { printf "%.0f", a }'; }

{
cat <<DOC
# Performance

Written by \`bench/run.sh\` on $(date -u +%Y-%m-%d) ($(git rev-parse --short HEAD)).
Machine: $CPU, $NPROC core(s), load average before the doc was written $LOAD.
Timings on a shared or loaded machine are noisy: rerun \`bench/run.sh\` on
the target before relying on them.

| Figure | Target | Measured | Ratio to target | Command |
|---|---|---|---|---|
| Bridge processing per frame, median (whole session, $S_N frames) | <= 2000 ns | $S_NS ns | $(ratio "$S_NS" 2000) | \`cargo bench --bench bridge\` (bridge/session) |
| Bridge throughput on one core (whole session) | >= 200 000 frames/s | $S_FPS frames/s | $(ratio "$S_FPS" 200000) | \`cargo bench --bench bridge\` (bridge/session) |
| Bridge per frame: session start (TP-heavy) / charging (single frames) | | $T_NS / $C_NS ns | | \`cargo bench --bench bridge\` (bridge/start, bridge/charging) |
$(row_latency online 1.5)
$(row_latency offline 1.3)
| Start to READY on this machine, median / max of 20 restarts (first start: $(jq -r '.first_ms | . * 10 | round / 10' "$OUT/startup.json") ms); \`bmsgw run\`'s path on in-process buses, default build | <= 50 ms | $(jq -r '.median_ms | . * 10 | round / 10' "$OUT/startup.json") / $(jq -r '.max_ms | . * 10 | round / 10' "$OUT/startup.json") ms | $(jq -r '.max_ms / 50 | . * 100 | round / 100' "$OUT/startup.json") (max) | \`./target/release/bmsgw bench startup --runs 21\` |
| ECU build, stripped binary | <= 8 MiB | $(awk -v s="$ECU_SIZE" 'BEGIN{printf "%.2f MiB", s/1048576}') | $(awk -v s="$ECU_SIZE" 'BEGIN{printf "%.2f", s/8388608}') | \`cargo build --release --no-default-features && strip\` |
$(bench/vm-figures.sh ecu-rows)
$(row_cloud)
$(bench/vm-figures.sh bridge-rows)

## How the latency is measured

\`bmsgw bench latency\` runs the demo's whole system in one process: a dev
PKI, the embedded MQTT broker with mutual TLS on loopback, the reference
cloud service, and the gateway daemon (\`service::daemon::run_on\`, what
\`bmsgw run\` runs) in bridge mode between two in-process CAN buses with
the 250 kbit/s timing model (frame times with stuff bits, arbitration,
back-pressure). The BMS simulator and a pile simulator that requires
authentication play whole sessions one after another. Online, the gateway
gets a ticket from the cloud through the broker for every session; offline,
the broker is stopped and it uses a voucher (the wallet is filled through
the control socket first).

Latency runs from the end of the pile's first CRM(0x00) to the end of its
CRM(0xAA), as a monitor node on the pile's bus sees them.

The **bus-time lower bound** is computed for every session from the frames
it actually exchanged (\`src/sim/bench/critical_path.rs\`), each at its
exact wire time (\`can::virtual_bus::frame_duration\`, stuff bits included):
the larger of

- the pile's bus, which carries one frame at a time: the AuthRequest,
  AuthChallenge and AuthConfirm transfers (RTS, CTS, every DT, and the
  EndOfMsgAck of the first two), the bridge's BRM transfer to the pile, and
  CRM(0xAA);
- the identification chain across both buses: CRM(0x00) forwarded to the
  BMS, the BMS's BRM transfer, the bridge's BRM transfer to the pile,
  CRM(0xAA).

Everything else in the latency is processing (crypto, TP, the firewall,
the cloud round trip online, the simulators) and frames that compete for
the bus without being needed.

The in-process bus uses \`VirtualBus::with_precise_timing\`: tokio's timer
fires on millisecond ticks, so with the plain timing model every reaction
to a frame would start up to 1 ms late and a TP exchange would run at a
fraction of 250 kbit/s; the precise model waits out frame times to the
microsecond.

## How the cloud's grants per second are measured

\`bmsgw bench cloud\` (\`src/sim/bench/cloud.rs\`) generates a dev PKI
with $(cloud '.vehicles') vehicles (no owner approval), and for every run
starts a fresh mosquitto with the shipped \`config/mosquitto/mosquitto.conf\`
(TLS 1.3, mutual TLS, the ACL, persistence; only paths and port replaced),
then 1 or 2 \`bmsgw sim cloud\` processes on the shared subscription, and
waits for their SUBSCRIBEs in the broker's log. Each vehicle has its own
TLS connection. All $(cloud '.requests') requests of a run are sealed before
the clock starts; $(cloud '.in_flight') are kept in flight; the clock stops
at the last answer, and only then is every answer opened and checked as
the vehicle checks it (one that is not a valid grant fails the run). The
runs alternate between 1 and 2 instances; the figure is the median run.

The machine had $NPROC cores for everything: mosquitto, the instances and
the load generator; load average before the cloud runs $CLOUD_LOAD.
$(if [ -n "$CLOUD_PRIO" ]; then echo "They ran at real-time priority (\`$CLOUD_PRIO\`), ahead of whatever else
ran (a fuzzing run, other builds), as on a machine of their own."; else echo "They ran at normal priority, sharing the cores with whatever else ran."; fi)
The machine's busy and niced CPU time during each run is in the raw
lines below. Each run also
records the CPU time of each process in its window. The CPU one grant
costs (instances / mosquitto / generator, in µs; median over the runs:
$(cloud '.by_instances[] | "\(.instances) instance(s): \(.cpu_per_grant.instances_us | round) / \(.cpu_per_grant.mosquitto_us | round) / \(.cpu_per_grant.generator_us | round)"' | paste -sd ';' | sed 's/;/; /g'))
gives the ceiling in the table: an instance is one serial loop, so at
most one core, and on $NPROC cores 2 instances must share them with
mosquitto and the generator. Where that ceiling is below 1.8 x, the target cannot be met
on this machine whatever the instances do; it needs the broker and the
load generator off the instances' cores (with these costs, 3 cores).
Where the measured ratio is below the ceiling too, the runs did not have
the cores to themselves: each raw line gives the CPU seconds of mosquitto,
the instances and the generator beside the machine's busy and niced time
in the same window; the difference is what other processes took.

## Where the offline latency goes over its target

Offline, the p99 was 1.31 x the bound against a target of 1.3 x at
06940d4 (the median 1.14 x). The store is not the cost any more: a voucher is
spent and its session's draft record journaled in one redb commit (a take
measures 0.2 to 0.4 ms, a commit about 0.2 ms, on this machine), and the
handshake starts as soon as that commit returns. What remains above the bus
time is reaction time at every step of the four transport transfers on the
pile's bus (the gateway's and the pile simulator's task wakeups and crypto,
and the precise-timing bus model's waits), which on a 2-core VM with other
work around shows up in the tail.

## How start to READY is measured

`bmsgw bench startup` starts the binary itself as a child that does what
`bmsgw run` does (config, logging, keys, the redb store, the control
socket, READY, then the cloud link) on two in-process buses, because this
machine has no SocketCAN: the one step left out is opening two CAN sockets.
`NOTIFY_SOCKET` points at a datagram socket the bench listens on, as
systemd's would; the time runs from just before the spawn (so it includes
`exec`, the loader and the runtime's start) to the READY=1 datagram. The
child is the default build, which is larger than the ECU build. The first
start creates the store and the wallet key; the figure is over the
restarts on that store, each ended by SIGTERM with a clean exit required.
The VM lane times the ECU build itself on real vcan, but under software
emulation, where the same start takes seconds.

## Raw output

\`\`\`
$(grep '^latency' "$OUT/latency.txt")
\`\`\`

\`\`\`
$(grep -E '^bridge/|time:|thrpt:' "$OUT/bridge.txt" || true)
\`\`\`

\`\`\`
$(grep '^cloud' "$OUT/cloud.txt")
$(cat "$OUT/startup.txt")
\`\`\`

$(bench/vm-figures.sh notes)
DOC
} > docs/performance.md
echo "== wrote docs/performance.md"
