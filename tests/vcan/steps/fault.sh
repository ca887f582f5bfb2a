# shellcheck shell=bash
# The fault suite's VM-lane part (issue 6, deliverable 3), sourced by
# tests/vcan/guest.sh after its own steps: real processes (mosquitto,
# `bmsgw sim cloud`, `bmsgw run` bridging vcan0/vcan1, the simulators) and
# real kernel faults.
#
#   fault-start          its own broker, cloud and daemon (guest.sh's
#                        daemon-start, pointed at $OUT/fault)
#   fault-can-iface      vcan1/vcan0 down and up, vcan1 deleted and
#                        recreated, with the daemon running: same pid, the
#                        links reported down then up, a session completes
#   fault-broker-restart mosquitto restarts while the simulators charge:
#                        the session completes, its record reaches the cloud
#   fault-kill9          N random `kill -9`s of the daemon during sessions
#                        (BMSGW_FAULT_KILLS, default 100), half with the
#                        broker down (vouchers): 0 vouchers spent twice and
#                        0 records lost, against the cloud's and piles' view
#   fault-disk           tests/vm/fault_disk.rs (real ENOSPC on a small tmpfs)
#
# The figures are printed in the step logs as "FAULT name=value" lines.

# guest.sh's daemon helpers work on $D and the paths below: point them at a
# directory of our own, so the daemon steps' files stay for reading.
D=$OUT/fault
D_PKI=$D/pki
D_GW=$D/gateway.toml
D_SOCK=$D/run/control.sock
D_MOSQ_CONF=$D/mosquitto.conf
MOSQ_STARTS_FILE=$D/mosquitto.starts

# The credential throttle (protocol.md §8) would rightly stop a pile that
# restarts sessions a hundred times in a row; this suite restarts them on
# purpose, so it is opened up here.
D_GW_EXTRA='
[session]
request_burst = 1000
request_interval = "1s"
max_unproven = 1000
unproven_cooldown = "0s"'

FAULT_KILLS=${BMSGW_FAULT_KILLS:-100}

step_fault_start() {
    # A tmpfs left mounted by an earlier run of this function.
    umount "$D/run" 2>/dev/null
    step_daemon_start
}

# The daemon answers and reports every CAN link up.
links_up() { st_true '[.can[].up] | all'; }
link_down() { st_true "[.can[] | select(.interface == \"$1\") | .up] == [false]"; }

# can_outage IFACE down|delete PID: takes IFACE away, checks the daemon
# notices and survives, brings IFACE back and runs a whole session.
can_outage() {
    local ifc=$1 how=$2 pid0=$3
    echo "=== $ifc: $how"
    local t_fault
    t_fault=$(date +%s.%N)
    case $how in
    down) ip link set "$ifc" down ;;
    delete) ip link delete "$ifc" ;;
    esac
    wait_for "the daemon to report $ifc down ($how)" 30 link_down "$ifc" || return 1
    echo "FAULT can_${how}_${ifc}_detect_s=$(awk -v a="$t_fault" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')"
    # Several reopen attempts fail meanwhile (backoff up to 2 s).
    sleep 3
    running daemon || { echo "the daemon exited with $ifc $how (exit $(cat "$D/daemon.rc"))" >"$REASON_FILE"; return 1; }
    show_status
    local t_back
    case $how in
    down) ip link set "$ifc" up ;;
    delete) ip link add dev "$ifc" type vcan && ip link set up "$ifc" ;;
    esac
    t_back=$(date +%s.%N)
    wait_for "the daemon to report every CAN link up after $ifc came back" 30 links_up || return 1
    echo "FAULT can_${how}_${ifc}_recover_s=$(awk -v a="$t_back" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')"
    [ "$(pid_of daemon)" = "$pid0" ] && running daemon || {
        echo "the daemon was restarted or exited ($ifc $how): pid $pid0 -> $(pid_of daemon)" >"$REASON_FILE"
        return 1
    }
    local t0
    t0=$(date +%s)
    session "after-$ifc-$how" || return 1
    wait_for "the daemon's last_session to show the session after $ifc $how" 30 last_session_since "$t0" || return 1
    local result
    result=$(st '.last_session.result')
    [ "$result" = completed ] || { echo "session after $ifc $how: result '$result'" >"$REASON_FILE"; return 1; }
    echo "FAULT can_${how}_${ifc}=survived pid=$pid0 session=completed"
}

