//! Fault suite, CAN side (issue 6, deliverable 3): 10% random frame loss
//! and 1% payload corruption on the in-process bus with the 250 kbit/s
//! timing model, on tokio's paused clock.
//!
//! The BMS simulator and the pile simulator play whole sessions while every
//! node's receive path goes through [`FaultyBus`]. Asserted for every seed:
//! - both sides end, in bounded virtual time (nothing hangs);
//! - each either completes or fails with one of the standard's reasons (a
//!   timeout, a BEM, a CEM, the charger refusing parameters that a flipped
//!   bit made impossible), never with a shell error;
//! - a side that timed out sent its error message (BEM for the BMS, CEM for
//!   the pile) on the wire, as GB/T 27930 requires;
//! - the J1939 transport either delivered a transfer or aborted it: an
//!   EndOfMsgAck or an Abort ends every RTS that got a CTS.
//!
//! Across the seeds both paths must show (completed sessions, BEM/CEM
//! failures, TP aborts), so the test fails if the faults stop being applied.
//! A failing seed is printed; `BMSGW_FAULT_SEED=N` replays just that one.

use std::collections::BTreeMap;
use std::time::Duration;

use bmsgw::can::fault::{FaultConfig, FaultStats, FaultyBus};
use bmsgw::can::virtual_bus::VirtualBus;
use bmsgw::can::{BusEvent, CanBus, CanFrame};
use bmsgw::gbt27930::MessageKind;
use bmsgw::gbt27930::session::{FailureReason, Outcome, Summary};
use bmsgw::j1939::J1939Id;
use bmsgw::sim::SimError;
use bmsgw::sim::bms::{self, BmsSimOptions};
use bmsgw::sim::pile::{self, PileSimOptions};

const BITRATE: u32 = 250_000;
const SEEDS: u64 = 200;
/// Far beyond any GB/T timeout chain (the longest is a few 10 s); reaching
/// it means a hang. Virtual time, so it costs nothing.
const HANG: Duration = Duration::from_secs(900);

const BMS: u8 = 0xF4;
const PILE: u8 = 0x56;
const TP_CM: u32 = 0xEC00;

/// What one side's session came to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum End {
    Completed,
    /// Timed out waiting for this message (and so must have sent BEM/CEM).
    Timeout(MessageKind),
    /// The peer's BEM or CEM ended it.
    PeerError,
    StoppedEarly,
    /// The charger refused the BMS's (corrupted) parameters with CEM.
    Incompatible,
    /// A message that cannot be right (a corrupted value) was refused with
    /// the standard's error message, its flag at 10 ("unreliable").
    Refused,
}

fn classify(side: &str, r: &Result<Summary, SimError>) -> Result<End, String> {
    match r {
        Ok(_) => Ok(End::Completed),
        Err(SimError::Session(Outcome::Failed { reason, .. })) => match reason {
            FailureReason::Timeout { waiting_for } => Ok(End::Timeout(*waiting_for)),
            FailureReason::BmsError(_) | FailureReason::ChargerError(_) => Ok(End::PeerError),
            FailureReason::StoppedEarly { .. } => Ok(End::StoppedEarly),
            FailureReason::Incompatible(_) => Ok(End::Incompatible),
            FailureReason::Peer(_) => Ok(End::Refused),
            other => Err(format!("{side}: not a standard error path: {other}")),
        },
        Err(e) => Err(format!("{side}: {e}")),
    }
}

/// What the (fault-free) monitor saw on the wire.
#[derive(Default, Debug)]
struct Wire {
    bem_from_bms: u32,
    cem_from_pile: u32,
    /// TP.CM control bytes by sender: RTS 16, CTS 17, EndOfMsgAck 19,
    /// Abort 255.
    tp: BTreeMap<(u8, u8), u32>,
}

impl Wire {
    fn see(&mut self, f: &CanFrame) {
        let Ok(id) = J1939Id::from_can_id(f.id()) else {
            return;
        };
        let src = id.source.0;
        let pgn = id.pgn.raw();
        if pgn == MessageKind::Bem.pgn().raw() && src == BMS {
            self.bem_from_bms += 1;
        } else if pgn == MessageKind::Cem.pgn().raw() && src == PILE {
            self.cem_from_pile += 1;
        } else if pgn == TP_CM
            && let Some(&c) = f.data().first()
        {
            *self.tp.entry((src, c)).or_default() += 1;
        }
    }

    fn tp(&self, src: u8, control: u8) -> u32 {
        self.tp.get(&(src, control)).copied().unwrap_or(0)
    }
}

struct Run {
    bms: Result<End, String>,
    pile: Result<End, String>,
    wire: Wire,
    faults: [FaultStats; 2],
}

