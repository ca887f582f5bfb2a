//! Attack suite, bridge mode: the pile side tries to reach the BMS with
//! every PGN outside the allowlist, and to exhaust the gateway's transport
//! sessions (RTS and BAM for 1785 bytes from every source address, CTS and
//! TP.DT storms) while a legitimate session runs.
//!
//! Two levels: the sans-IO [`Bridge`] fed directly (exhaustive, every
//! encoding), and the daemon itself (`service::daemon::run_on`) between two
//! in-process buses with the 250 kbit/s timing model, on tokio's paused
//! clock (`sim::attack::rig`). Results are tabled in docs/security-tests.md.

use std::time::Duration;

use bmsgw::can::CanFrame;
use bmsgw::gateway::bridge::Bridge;
use bmsgw::gateway::firewall::{FirewallConfig, Side, default_pile_to_bms};
use bmsgw::gbt27930::{BMS_ADDRESS, CHARGER_ADDRESS};
use bmsgw::j1939::tp::MAX_TP_LEN;
use bmsgw::j1939::{Address, J1939Id, Pgn, Priority};
use bmsgw::sim::attack::rig::{Recorder, Rig, RigOptions};
use bmsgw::time::Timestamp;

const BMS: Address = Address(BMS_ADDRESS);
const PILE: Address = Address(CHARGER_ADDRESS);
const GATEWAY: Address = Address(0xF5);
const TP_CM: u32 = 0xEC00;
const TP_DT: u32 = 0xEB00;

fn frame(pgn: u32, source: Address, destination: Address, data: &[u8]) -> CanFrame {
    let pgn = Pgn::new(pgn).expect("valid PGN");
    // TP at priority 7, as every J1939 stack sends it; others at 6.
    let priority = if pgn.raw() == TP_CM || pgn.raw() == TP_DT {
        7
    } else {
        6
    };
    let id = J1939Id::new(
        Priority::new(priority).expect("0..=7"),
        pgn,
        source,
        destination,
    );
    CanFrame::new(id.to_can_id(), data).expect("at most 8 bytes")
}

fn pgn_bytes(pgn: u32) -> [u8; 3] {
    let b = pgn.to_le_bytes();
    [b[0], b[1], b[2]]
}

/// TP.CM RTS (J1939-21: 16, size, packets, max per CTS, PGN).
fn rts(source: Address, destination: Address, size: u16, pgn: u32) -> CanFrame {
    let [s0, s1] = size.to_le_bytes();
    let packets = u8::try_from(usize::from(size).div_ceil(7)).expect("at most 255");
    let [p0, p1, p2] = pgn_bytes(pgn);
    frame(
        TP_CM,
        source,
        destination,
        &[16, s0, s1, packets, 0xFF, p0, p1, p2],
    )
}

/// TP.CM BAM (32, size, packets, FF, PGN) to global.
fn bam(source: Address, size: u16, pgn: u32) -> CanFrame {
    let [s0, s1] = size.to_le_bytes();
    let packets = u8::try_from(usize::from(size).div_ceil(7)).expect("at most 255");
    let [p0, p1, p2] = pgn_bytes(pgn);
    frame(
        TP_CM,
        source,
        Address::GLOBAL,
        &[32, s0, s1, packets, 0xFF, p0, p1, p2],
    )
}

/// TP.CM CTS (17, count, next, FF FF, PGN).
fn cts(source: Address, destination: Address, count: u8, next: u8, pgn: u32) -> CanFrame {
    let [p0, p1, p2] = pgn_bytes(pgn);
    frame(
        TP_CM,
        source,
        destination,
        &[17, count, next, 0xFF, 0xFF, p0, p1, p2],
    )
}

fn dt(source: Address, destination: Address, seq: u8) -> CanFrame {
    frame(
        TP_DT,
        source,
        destination,
        &[seq, 0xDE, 0xAD, 0xBE, 0xEF, 1, 2, 3],
    )
}

/// Every valid 18-bit PGN: PDU1 ones with a zero low byte, all PDU2 ones.
fn every_pgn() -> impl Iterator<Item = u32> {
    (0..=Pgn::MAX).filter(|&p| Pgn::new(p).is_ok())
}

/// The PGNs the pile may not send to the BMS, without the two transport
/// PGNs (their abuse is the transport tests' subject).
fn forbidden_pgns() -> Vec<u32> {
    let allowed = default_pile_to_bms();
    every_pgn()
        .filter(|&p| !allowed.iter().any(|a| a.raw() == p) && p != TP_CM && p != TP_DT)
        .collect()
}

fn bridge() -> Bridge {
    Bridge::new(FirewallConfig::gbt27930(BMS, PILE, GATEWAY))
}