step_fault_can_iface() {
    need_daemon || return 1
    wait_for "every CAN link up" 30 links_up || return 1
    local pid0
    pid0=$(pid_of daemon)
    can_outage vcan1 down "$pid0" || return 1
    can_outage vcan0 down "$pid0" || return 1
    can_outage vcan1 delete "$pid0" || return 1
    can_outage vcan0 delete "$pid0" || return 1
    show_status
}

# mosquitto stops and starts while the simulators charge on an online grant.
step_fault_broker_restart() {
    need_daemon || return 1
    wait_for "the daemon's cloud link to connect" 60 st_true '.cloud.state == "connected"' || return 1
    local before t0
    before=$(cloud_records)
    t0=$(date +%s)
    run_sims broker-restart --soc-start 60 --soc-end 64 --duration 20s
    wait_for "a session in the charging phase" 60 \
        st_true '.session.phase == "charging" and .session.credential == "online"' || {
        kill "$SIM_BMS" "$SIM_PILE" 2>/dev/null
        wait_sims broker-restart
        return 1
    }
    stop_mosquitto || return 1
    wait_for "the daemon to see the broker gone" 30 st_true '.cloud.state != "connected"' || return 1
    sleep 2
    start_mosquitto || return 1
    wait_sims broker-restart
    [ "$RC_BMS" -eq 0 ] && [ "$RC_PILE" -eq 0 ] || {
        echo "session across the broker restart: bms exit $RC_BMS, pile exit $RC_PILE" >"$REASON_FILE"
        return 1
    }
    wait_for "the daemon's last_session to show this session" 30 last_session_since "$t0" || return 1
    local result cred
    result=$(st '.last_session.result')
    cred=$(st '.last_session.credential')
    [ "$result" = completed ] || { echo "last_session: result '$result' (want completed)" >"$REASON_FILE"; return 1; }
    wait_for "the cloud to receive the session's record" 90 cloud_records_above "$before" || return 1
    wait_for "an empty outbox" 60 st_true "($J_OUTBOX) == 0" || return 1
    echo "FAULT broker_restart=session completed credential=$cred record=delivered"
}

# fields FILE PATTERN KEY: the values of KEY= on the lines matching PATTERN.
fields() { grep -h -- "$2" "$1" 2>/dev/null | grep -o " $3=[0-9a-zA-Z]*" | cut -d= -f2; }

# One cycle: the simulators start a session, the daemon is killed at a
# random moment (before, during or after the session), then restarted.
kill_cycle() {
    local i=$1 ms=$2
    run_sims "k$i" --soc-start 60 --soc-end 62 --duration 2s
    # No status query first: it takes a noticeable time in the guest and
    # would move the kill. Where the kill landed shows in the records.
    sleep "$(awk -v m="$ms" 'BEGIN { printf "%.3f", m / 1000 }')"
    stop_proc daemon KILL 10 || { echo "cycle $i: the daemon survived kill -9?" >"$REASON_FILE"; return 1; }
    kill "$SIM_BMS" "$SIM_PILE" 2>/dev/null
    wait "$SIM_BMS" 2>/dev/null
    wait "$SIM_PILE" 2>/dev/null
    echo "cycle $i: killed ${ms} ms after the simulators started"
    start_daemon || { echo "cycle $i: the daemon did not restart after kill -9: $(cat "$REASON_FILE")" >"$REASON_FILE"; return 1; }
}