async fn lossy_session(seed: u64) -> Run {
    let bus = VirtualBus::with_timing(BITRATE);
    let mut b = FaultyBus::new(bus.node(), FaultConfig::lossy(seed));
    // A different stream for the pile, from the same seed.
    let mut p = FaultyBus::new(bus.node(), FaultConfig::lossy(seed ^ 0x5DEE_CE66_D1CE));
    let (bc, pc) = (b.counters(), p.counters());
    let mut monitor = bus.node();
    let bms_opts = BmsSimOptions {
        soc_start: 50.0,
        soc_end: 52.0,
        current: 150.0,
        duration: Duration::from_secs(3),
        ..BmsSimOptions::default()
    };
    let never = std::future::pending::<()>;
    let sessions = async {
        tokio::join!(
            bms::run(&mut b, bms_opts, never()),
            pile::run(&mut p, PileSimOptions::default(), never()),
        )
    };
    let mut wire = Wire::default();
    let watched = async {
        let mut sessions = std::pin::pin!(sessions);
        loop {
            tokio::select! {
                r = &mut sessions => return r,
                ev = monitor.recv() => if let Ok(BusEvent::Frame(f)) = ev { wire.see(&f) },
            }
        }
    };
    let (rb, rp) = match tokio::time::timeout(HANG, watched).await {
        Ok(r) => r,
        Err(_) => panic!("seed {seed}: the session hung for {HANG:?} of virtual time"),
    };
    // What was still in flight when both ended.
    while let Some(BusEvent::Frame(f)) = monitor.try_recv() {
        wire.see(&f);
    }
    Run {
        bms: classify("BMS", &rb),
        pile: classify("pile", &rp),
        wire,
        faults: [bc.stats(), pc.stats()],
    }
}

/// Everything asserted of one run; the problems found, if any.
fn check(run: &Run) -> Vec<String> {
    let mut bad = Vec::new();
    for end in [&run.bms, &run.pile] {
        if let Err(e) = end {
            bad.push(e.clone());
        }
    }
    if let Ok(End::Timeout(k)) = &run.bms
        && *k != MessageKind::Chm
        && run.wire.bem_from_bms == 0
    {
        bad.push(format!("the BMS timed out waiting for {k} but sent no BEM"));
    }
    if let Ok(End::Timeout(k)) = &run.pile
        && run.wire.cem_from_pile == 0
    {
        bad.push(format!(
            "the pile timed out waiting for {k} but sent no CEM"
        ));
    }
    // A transfer that got a CTS ends with EndOfMsgAck or Abort from one of
    // the two; counted per direction (BMS→pile, pile→BMS).
    for (sender, receiver) in [(BMS, PILE), (PILE, BMS)] {
        let cts = run.wire.tp(receiver, 17);
        let ended =
            run.wire.tp(receiver, 19) + run.wire.tp(receiver, 255) + run.wire.tp(sender, 255);
        // Each CTS answers one RTS or asks for a retry inside a transfer, so
        // only the RTS count bounds the transfers. A session that ended
        // mid-transfer leaves at most one open.
        let rts = run.wire.tp(sender, 16);
        if cts > 0 && ended + 1 < rts.min(cts) {
            bad.push(format!(
                "TP {sender:#04x}→{receiver:#04x}: {rts} RTS, {cts} CTS, but only {ended} ended by EndOfMsgAck/Abort"
            ));
        }
    }
    bad
}

fn seeds() -> Vec<u64> {
    match std::env::var("BMSGW_FAULT_SEED") {
        Ok(s) => vec![s.parse().expect("BMSGW_FAULT_SEED is a number")],
        Err(_) => (1..=SEEDS).collect(),
    }
}

#[tokio::test(start_paused = true)]
async fn loss_and_corruption_end_every_session_by_a_standard_path() {
    let mut ends: BTreeMap<(String, String), u32> = BTreeMap::new();
    let mut problems = Vec::new();
    let (mut aborts, mut eoma, mut errors_sent) = (0, 0, 0);
    let mut faults = FaultStats::default();
    for seed in seeds() {
        let run = lossy_session(seed).await;
        let show = |e: &Result<End, String>| match e {
            Ok(e) => format!("{e:?}"),
            Err(e) => e.clone(),
        };
        *ends.entry((show(&run.bms), show(&run.pile))).or_default() += 1;
        for p in check(&run) {
            problems.push(format!("seed {seed}: {p}"));
        }
        aborts += run.wire.tp(BMS, 255) + run.wire.tp(PILE, 255);
        eoma += run.wire.tp(BMS, 19) + run.wire.tp(PILE, 19);
        errors_sent += run.wire.bem_from_bms + run.wire.cem_from_pile;
        for s in run.faults {
            faults.passed += s.passed;
            faults.lost += s.lost;
            faults.corrupted += s.corrupted;
        }
    }
    println!("faults injected: {faults:?}");
    println!("TP: {eoma} EndOfMsgAck, {aborts} Abort; {errors_sent} BEM/CEM frames");
    for ((b, p), n) in &ends {
        println!("{n:>3} × BMS {b}, pile {p}");
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    if seeds().len() > 1 {
        let completed = ends
            .iter()
            .filter(|((b, p), _)| b == "Completed" && p == "Completed")
            .map(|(_, n)| n)
            .sum::<u32>();
        let failed = ends.values().sum::<u32>() - completed;
        assert!(completed > 0, "no session survived 10% loss: {ends:?}");
        assert!(
            failed > 0,
            "no session failed: are faults applied? {ends:?}"
        );
        assert!(errors_sent > 0, "no BEM/CEM was ever sent");
        assert!(eoma > 0, "no TP transfer completed");
        assert!(faults.lost > 0 && faults.corrupted > 0, "{faults:?}");
    }
}
