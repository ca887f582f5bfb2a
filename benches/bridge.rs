//! The bridge's processing cost per frame: decode, firewall and forward,
//! sans-IO (no bus, no timing model), on one core.
//!
//! A whole GB/T session is played once between a BMS node and a charger
//! node with the bridge between them, and every frame that reached the
//! bridge is recorded with its side and time. Each iteration replays that
//! capture into a fresh bridge (recognition already released, as after
//! pile authentication) and drains everything it sends: single frames
//! judged and forwarded, TP transfers terminated, reassembled, judged and
//! cut again. The bridge is deterministic, so the replay takes the same
//! path as the recording. Criterion's throughput is in frames, so the time
//! per iteration divided by the frame count is the cost per frame, and its
//! elements/s the frames per second on one core.
//!
//! A second group replays only the charging phase's single frames (BCL,
//! BCS, CCS: the bulk of a long session) and the TP-heavy start (BRM, BCP,
//! BMV-like transfers), to show both ends of the mix.

use std::hint::black_box;
use std::time::Duration;

use bmsgw::can::CanFrame;
use bmsgw::gateway::bridge::Bridge;
use bmsgw::gateway::firewall::{FirewallConfig, Side};
use bmsgw::gbt27930::bms::{Bms, BmsConfig, BmsStopReason};
use bmsgw::gbt27930::charger::{Charger, ChargerConfig};
use bmsgw::gbt27930::node::{Node, NodeEvent};
use bmsgw::gbt27930::session::{Phase, Role, SessionEvent};
use bmsgw::gbt27930::{BMS_ADDRESS, CHARGER_ADDRESS};
use bmsgw::j1939::tp::TpConfig;
use bmsgw::j1939::{Address, J1939Id};
use bmsgw::time::Timestamp;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};

const BMS: Address = Address(BMS_ADDRESS);
const PILE: Address = Address(CHARGER_ADDRESS);
const GATEWAY: Address = Address(0xF5);

/// How long the BMS charges before it stops: 60 s of BCL/BCS/CCS.
const CHARGING: Duration = Duration::from_secs(60);

fn config() -> FirewallConfig {
    FirewallConfig::gbt27930(BMS, PILE, GATEWAY)
}

fn fresh_bridge() -> Bridge {
    let mut bridge = Bridge::new(config());
    bridge.set_pile_authenticated(true, Timestamp::ZERO);
    bridge
}

/// One frame as it reached the bridge.
#[derive(Clone)]
struct Input {
    at: Timestamp,
    side: Side,
    frame: CanFrame,
}

/// Plays a whole session through a bridge and records its input.
fn record_session() -> Vec<Input> {
    let mut bms = Node::new(
        Bms::new(BmsConfig::default()),
        BMS,
        PILE,
        TpConfig::gbt27930(),
    );
    let mut charger = Node::new(
        Charger::new(ChargerConfig::default()),
        PILE,
        BMS,
        TpConfig::gbt27930(),
    );
    let mut bridge = fresh_bridge();
    let mut now = Timestamp::ZERO;
    bms.role_mut().start(now);
    charger.role_mut().start(now);
    bms.handle_timeout(now);
    charger.handle_timeout(now);
    let mut inputs = Vec::new();
    let (mut bms_done, mut charger_done) = (false, false);
    let mut charging_since = None;
    let limit = Timestamp::ZERO + CHARGING + Duration::from_secs(60);
    loop {
        // Move frames until every node is quiet.
        loop {
            let mut moved = false;
            while let Some(frame) = bms.poll_transmit() {
                moved = true;
                inputs.push(Input {
                    at: now,
                    side: Side::Bms,
                    frame,
                });
                bridge.handle_frame(Side::Bms, &frame, now);
            }
            while let Some(frame) = charger.poll_transmit() {
                moved = true;
                inputs.push(Input {
                    at: now,
                    side: Side::Pile,
                    frame,
                });
                bridge.handle_frame(Side::Pile, &frame, now);
            }
            while let Some((side, f)) = bridge.poll_transmit() {
                moved = true;
                match side {
                    Side::Bms => bms.handle_frame(&f, now),
                    Side::Pile => charger.handle_frame(&f, now),
                }
            }
            while bridge.poll_message().is_some() {}
            if !moved {
                break;
            }
        }
        while let Some(ev) = bms.poll_event() {
            match ev {
                NodeEvent::Session(SessionEvent::Finished(_)) => bms_done = true,
                NodeEvent::Session(SessionEvent::PhaseChanged(Phase::Charging)) => {
                    charging_since = Some(now);
                }
                _ => {}
            }
        }
        while let Some(ev) = charger.poll_event() {
            if let NodeEvent::Session(SessionEvent::Finished(_)) = ev {
                charger_done = true;
            }
        }
        if bms_done && charger_done {
            break;
        }
        let next = [
            bms.poll_timeout(),
            charger.poll_timeout(),
            bridge.poll_timeout(),
        ]
        .into_iter()
        .flatten()
        .min();
        let Some(next) = next.filter(|&n| n <= limit) else {
            break;
        };
        now = now.max(next);
        if let Some(since) = charging_since
            && now.saturating_since(since) >= CHARGING
            && bms.role().phase() == Phase::Charging
        {
            bms.role_mut().request_stop(BmsStopReason::SocTarget, now);
        }
        bridge.handle_timeout(now);
        bms.handle_timeout(now);
        charger.handle_timeout(now);
    }
    assert!(
        bms_done && charger_done,
        "the recorded session must complete through the bridge"
    );
    inputs
}

/// Feeds `inputs` to a fresh bridge and drains all it produces; returns
/// how many frames it sent, so nothing is optimised away.
fn replay(bridge: &mut Bridge, inputs: &[Input]) -> usize {
    let mut sent = 0;
    for input in inputs {
        bridge.handle_frame(input.side, &input.frame, input.at);
        while let Some(out) = bridge.poll_transmit() {
            black_box(&out);
            sent += 1;
        }
        while let Some(m) = bridge.poll_message() {
            black_box(&m);
        }
    }
    sent
}

fn is_tp(frame: &CanFrame) -> bool {
    J1939Id::from_can_id(frame.id()).is_ok_and(|id| matches!(id.pgn.raw(), 0xEC00 | 0xEB00))
}

fn bench(c: &mut Criterion) {
    let session = record_session();
    let tp = session.iter().filter(|i| is_tp(&i.frame)).count();
    // The first 250 frames: handshake to charging, most of them TP.
    let start: Vec<Input> = session.iter().take(250).cloned().collect();
    // Charging: single frames only, from the middle of the session.
    let charging: Vec<Input> = session
        .iter()
        .skip(session.len() / 3)
        .filter(|i| !is_tp(&i.frame))
        .take(1000)
        .cloned()
        .collect();
    eprintln!(
        "bridge bench: recorded session of {} frames into the bridge ({tp} TP), {} frames at the start, {} single frames while charging",
        session.len(),
        start.len(),
        charging.len()
    );
    let mut group = c.benchmark_group("bridge");
    for (name, inputs) in [
        ("session", &session),
        ("start", &start),
        ("charging", &charging),
    ] {
        group.throughput(Throughput::Elements(inputs.len() as u64));
        group.bench_function(name, |b| {
            b.iter_batched_ref(
                fresh_bridge,
                |bridge| replay(bridge, inputs),
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