step_fault_kill9() {
    need_daemon || return 1
    local seed=${BMSGW_FAULT_SEED:-$(date +%s)}
    RANDOM=$seed
    echo "FAULT kill9_seed=$seed kill9_n=$FAULT_KILLS"
    local t0 i
    t0=$(date +%s.%N)
    for i in $(seq 1 "$FAULT_KILLS"); do
        # Blocks of ten: five with the broker up (online grants, which also
        # fill the wallet), five with it down (vouchers).
        case $(((i - 1) % 10)) in
        0) running mosquitto || start_mosquitto || return 1 ;;
        5) stop_mosquitto || return 1 ;;
        esac
        # 0 to 3.2 s: in the guest a session (2 s of charging) ends about
        # 2.7 s after the simulators start, so most kills land in it, some
        # before it begins or after it ends.
        kill_cycle "$i" $((RANDOM % 3200)) || return 1
    done
    local t1
    t1=$(date +%s.%N)
    echo "FAULT kill9_cycle_s=$(awk -v a="$t0" -v b="$t1" -v n="$FAULT_KILLS" 'BEGIN { printf "%.1f", (b - a) / n }')"

    running mosquitto || start_mosquitto || return 1
    wait_for "the daemon's cloud link to connect" 60 st_true '.cloud.state == "connected"' || return 1
    # The daemon still works: one whole session.
    session after-kills || return 1
    wait_for "an empty outbox" 120 st_true "($J_OUTBOX) == 0" || return 1
    show_status
    kill9_verdict
}

