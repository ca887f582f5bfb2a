//! BMS simulator against pile simulator over the in-process bus with the
//! 250 kbit/s timing model, on tokio's paused clock: a full session, and a
//! timeout in every phase, produced by silencing one side from the moment the
//! other enters that phase.

use std::time::Duration;

use bmsgw::can::virtual_bus::{VirtualBus, VirtualNode};
use bmsgw::can::{BusError, BusEvent, CanBus, CanFrame};
use bmsgw::gbt27930::session::{FailureReason, Outcome, Phase};
use bmsgw::gbt27930::{MessageKind, timeline::phase_of};
use bmsgw::j1939::J1939Id;
use bmsgw::sim::SimError;
use bmsgw::sim::bms::{self, BmsSimOptions};
use bmsgw::sim::pile::{self, PileSimOptions};

const BITRATE: u32 = 250_000;

/// The GB/T PGN a frame carries: its own, or for a TP.CM RTS/BAM the PGN it
/// announces.
fn gbt_kind(frame: &CanFrame) -> Option<MessageKind> {
    let id = J1939Id::from_can_id(frame.id()).ok()?;
    let pgn = if id.pgn.raw() == 0xEC00 && matches!(frame.data().first(), Some(16 | 32)) {
        let d = frame.data();
        let raw = u32::from(*d.get(5)?) | u32::from(*d.get(6)?) << 8 | u32::from(*d.get(7)?) << 16;
        bmsgw::j1939::Pgn::new(raw).ok()?
    } else {
        id.pgn
    };
    MessageKind::from_pgn(pgn)
}

/// A node that goes silent (drops everything it would send) once it has
/// received a message belonging to `phase` from its peer.
struct SilencedAfter {
    inner: VirtualNode,
    phase: Option<Phase>,
    silent: bool,
}

impl CanBus for SilencedAfter {
    async fn send(&mut self, frame: &CanFrame) -> Result<(), BusError> {
        if self.silent {
            return Ok(());
        }
        self.inner.send(frame).await
    }

    fn try_send(&mut self, frame: &CanFrame) -> Result<bool, BusError> {
        if self.silent {
            return Ok(true);
        }
        self.inner.try_send(frame)
    }

    async fn recv(&mut self) -> Result<BusEvent, BusError> {
        let ev = self.inner.recv().await?;
        if let (BusEvent::Frame(f), Some(phase)) = (&ev, self.phase)
            && gbt_kind(f).map(phase_of) == Some(phase)
        {
            self.silent = true;
        }
        Ok(ev)
    }
}

fn quick_bms() -> BmsSimOptions {
    BmsSimOptions {
        soc_start: 50.0,
        soc_end: 52.0,
        current: 150.0,
        duration: Duration::from_secs(3),
        ..BmsSimOptions::default()
    }
}

/// Run both sims; `silence_pile_in` / `silence_bms_in` make that side go quiet.
async fn session(
    silence_pile_in: Option<Phase>,
    silence_bms_in: Option<Phase>,
) -> (
    Result<bmsgw::gbt27930::session::Summary, SimError>,
    Result<bmsgw::gbt27930::session::Summary, SimError>,
) {
    let bus = VirtualBus::with_timing(BITRATE);
    let mut b = SilencedAfter {
        inner: bus.node(),
        phase: silence_bms_in,
        silent: false,
    };
    let mut p = SilencedAfter {
        inner: bus.node(),
        phase: silence_pile_in,
        silent: false,
    };
    let never = std::future::pending::<()>;
    tokio::join!(
        bms::run(&mut b, quick_bms(), never()),
        pile::run(&mut p, PileSimOptions::default(), never()),
    )
}

fn failure(r: &Result<bmsgw::gbt27930::session::Summary, SimError>) -> (Phase, FailureReason) {
    match r {
        Err(SimError::Session(Outcome::Failed { phase, reason })) => (*phase, reason.clone()),
        other => panic!("expected a failed session, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn full_session_over_the_in_process_bus() {
    let started = tokio::time::Instant::now();
    let (b, p) = session(None, None).await;
    let b = b.expect("BMS session completes");
    let p = p.expect("pile session completes");
    assert_eq!(b.final_soc_percent, 52);
    assert_eq!(p.final_soc_percent, 52);
    // 3 s at about 150 A × 370 V is about 0.05 kWh, which CSD's 0.1 kWh
    // resolution reports as 0 or 1: nothing more than that was counted.
    assert!(p.energy_decikwh <= 1, "{p:?}");
    // The whole session takes the charging time plus a few hundred ms of
    // handshakes and statistics, in virtual time.
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(6),
        "{took:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn bms_times_out_in_each_phase_when_the_pile_goes_silent() {
    use MessageKind as K;
    let cases = [
        (Phase::Handshake, K::Crm),
        (Phase::Recognition, K::Crm),
        (Phase::Configuration, K::Cml),
        (Phase::Charging, K::Ccs),
        (Phase::Stopping, K::Cst),
        (Phase::Statistics, K::Csd),
    ];
    for (phase, waiting_for) in cases {
        let (b, _p) = session(Some(phase), None).await;
        assert_eq!(
            failure(&b),
            (phase, FailureReason::Timeout { waiting_for }),
            "silent pile in {phase}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn pile_times_out_in_each_phase_when_the_bms_goes_silent() {
    use MessageKind as K;
    let cases = [
        (Phase::Handshake, Phase::Handshake, K::Bhm),
        (Phase::Recognition, Phase::Recognition, K::Brm),
        (Phase::Configuration, Phase::Configuration, K::Bro),
        (Phase::Charging, Phase::Charging, K::Bcl),
        (Phase::Stopping, Phase::Stopping, K::Bsd),
    ];
    for (silence_in, failed_in, waiting_for) in cases {
        let (_b, p) = session(None, Some(silence_in)).await;
        assert_eq!(
            failure(&p),
            (failed_in, FailureReason::Timeout { waiting_for }),
            "silent BMS in {silence_in}"
        );
    }
}
