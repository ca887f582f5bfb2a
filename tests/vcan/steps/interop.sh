# shellcheck shell=bash
# Interoperability suite: bmsgw against two independent GB/T 27930 peers
# written in Python from the standards (tests/vcan/peers/), which can show
# the deviations field equipment shows. Sourced by tests/vcan/guest.sh after
# its own steps (vcan0/vcan1 up, nothing running).
#
#   interop-peers-standard   standard peers: Python BMS vs `bmsgw sim pile`,
#                            `bmsgw sim bms` vs Python charger, Python vs
#                            Python; all complete and decode to all phases
#   interop-single-bms       each BMS deviation alone vs `bmsgw sim pile`,
#   interop-single-charger   each charger deviation alone vs `bmsgw sim bms`:
#                            the outcomes are reported ("INTEROP single ..."
#                            lines), the step asserts only that the peer
#                            shows the deviation on the wire
#   interop-field-pile       Python BMS, all deviations, vs `bmsgw sim pile
#                            --require-auth` (profile field) with `bmsgw sim
#                            vehicle`: completes; decode names them all
#   interop-field-bms        Python charger, all deviations, vs `bmsgw sim
#                            bms` (profile field): completes; decode names them
#   interop-strict           the same against --profile strict: the sims
#                            refuse, naming a deviation
#   interop-gateway          Python BMS (all) on vcan0 through `bmsgw run`
#                            (bridge) to an authenticating `bmsgw sim pile`
#                            on vcan1: completes; `bmsgw status` counts the
#                            deviations the daemon accepted
#
# Files in $OUT/interop: TAG.log (candump -L of vcan0), TAG.decoded (bmsgw
# decode), TAG-{bms,charger}.out (each side's output); the gateway step's
# in $OUT/interop-daemon (guest.sh's daemon files, plus its captures).

INTEROP_PEERS=$BMSGW_ROOT/tests/vcan/peers
IO=$OUT/interop
INTEROP_PHASES='phases: handshake -> recognition -> configuration -> charging -> stopping -> statistics'
# What `bmsgw decode` (and the daemon's status) calls the deviations of the
# Python peers' `--deviations all`.
INTEROP_BMS_NAMES=(bcp-before-recognition bcl-waits-for-ccs early-ccs-timeout positive-current bhm-implausible bcs-single-frame)
INTEROP_CHARGER_NAMES=(cts-packet-interval cts-without-pgn positive-current)
# The peers' own names (--deviations), for wirecheck.py.
INTEROP_PY_BMS_DEVS=(cts-interval-reader bhm-version-bytes brm-41 bcp-once-early bcl-waits-for-ccs early-bem-ccs positive-current bcs-single-frame)
INTEROP_PY_CHARGER_DEVS=(cts-packet-interval cts-without-pgn positive-current cml-6-bytes)

# The guest's / is read-only: no __pycache__ next to the sources.
py_bms() { PYTHONDONTWRITEBYTECODE=1 python3 "$INTEROP_PEERS/gbt_bms.py" "$@"; }
py_charger() { PYTHONDONTWRITEBYTECODE=1 python3 "$INTEROP_PEERS/gbt_charger.py" "$@"; }
wirecheck() { PYTHONDONTWRITEBYTECODE=1 python3 "$INTEROP_PEERS/wirecheck.py" "$@"; }
sim_pile() { "$BMSGW_BIN" --log-level info sim pile "$@"; }
sim_bms() { "$BMSGW_BIN" --log-level info sim bms "$@"; }
# The pile and BMS sims as the lane's sim-session runs them.
SIM_PILE_ARGS=(--can vcan0 --charger-number 12345678 --region-code 310)
SIM_BMS_ARGS=(--can vcan0 --soc-start 40 --soc-end 43 --current 150 --duration 3s --wait 30s)