/// Feed `frames` from the pile side, 1 ms apart from `t`; returns what the
/// bridge sent towards the BMS and reported as forwarded.
fn inject(b: &mut Bridge, frames: &[CanFrame], t: &mut u64) -> (usize, usize) {
    let (mut to_bms, mut forwarded) = (0, 0);
    for f in frames {
        *t += 1;
        let now = Timestamp::from_millis(*t);
        b.handle_frame(Side::Pile, f, now);
        b.handle_timeout(now);
        while let Some((side, _)) = b.poll_transmit() {
            if side == Side::Bms {
                to_bms += 1;
            }
        }
        while b.poll_message().is_some() {
            forwarded += 1;
        }
    }
    (to_bms, forwarded)
}

/// Sans-IO, exhaustive: every PGN outside the pile's allowlist, as a single
/// frame to the BMS and to global, as an RTS/CTS transfer and as a BAM
/// (with their data packets), from the pile's own address. Nothing reaches
/// the BMS, each is counted, and an RTS for them is never answered.
#[test]
fn every_pgn_outside_the_allowlist_is_dropped_in_every_encoding() {
    let pgns = forbidden_pgns();
    // 4 data pages x (240 PDU1 + 4096 PDU2) valid PGNs, minus the
    // charger's messages of the standard and the two TP PGNs.
    assert_eq!(
        pgns.len(),
        4 * (240 + 16 * 256) - default_pile_to_bms().len() - 2
    );
    let mut b = bridge();
    let mut t = 0;
    let (mut to_bms, mut forwarded, mut to_pile) = (0, 0, 0);
    for &p in &pgns {
        let mut frames = vec![
            frame(p, PILE, BMS, &[0xA5; 8]),
            frame(p, PILE, Address::GLOBAL, &[0x5A; 8]),
            rts(PILE, BMS, 20, p),
        ];
        frames.extend((1..=3).map(|s| dt(PILE, BMS, s)));
        frames.push(bam(PILE, 20, p));
        frames.extend((1..=3).map(|s| dt(PILE, Address::GLOBAL, s)));
        for f in &frames {
            t += 1;
            let now = Timestamp::from_millis(t);
            b.handle_frame(Side::Pile, f, now);
            while let Some((side, _)) = b.poll_transmit() {
                match side {
                    Side::Bms => to_bms += 1,
                    // No CTS, no Abort: a forbidden RTS is never answered.
                    Side::Pile => to_pile += 1,
                }
            }
            while b.poll_message().is_some() {
                forwarded += 1;
            }
        }
    }
    assert_eq!((to_bms, forwarded, to_pile), (0, 0, 0));
    let c = b.counters();
    // Single frames (2) and announcements (2) are counted per PGN; the DTs
    // of a refused transfer belong to no session and vanish silently.
    assert_eq!(c.dropped_not_allowed, 4 * pgns.len() as u64);
    assert_eq!(c.forwarded_pile_to_bms, 0);
    assert_eq!(c.peak_tp_sessions, 0, "nothing was ever buffered");
}

/// Sans-IO: RTS and BAM for 1785 bytes from every source address to every
/// address that matters, renewed, with CTS and TP.DT storms, for allowed
/// PGNs. The bridge holds at most one transfer per side and direction; its
/// peak load is within the transport's fixed limits.
#[test]
fn transport_abuse_from_every_address_keeps_the_bridge_bounded() {
    let mut b = bridge();
    let mut t = 0;
    let big = u16::try_from(MAX_TP_LEN).expect("1785");
    let allowed: Vec<u32> = default_pile_to_bms().iter().map(|p| p.raw()).collect();
    let mut to_bms_total = 0;
    for round in 0..3u8 {
        let mut frames = Vec::new();
        for sa in 0..=0xFD_u8 {
            let sa = Address(sa);
            let pgn = allowed[usize::from(sa.0) % allowed.len()];
            for dst in [BMS, GATEWAY, Address(0x01), Address(0xFE)] {
                frames.push(rts(sa, dst, big, pgn));
                frames.push(cts(sa, dst, 255, 1 + round, pgn));
                frames.push(dt(sa, dst, 1 + round));
            }
            frames.push(bam(sa, big, pgn));
            frames.push(dt(sa, Address::GLOBAL, 1 + round));
        }
        let (to_bms, forwarded) = inject(&mut b, &frames, &mut t);
        assert_eq!(forwarded, 0, "no abusive transfer completes");
        to_bms_total += to_bms;
        let load = b.load();
        assert!(load.tp_sessions <= 2, "{load:?}");
    }
    assert_eq!(to_bms_total, 0);
    let c = b.counters().clone();
    // The pile's address gets one RTS/CTS session and one BAM; everyone
    // else is refused before the transport.
    assert!(c.peak_tp_sessions <= 2, "{c:?}");
    assert!(c.peak_tp_buffered_bytes <= 2 * MAX_TP_LEN as u64, "{c:?}");
    assert!(c.dropped_wrong_address > 3 * 253 * 10, "{c:?}");
    // The abandoned transfers time out and free everything.
    t += 5_000;
    b.handle_timeout(Timestamp::from_millis(t));
    assert_eq!(b.load().tp_sessions, 0);
    assert_eq!(b.load().tp_buffered_bytes, 0);
}

