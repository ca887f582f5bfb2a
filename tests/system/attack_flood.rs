//! Attack suite: 60 s of junk at 100% bus load on the inlet bus (the
//! in-process bus with the 250 kbit/s timing model, tokio's paused clock),
//! against the daemon in bridge mode (`sim::attack::rig`). Nothing but
//! charger messages from the pile's address that decode reaches the BMS,
//! at most at the rate limit; the bridge's load stays within its fixed
//! limits; a legitimate session completes afterwards.
//!
//! It prints the figures docs/security-tests.md quotes:
//! `cargo test --test system -- attack_flood:: --nocapture`.

use std::time::Duration;

use bmsgw::can::CanFrame;
use bmsgw::gateway::firewall::default_pile_to_bms;
use bmsgw::gbt27930::{CHARGER_ADDRESS, Message, MessageKind};
use bmsgw::j1939::J1939Id;
use bmsgw::j1939::tp::MAX_TP_LEN;
use bmsgw::sim::attack::flood::{Junk, flood};
use bmsgw::sim::attack::rig::{BITRATE, Recorder, Rig, RigOptions};

const FLOOD: Duration = Duration::from_secs(60);

/// Whether `f`, seen on the BMS's bus, is something the bridge may send
/// there: from the pile's address, a TP frame (which only the bridge's own
/// transport cuts) or an allowed charger message that decodes.
fn allowed_on_the_bms_bus(f: &CanFrame) -> bool {
    let Ok(id) = J1939Id::from_can_id(f.id()) else {
        return false;
    };
    if id.source.0 != CHARGER_ADDRESS {
        return false;
    }
    if id.pgn.raw() == 0xEC00 || id.pgn.raw() == 0xEB00 {
        return true;
    }
    default_pile_to_bms().contains(&id.pgn) && Message::decode(id.pgn, f.data()).is_ok()
}

fn vm_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[tokio::test(start_paused = true)]
async fn sixty_seconds_of_junk_at_full_load_then_a_session_completes() {
    let rig = Rig::start(RigOptions::default()).await.expect("rig");
    let rss_before = vm_kib("VmRSS:");
    let bms_side = Recorder::start(&rig.bms_bus);
    let busy_before = rig.pile_bus.stats().busy_time;
    let mut attacker = rig.pile_bus.node();
    let mut junk = Junk::new(0x5EED);
    let report = flood(&mut attacker, &mut junk, None, tokio::time::sleep(FLOOD)).await;
    drop(attacker);
    let load = (rig.pile_bus.stats().busy_time - busy_before).as_secs_f64() / FLOOD.as_secs_f64();
    let (during, lost) = bms_side.finish().await;
    assert_eq!(lost, 0);
    assert!(rig.daemon_running(), "the daemon survived");

    // 100% load: the wire was busy all the time (the last frame may run over).
    assert!(load > 0.99, "bus load {load}");
    assert!(report.frames > 100_000, "{report:?}");
    let junk_through = during
        .iter()
        .filter(|(_, f)| !allowed_on_the_bms_bus(f))
        .count();
    assert_eq!(junk_through, 0, "junk reached the BMS");
    // The flood's valid CMLs pass at most at 100/s plus the burst of 20.
    let cml = during
        .iter()
        .filter(|(_, f)| {
            J1939Id::from_can_id(f.id()).is_ok_and(|id| id.pgn == MessageKind::Cml.pgn())
        })
        .count();
    assert!(cml <= 100 * 60 + 20, "{cml}");

    let fw = rig
        .status()
        .await
        .and_then(|s| s.firewall)
        .expect("firewall counters");
    let get = |k: &str| fw.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
    // TpConfig::gbt27930 on each side: 8 sessions, 4 x 1785 bytes.
    assert!(get("peak_tp_sessions") <= 16, "{fw}");
    assert!(
        get("peak_tp_buffered_bytes") <= 8 * MAX_TP_LEN as u64,
        "{fw}"
    );
    let dropped = get("dropped_not_allowed")
        + get("dropped_wrong_address")
        + get("dropped_malformed")
        + get("dropped_rate_limited")
        + get("for_gateway");
    println!(
        "flood: {} frames in {:?} of bus time ({:.1}% load at {} bit/s); \
         {} frames on the BMS bus, {} of them CML; firewall dropped {}, {fw}; \
         inlet bus frames lost to a full daemon queue: {}; \
         VmRSS before {:?} KiB, after {:?} KiB, VmHWM {:?} KiB",
        report.frames,
        report.wire_time,
        load * 100.0,
        BITRATE,
        during.len(),
        cml,
        dropped,
        rig.pile_bus.stats().frames_dropped,
        rss_before,
        vm_kib("VmRSS:"),
        vm_kib("VmHWM:"),
    );

    // Afterwards, a legitimate session completes.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (bms, pile) = rig.session(rig.genuine_pile().expect("pile")).await;
    assert!(bms.is_ok(), "BMS: {bms:?}");
    assert!(pile.is_ok(), "pile: {pile:?}");
    rig.stop().await.expect("clean stop");
}