# A step collects every problem, so one run tells all that is wrong; the
# reason line lists them.
problem() {
    echo "!!! $*"
    PROBLEMS+=("$*")
}
verdict() {
    [ ${#PROBLEMS[@]} -eq 0 ] && return 0
    local IFS=';'
    echo "${PROBLEMS[*]}" | sed 's/;/; /g' | head -c 600 >"$REASON_FILE"
    return 1
}

# capture_on IFACE FILE: candump -L of IFACE into FILE, recording once a
# marker frame shows; the pid in CAPTURE_PIDS.
capture_on() {
    candump -L "$1" >"$2" &
    CAPTURE_PIDS+=($!)
    local i
    for i in $(seq 1 100); do
        cansend "$1" 7FF#00
        grep -q " $1 7FF#00" "$2" && return 0
        sleep 0.1
    done
    problem "candump never started on $1"
    return 1
}
captures_stop() {
    sleep 0.3
    local p
    for p in "${CAPTURE_PIDS[@]}"; do kill "$p" 2>/dev/null; done
    for p in "${CAPTURE_PIDS[@]}"; do wait "$p" 2>/dev/null; done
    CAPTURE_PIDS=()
}

# pair TAG -- BMS-SIDE CMD... -- CHARGER-SIDE CMD...: one session on vcan0
# (the BMS side first: it waits for the charger), candump recording; then
# the decode. Sets RC_B and RC_C, the two sides' exit codes.
pair() {
    local tag=$1
    shift 2
    local bms=() chg=()
    while [ $# -gt 0 ] && [ "$1" != -- ]; do bms+=("$1"); shift; done
    shift
    chg=("$@")
    mkdir -p "$IO"
    local cap=$IO/$tag.log
    RC_B=99
    RC_C=99
    CAPTURE_PIDS=()
    capture_on vcan0 "$cap" || return 1
    "${bms[@]}" >"$IO/$tag-bms.out" 2>&1 &
    local b=$!
    # A Python BMS starts in seconds in the emulated guest (cold 9p reads),
    # and `bmsgw sim pile` gives up when no BHM comes within 5 s of its
    # first CHM: start the charger once the BMS listens.
    if [ "${bms[0]}" = py_bms ]; then
        py_ready "$IO/$tag-bms.out" "$b" || problem "$tag: the Python BMS did not start listening within 30 s"
    else
        sleep 0.2
    fi
    "${chg[@]}" >"$IO/$tag-charger.out" 2>&1 &
    local c=$!
    RC_B=0
    RC_C=0
    wait_bounded "$b" 150 || RC_B=$?
    wait_bounded "$c" 30 || RC_C=$?
    captures_stop
    "$BMSGW_BIN" decode "$cap" >"$IO/$tag.decoded" 2>&1 || echo "(bmsgw decode exited non-zero)"
    echo "================ $tag: BMS side exit $RC_B, charger side exit $RC_C"
    echo "--- BMS side: ${bms[*]}"
    cat "$IO/$tag-bms.out"
    echo "--- charger side: ${chg[*]}"
    cat "$IO/$tag-charger.out"
    echo "--- bmsgw decode --changes ($(grep -vc ' 7FF#' "$cap") frames)"
    "$BMSGW_BIN" decode --changes "$cap" 2>&1 | head -n 150
    echo "--- deviation lines of bmsgw decode"
    grep -i 'deviation' "$IO/$tag.decoded" || echo "(none)"
}

# py_ready OUT PID: a Python peer has bound its socket (its first log line,
# "deviations: ...", comes after), or has exited.
py_ready() {
    local i
    for i in $(seq 1 300); do
        grep -q ': deviations: ' "$1" 2>/dev/null && return 0
        kill -0 "$2" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

last_line() { grep -v '^[[:space:]]*$' "$1" | tail -n 1 | head -c 200; }

# expect_completed TAG: both sides exited 0 and said so.
expect_completed() {
    local tag=$1
    [ "$RC_B" -eq 0 ] && grep -q 'session completed' "$IO/$tag-bms.out" ||
        problem "$tag: BMS side exit $RC_B ($(last_line "$IO/$tag-bms.out"))"
    [ "$RC_C" -eq 0 ] && grep -q 'session completed' "$IO/$tag-charger.out" ||
        problem "$tag: charger side exit $RC_C ($(last_line "$IO/$tag-charger.out"))"
}

# expect_phases TAG: the capture decodes to all phases, nothing malformed,
# the TP-carried messages reassembled.
expect_phases() {
    local tag=$1 d=$IO/$1.decoded
    grep -qx "$INTEROP_PHASES" "$d" || problem "$tag: decode shows '$(grep '^phases:' "$d")'"
    if grep -q 'MALFORMED\|incomplete' "$d"; then
        problem "$tag: malformed messages or incomplete transfers in the capture"
    fi
    local m
    for m in BRM BCP BCS; do
        grep -q " BMS→pile  $m " "$d" || problem "$tag: no $m in the decoded capture"
    done
}

# expect_decode_lists TAG NAME...: bmsgw decode names each deviation.
expect_decode_lists() {
    local tag=$1 missing=() n
    shift
    for n in "$@"; do
        [ -n "$n" ] || continue
        grep -qw -- "$n" "$IO/$tag.decoded" || missing+=("$n")
    done
    [ ${#missing[@]} -eq 0 ] || problem "$tag: bmsgw decode does not list ${missing[*]}"
    grep -q '^deviations:' "$IO/$tag.decoded" || problem "$tag: no 'deviations:' summary line in bmsgw decode"
}

# expect_wire TAG NAME...: the Python peer shows these deviations on the
# wire (wirecheck.py, bms/NAME or charger/NAME).
expect_wire() {
    local tag=$1
    shift
    wirecheck "$IO/$tag.log" "$@" | tee "$IO/$tag.wire" || true
    grep -q 'NOT visible' "$IO/$tag.wire" &&
        problem "$tag: not on the wire: $(grep 'NOT visible' "$IO/$tag.wire" | sed -E 's/^wirecheck ([^:]*):.*/\1/' | paste -sd, -)"
    return 0
}

# ---------------------------------------------------------------------------

step_interop_peers_standard() {
    PROBLEMS=()
    pair std-pybms-simpile -- py_bms --can vcan0 --deviations none -- sim_pile "${SIM_PILE_ARGS[@]}"
    expect_completed std-pybms-simpile
    expect_phases std-pybms-simpile

    pair std-simbms-pycharger -- sim_bms "${SIM_BMS_ARGS[@]}" -- py_charger --can vcan0 --deviations none
    expect_completed std-simbms-pycharger
    expect_phases std-simbms-pycharger

    pair std-py-py -- py_bms --can vcan0 --deviations none -- py_charger --can vcan0 --deviations none
    expect_completed std-py-py
    expect_phases std-py-py
    verdict
}

# outcome TAG: one greppable line with both sides' result.
outcome() {
    local tag=$1 who=$2 v
    if [ "$RC_B" -eq 0 ] && [ "$RC_C" -eq 0 ]; then v=completed; else v=FAILED; fi
    echo "INTEROP single $who: $v; BMS side exit $RC_B: $(last_line "$IO/$tag-bms.out"); charger side exit $RC_C: $(last_line "$IO/$tag-charger.out")" |
        tee -a "$IO/single-outcomes.txt"
}

# Each deviation alone against today's sims: what happens is reported; the
# step fails only if the peer did not show the deviation.
step_interop_single_bms() {
    PROBLEMS=()
    local d
    for d in "${INTEROP_PY_BMS_DEVS[@]}"; do
        pair "single-bms-$d" -- py_bms --can vcan0 --deviations "$d" --timeout 30 -- sim_pile "${SIM_PILE_ARGS[@]}"
        expect_wire "single-bms-$d" "bms/$d"
        outcome "single-bms-$d" "bms/$d"
    done
    echo "=== outcomes"
    grep '^INTEROP single bms/' "$IO/single-outcomes.txt"
    verdict
}

step_interop_single_charger() {
    PROBLEMS=()
    local d
    for d in "${INTEROP_PY_CHARGER_DEVS[@]}"; do
        pair "single-charger-$d" -- sim_bms "${SIM_BMS_ARGS[@]}" -- py_charger --can vcan0 --deviations "$d" --timeout 30
        expect_wire "single-charger-$d" "charger/$d"
        outcome "single-charger-$d" "charger/$d"
    done
    echo "=== outcomes"
    grep '^INTEROP single charger/' "$IO/single-outcomes.txt"
    verdict
}

# interop_keys: a dev PKI and a credential for pile 1 in $IO/pki, once.
interop_keys() {
    [ -s "$IO/pki/vehicle.credential" ] && return 0
    mkdir -p "$IO"
    "$BMSGW_BIN" pki dev --out "$IO/pki" >/dev/null &&
        "$BMSGW_BIN" sim ticket --root-key-file "$IO/pki/pile-1-root.key" --key-offset 0 \
            --charger-number 1 --valid-for 30m --out "$IO/pki/vehicle.credential" || {
        problem "cannot make the dev PKI and a credential"
        return 1
    }
}

# The early BCP is "before recognition" only if it reaches the pile before
# the pile's CRM(0xAA). A pile that answers BRM with CRM(0xAA) at once makes
# that a race (README.md in tests/vcan/peers); the field piles where it
# matters hold CRM(0xAA) for authentication, as this one does, with
# `bmsgw sim vehicle` (its own process) authenticating on the same bus.
step_interop_field_pile() {
    PROBLEMS=()
    interop_keys || { verdict; return 1; }
    "$BMSGW_BIN" --log-level info sim vehicle --can vcan0 --credential "$IO/pki/vehicle.credential" \
        --wait 60s >"$IO/field-pile-vehicle.out" 2>&1 &
    local v=$!
    pair field-pile -- py_bms --can vcan0 --deviations all -- sim_pile --can vcan0 --charger-number 1 \
        --region-code 310 --require-auth --root-key-file "$IO/pki/pile-1-root.key" --key-offset 0
    local rc_v=0
    wait_bounded "$v" 30 || rc_v=$?
    echo "--- sim vehicle (exit $rc_v)"; cat "$IO/field-pile-vehicle.out"
    [ "$rc_v" -eq 0 ] || problem "field-pile: sim vehicle exit $rc_v ($(last_line "$IO/field-pile-vehicle.out"))"
    expect_completed field-pile
    expect_wire field-pile "${INTEROP_PY_BMS_DEVS[@]/#/bms/}"
    expect_decode_lists field-pile "${INTEROP_BMS_NAMES[@]}"
    grep -q 'deviations' "$IO/field-pile-charger.out" || problem "field-pile: the pile sim logged no 'deviations' line"
    grep -q 'bcp-before-recognition' "$IO/field-pile-charger.out" || problem "field-pile: the pile sim did not count bcp-before-recognition"
    verdict
}

step_interop_field_bms() {
    PROBLEMS=()
    pair field-bms -- sim_bms "${SIM_BMS_ARGS[@]}" -- py_charger --can vcan0 --deviations all
    expect_completed field-bms
    expect_decode_lists field-bms "${INTEROP_CHARGER_NAMES[@]}"
    grep -q 'deviations' "$IO/field-bms-bms.out" || problem "field-bms: the BMS sim logged no 'deviations' line"
    expect_wire field-bms "${INTEROP_PY_CHARGER_DEVS[@]/#/charger/}"
    verdict
}

# expect_refused TAG SIDE: the sim on SIDE (bms|charger) failed, and its
# output names a deviation ("deviation <name>").
expect_refused() {
    local tag=$1 side=$2 rc out=$IO/$1-$2.out
    if [ "$side" = bms ]; then rc=$RC_B; else rc=$RC_C; fi
    [ "$rc" -ne 0 ] || problem "$tag: the strict sim completed (exit 0)"
    grep -qE 'deviation [a-z][a-z0-9-]*' "$out" ||
        problem "$tag: the strict sim's error names no deviation (exit $rc: $(last_line "$out"))"
}

step_interop_strict() {
    PROBLEMS=()
    pair strict-pile -- py_bms --can vcan0 --deviations all --timeout 20 -- sim_pile "${SIM_PILE_ARGS[@]}" --profile strict
    expect_refused strict-pile charger
    pair strict-bms -- sim_bms "${SIM_BMS_ARGS[@]}" --profile strict -- py_charger --can vcan0 --deviations all --timeout 20
    expect_refused strict-bms bms
    verdict
}

# The gateway: guest.sh's daemon setup in a directory of its own.
step_interop_gateway() {
    PROBLEMS=()
    own_daemon interop-daemon interop_gateway_body
}

interop_gateway_body() {
    local t0 cap0=$D/gw-vcan0.log cap1=$D/gw-vcan1.log
    t0=$(date +%s)
    CAPTURE_PIDS=()
    capture_on vcan0 "$cap0" && capture_on vcan1 "$cap1" || { captures_stop; verdict; return 1; }
    py_bms --can vcan0 --deviations all --timeout 90 >"$D/gw-bms.out" 2>&1 &
    local b=$!
    py_ready "$D/gw-bms.out" "$b" || problem "gateway: the Python BMS did not start listening within 30 s"
    sim_pile --can vcan1 --charger-number 1 --region-code 310 \
        --require-auth --root-key-file "$D_PKI/pile-1-root.key" --key-offset 0 >"$D/gw-pile.out" 2>&1 &
    local c=$!
    local rc_b=0 rc_c=0
    wait_bounded "$b" 150 || rc_b=$?
    wait_bounded "$c" 30 || rc_c=$?
    captures_stop
    echo "--- Python BMS (vcan0, exit $rc_b)"; cat "$D/gw-bms.out"
    echo "--- bmsgw sim pile (vcan1, exit $rc_c)"; cat "$D/gw-pile.out"
    local side
    for side in vcan0 vcan1; do
        "$BMSGW_BIN" decode "$D/gw-$side.log" >"$D/gw-$side.decoded" 2>&1
        echo "--- bmsgw decode --changes of $side"
        "$BMSGW_BIN" decode --changes "$D/gw-$side.log" 2>&1 | head -n 120
    done
    [ "$rc_b" -eq 0 ] && grep -q 'session completed' "$D/gw-bms.out" ||
        problem "gateway: Python BMS exit $rc_b ($(last_line "$D/gw-bms.out"))"
    [ "$rc_c" -eq 0 ] || problem "gateway: sim pile exit $rc_c ($(last_line "$D/gw-pile.out"))"
    if [ ${#PROBLEMS[@]} -eq 0 ]; then
        wait_for "the daemon's last_session to show this session" 30 last_session_since "$t0" ||
            problem "gateway: no last_session for this session in bmsgw status"
        local result
        result=$(st '.last_session.result')
        [ "$result" = completed ] || problem "gateway: last_session.result '$result'"
    fi
    show_status
    echo "--- deviations in bmsgw status --json"
    st '.deviations' || true
    echo "--- the deviations on vcan0"
    wirecheck "$cap0" "${INTEROP_PY_BMS_DEVS[@]/#/bms/}" | tee "$D/gw-vcan0.wire" || true
    # The gate holds CRM(0xAA) until the pile is authenticated, so the
    # BMS's BCP always comes before it here.
    local n count
    for n in "${INTEROP_BMS_NAMES[@]}"; do
        [ -n "$n" ] || continue
        count=$(st ".deviations.bms.accepted[\"$n\"] // 0" 2>/dev/null)
        [[ $count =~ ^[0-9]+$ ]] && [ "$count" -gt 0 ] ||
            problem "gateway: .deviations.bms.accepted[\"$n\"] is '${count:-?}' (want > 0)"
    done
    verdict
}

step interop-peers-standard step_interop_peers_standard
step interop-single-bms step_interop_single_bms
step interop-single-charger step_interop_single_charger
step interop-field-pile step_interop_field_pile
step interop-field-bms step_interop_field_bms
step interop-strict step_interop_strict
step interop-gateway step_interop_gateway