/// The daemon on the in-process bus: every PGN outside the allowlist, as a
/// single frame and as an RTS, from the pile's bus. The BMS's bus carries
/// nothing at all.
#[tokio::test(start_paused = true)]
async fn daemon_forwards_none_of_the_pgns_outside_the_allowlist() {
    let rig = Rig::start(RigOptions {
        vouchers: 0,
        ..RigOptions::default()
    })
    .await
    .expect("rig");
    let bms_side = Recorder::start(&rig.bms_bus);
    let mut attacker = rig.pile_bus.node();
    let pgns = forbidden_pgns();
    let mut sent = 0u64;
    for &p in &pgns {
        for f in [frame(p, PILE, BMS, &[0xA5; 8]), rts(PILE, BMS, 20, p)] {
            bmsgw::can::CanBus::send(&mut attacker, &f)
                .await
                .expect("send");
            sent += 1;
        }
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (bms_frames, lost) = bms_side.finish().await;
    assert_eq!(lost, 0);
    assert_eq!(bms_frames.len(), 0, "{:?}", bms_frames.first());
    assert_eq!(
        rig.firewall_counter("dropped_not_allowed").await,
        sent,
        "every injected frame counted"
    );
    assert_eq!(rig.pile_bus.stats().frames_dropped, 0, "the daemon kept up");
    assert!(rig.daemon_running());
    rig.stop().await.expect("clean stop");
}

/// The daemon on the in-process bus: a legitimate authenticated session
/// while every other address on the inlet bus keeps RTS and BAM for 1785
/// bytes open (renewed within T2), with CTS and TP.DT storms at the BMS's
/// and the gateway's addresses. The session completes; the bridge's load
/// stays within its limits.
///
/// Regression: before the auth node filtered by source, four such RTS took
/// its transport's buffers and the pile's AuthChallenge was refused
/// (`NoResources`), so the BMS never got past recognition.
#[tokio::test(start_paused = true)]
async fn a_session_completes_under_transport_abuse_from_every_address() {
    let rig = Rig::start(RigOptions::default()).await.expect("rig");
    let mut attacker = rig.pile_bus.node();
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let big = u16::try_from(MAX_TP_LEN).expect("1785");
    let abuse = async move {
        let mut frames_sent = 0u64;
        let mut round = 0u8;
        loop {
            let started = tokio::time::Instant::now();
            for sa in (0..=0xFD_u8).map(Address).filter(|a| *a != PILE) {
                for f in [
                    rts(sa, GATEWAY, big, 0xEF00),
                    rts(sa, BMS, big, 0x1100),
                    bam(sa, big, 0xEF00),
                    cts(sa, GATEWAY, 255, 1, 0xEF00),
                    dt(sa, BMS, round.wrapping_add(1)),
                ] {
                    tokio::select! {
                        _ = &mut stopped => return frames_sent,
                        r = bmsgw::can::CanBus::send(&mut attacker, &f) => {
                            if r.is_ok() { frames_sent += 1; }
                        }
                    }
                }
            }
            round = round.wrapping_add(1);
            // Renew before T2 (1.25 s) ends the sessions we opened.
            tokio::select! {
                _ = &mut stopped => return frames_sent,
                () = tokio::time::sleep_until(started + Duration::from_secs(1)) => {}
            }
        }
    };
    let session = async {
        // Let the abuse take hold first.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let out = rig.session(rig.genuine_pile().expect("pile")).await;
        let _ = stop.send(());
        out
    };
    let (abuse_frames, (bms, pile)) = tokio::join!(abuse, session);
    assert!(abuse_frames > 4_000, "{abuse_frames}");
    assert!(
        bms.is_ok(),
        "BMS: {bms:?}\npile: {pile:?}\n{:?}",
        rig.status().await
    );
    assert!(pile.is_ok(), "pile: {pile:?}");
    let status = rig.status().await.expect("status");
    let fw = status.firewall.expect("bridge mode has firewall counters");
    let peak = |k: &str| fw.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
    // TpConfig::gbt27930: 8 sessions and 4 x 1785 bytes per side.
    assert!(peak("peak_tp_sessions") <= 16, "{fw}");
    assert!(
        peak("peak_tp_buffered_bytes") <= 8 * MAX_TP_LEN as u64,
        "{fw}"
    );
    assert!(peak("dropped_wrong_address") > 5_000, "{fw}");
    println!(
        "transport abuse: {abuse_frames} frames; peak_tp_sessions {}, peak_tp_buffered_bytes {}, peak_queued {}",
        peak("peak_tp_sessions"),
        peak("peak_tp_buffered_bytes"),
        peak("peak_queued")
    );
    rig.stop().await.expect("clean stop");
}