# The cloud's view against the daemon's and the piles'.
kill9_verdict() {
    local w=$D/verdict
    mkdir -p "$w"
    # What the daemon owes the cloud: every record id it committed.
    cat "$D"/daemon-*.log | fields - 'draft journaled\|record queued' record | sort -u >"$w/owed"
    # What the cloud received: one line per record it accepted.
    fields "$D/cloud.log" 'session record received' record | sort >"$w/received.all"
    sort -u "$w/received.all" >"$w/received"
    # Tickets the cloud saw spent, in records: all, and vouchers.
    fields "$D/cloud.log" 'session record received' ticket | sort >"$w/spent.all"
    fields "$D/cloud.log" 'session record received.*credential=Voucher' ticket | sort >"$w/vouchers-spent.all"
    fields "$D/cloud.log" 'voucher issued' ticket | sort -u >"$w/vouchers-issued"
    # What the piles accepted (each sim pile is a fresh process without a
    # replay cache, so a voucher presented twice would be accepted twice).
    cat "$D"/sims-*-pile.out | fields - 'vehicle authenticated' ticket | sort >"$w/accepted.all"
    cat "$D"/sims-*-pile.out | fields - 'vehicle authenticated.*voucher=true' ticket | sort >"$w/vouchers-accepted.all"

    local owed received lost dup_records tickets_twice vouchers_twice_cloud vouchers_twice_piles
    local accepted accepted_no_record unissued issued spent remaining redelivered
    owed=$(wc -l <"$w/owed")
    received=$(wc -l <"$w/received")
    lost=$(comm -23 "$w/owed" "$w/received" | wc -l)
    dup_records=$(uniq -d "$w/received.all" | wc -l)
    tickets_twice=$(uniq -d "$w/spent.all" | wc -l)
    vouchers_twice_cloud=$(uniq -d "$w/vouchers-spent.all" | wc -l)
    vouchers_twice_piles=$(uniq -d "$w/vouchers-accepted.all" | wc -l)
    accepted=$(sort -u "$w/accepted.all" | wc -l)
    accepted_no_record=$(sort -u "$w/accepted.all" | comm -23 - <(sort -u "$w/spent.all") | wc -l)
    unissued=$(sort -u "$w/vouchers-spent.all" | comm -23 - "$w/vouchers-issued" | wc -l)
    issued=$(wc -l <"$w/vouchers-issued")
    spent=$(sort -u "$w/vouchers-spent.all" | wc -l)
    remaining=$(st '[.vouchers[]?.remaining] | add // 0')
    redelivered=$(grep -c 'already recorded' "$D/cloud.log" || true)
    cat <<EOF
FAULT kill9_records_owed=$owed
FAULT kill9_records_received=$received
FAULT kill9_records_lost=$lost
FAULT kill9_records_accepted_twice=$dup_records
FAULT kill9_redeliveries_refused=$redelivered
FAULT kill9_records_online=$(grep -c 'session record received.*credential=Online' "$D/cloud.log")
FAULT kill9_records_voucher=$(wc -l <"$w/vouchers-spent.all")
FAULT kill9_records_completed=$(grep 'session record received' "$D/cloud.log" | grep -c 'result=Completed')
FAULT kill9_records_interrupted=$(grep 'session record received' "$D/cloud.log" | grep -c 'result=Failed')
FAULT kill9_restarts_recovering_a_session=$(grep -l 'sessions interrupted by a crash' "$D"/daemon-*.log | wc -l)
FAULT kill9_tickets_in_two_records=$tickets_twice
FAULT kill9_vouchers_spent_twice_cloud=$vouchers_twice_cloud
FAULT kill9_vouchers_spent_twice_piles=$vouchers_twice_piles
FAULT kill9_tickets_accepted_by_piles=$accepted
FAULT kill9_accepted_without_record=$accepted_no_record
FAULT kill9_vouchers_issued=$issued
FAULT kill9_vouchers_spent=$spent
FAULT kill9_vouchers_in_wallet=$remaining
FAULT kill9_vouchers_taken_unused=$((issued - spent - remaining))
FAULT kill9_vouchers_spent_not_issued=$unissued
EOF
    local bad=()
    [ "$owed" -gt 0 ] || bad+=("the daemon logged no record ids")
    [ "$lost" -eq 0 ] || bad+=("$lost records lost: $(comm -23 "$w/owed" "$w/received" | head -n 3 | paste -sd, -)")
    [ "$accepted_no_record" -eq 0 ] || bad+=("$accepted_no_record tickets accepted by a pile without a record at the cloud")
    [ "$dup_records" -eq 0 ] || bad+=("$dup_records records accepted twice by the cloud")
    [ "$tickets_twice" -eq 0 ] || bad+=("$tickets_twice tickets in two records")
    [ "$vouchers_twice_piles" -eq 0 ] || bad+=("$vouchers_twice_piles vouchers accepted twice by piles")
    [ "$unissued" -eq 0 ] || bad+=("$unissued vouchers spent that the cloud never issued")
    [ "$spent" -gt 0 ] || bad+=("no voucher was spent: the offline half did not exercise vouchers")
    if [ ${#bad[@]} -gt 0 ]; then
        printf '%s; ' "${bad[@]}" >"$REASON_FILE"
        return 1
    fi
}

step_fault_stop() {
    local p
    for p in daemon cloud mosquitto; do
        stop_proc "$p" TERM 15 || stop_proc "$p" KILL 5
    done
    umount "$D/run" 2>/dev/null
    return 0
}

# tests/vm/fault_disk.rs mounts its own small tmpfs (real ENOSPC); its temp
# directories go on a tmpfs too (/ is read-only, $OUT is 9p).
step_fault_disk() {
    local tmp=$OUT/fault-disk-tmp
    mkdir -p "$tmp" && mount -t tmpfs -o mode=0700 tmpfs "$tmp" || {
        echo "cannot mount a tmpfs on $tmp" >"$REASON_FILE"
        return 1
    }
    local rc=0
    TMPDIR=$tmp step_cargo_tests fault_disk "$BMSGW_TEST_VM" fault_disk:: || rc=$?
    umount "$tmp"
    return "$rc"
}

daemon_step fault-start step_fault_start
daemon_step fault-can-iface step_fault_can_iface
daemon_step fault-broker-restart step_fault_broker_restart
# 3.8 s a cycle measured in the emulated guest (8 s on a loaded host); the
# default step timeout of 300 s is too short for 100.
STEP_TIMEOUT=$((FAULT_KILLS * 12 + 300)) daemon_step fault-kill9 step_fault_kill9
step fault-stop step_fault_stop
step fault-disk step_fault_disk
