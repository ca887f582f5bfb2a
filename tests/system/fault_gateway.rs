//! Fault suite with the gateway in the loop (issue 6, deliverable 3), on
//! tokio's paused clock: the daemon in bridge mode between two in-process
//! 250 kbit/s buses, vouchers only (cloud link disabled), a pile that
//! requires authentication.
//!
//! - 10% loss and 1% corruption on every node, the daemon's included:
//!   every session ends by a standard path, nothing hangs, the daemon stays
//!   healthy, and its own store shows 0 vouchers spent twice and 0 spent
//!   without a record.
//! - The pile goes silent, during authentication and while charging: the
//!   standard timeouts end the session (BEM on the BMS's bus), and the
//!   daemon records it as failed, with the voucher spent once.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::fault_support::{Ledger, Rig, SimResult, no_faults};
use bmsgw::can::fault::FaultConfig;
use bmsgw::can::{BusError, BusEvent, CanBus, CanFrame};
use bmsgw::cloud::messages::SessionResult;
use bmsgw::gbt27930::MessageKind;
use bmsgw::gbt27930::session::{FailureReason, Outcome, Phase};
use bmsgw::j1939::J1939Id;
use bmsgw::sim::SimError;
use bmsgw::sim::bms::BmsSimOptions;
use bmsgw::sim::pile::{self};

/// Far beyond any chain of GB/T timeouts; virtual time.
const HANG: Duration = Duration::from_secs(900);
const SEEDS: u64 = 20;

fn bms_opts() -> BmsSimOptions {
    BmsSimOptions {
        soc_start: 50.0,
        soc_end: 52.0,
        current: 150.0,
        duration: Duration::from_secs(2),
        charger_wait: Some(Duration::from_secs(30)),
        ..BmsSimOptions::default()
    }
}

/// A standard ending, or why it is not one.
fn ending(side: &str, r: &SimResult) -> Result<String, String> {
    let outcome = match r {
        Ok(_) => return Ok("completed".into()),
        Err(SimError::Session(o)) => o,
        // The pile refused to recognise the vehicle (its handshake did not
        // get through): it ends its session, the BMS times out on CRM(0xAA).
        Err(SimError::Unauthenticated { outcome, .. }) => outcome,
        Err(e) => return Err(format!("{side}: {e}")),
    };
    match outcome {
        Outcome::Failed { reason, phase } => match reason {
            FailureReason::Timeout { waiting_for } => Ok(format!("timeout {waiting_for}")),
            FailureReason::BmsError(_) => Ok("BEM".into()),
            FailureReason::ChargerError(_) => Ok("CEM".into()),
            FailureReason::StoppedEarly { by } => Ok(format!("stopped by {by}")),
            FailureReason::Incompatible(_) => Ok("incompatible".into()),
            // A corrupted value refused with CEM/BEM, its flag at 10.
            FailureReason::Peer(_) => Ok("refused".into()),
            other => Err(format!("{side}: not a standard path in {phase}: {other}")),
        },
        Outcome::Completed(_) => Ok("completed".into()),
    }
}

#[tokio::test(start_paused = true)]
async fn loss_and_corruption_through_the_gateway_lose_no_record_and_spend_no_voucher_twice() {
    let mut rig = Rig::new(None);
    rig.add_vouchers(SEEDS as usize * 2);
    let mut ends: BTreeMap<(String, String), u32> = BTreeMap::new();
    let mut problems = Vec::new();
    let mut audited = (0, 0);
    for seed in 1..=SEEDS {
        let faults = FaultConfig::lossy(seed);
        rig.start_daemon(faults);
        let pile_opts = rig.pile_options();
        let (b, p) =
            match tokio::time::timeout(HANG, rig.session(faults, bms_opts(), pile_opts)).await {
                Ok(r) => r,
                Err(_) => panic!("seed {seed}: the session hung for {HANG:?}"),
            };
        let mut show = |r: Result<String, String>| {
            r.unwrap_or_else(|e| {
                problems.push(format!("seed {seed}: {e}"));
                e
            })
        };
        let key = (show(ending("BMS", &b)), show(ending("pile", &p)));
        *ends.entry(key).or_default() += 1;
        // Long enough for the daemon's bus-silence timer to close a
        // session the simulators abandoned.
        tokio::time::sleep(rig.config.session.bus_silence + Duration::from_secs(2)).await;
        if let Err(e) = rig.stop_daemon().await {
            problems.push(format!("seed {seed}: the daemon ended with an error: {e}"));
        }
        let l = rig.ledger();
        let (twice, lost) = Ledger::audit(&rig.issued, l.remaining, &l.records);
        if (twice, lost) != audited {
            problems.push(format!(
                "seed {seed}: spent twice {} -> {twice}, lost {} -> {lost}; notices: {:?}",
                audited.0,
                audited.1,
                rig.drain_notices()
            ));
            audited = (twice, lost);
        }
        rig.drain_notices();
    }
    for ((b, p), n) in &ends {
        println!("{n:>3} × BMS {b}, pile {p}");
    }
    let ledger = rig.ledger();
    let (twice, lost) = Ledger::audit(&rig.issued, ledger.remaining, &ledger.records);
    let spent = rig.issued.len() - ledger.remaining;
    println!(
        "vouchers: {} issued, {spent} spent, {} records ({} completed); spent twice {twice}, lost {lost}",
        rig.issued.len(),
        ledger.records.len(),
        ledger
            .records
            .iter()
            .filter(|r| r.result == SessionResult::Completed)
            .count()
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert_eq!((twice, lost), (0, 0), "{ledger:?}");
    assert!(spent > 0, "no voucher was used: the sessions never got far");
    let completed = ends.get(&("completed".into(), "completed".into()));
    assert!(
        completed.is_some(),
        "no session survived 10% loss: {ends:?}"
    );
}

/// The pile's node, going silent (sending nothing more) from the moment
/// `trigger` holds for a frame it sends or receives.
struct SilentPile<B> {
    inner: B,
    trigger: Trigger,
    silent: bool,
}

impl<B: CanBus> CanBus for SilentPile<B> {
    async fn send(&mut self, frame: &CanFrame) -> Result<(), BusError> {
        if !self.silent && (self.trigger)(frame, true) {
            self.silent = true;
        }
        if self.silent {
            return Ok(());
        }
        self.inner.send(frame).await
    }

    fn try_send(&mut self, frame: &CanFrame) -> Result<bool, BusError> {
        if !self.silent && (self.trigger)(frame, true) {
            self.silent = true;
        }
        if self.silent {
            return Ok(true);
        }
        self.inner.try_send(frame)
    }

    async fn recv(&mut self) -> Result<BusEvent, BusError> {
        let ev = self.inner.recv().await?;
        if let BusEvent::Frame(f) = &ev
            && (self.trigger)(f, false)
        {
            self.silent = true;
        }
        Ok(ev)
    }
}

/// `(frame, sent_by_the_pile)`: whether the pile goes silent now.
type Trigger = Box<dyn Fn(&CanFrame, bool) -> bool + Send>;

fn pgn(f: &CanFrame) -> u32 {
    J1939Id::from_can_id(f.id()).map_or(0, |id| id.pgn.raw())
}

/// Runs one session whose pile goes silent on `trigger`; returns the BMS's
/// result, the number of BEM frames on the BMS's bus, and the ledger.
async fn silent_pile(trigger: impl Fn(&Rig) -> Trigger) -> (SimResult, u32, Ledger, Rig) {
    let mut rig = Rig::new(None);
    rig.add_vouchers(2);
    rig.start_daemon(no_faults());
    let mut watch = rig.bms.node();
    let mut b = rig.bms.node();
    let mut p = SilentPile {
        inner: rig.pile.node(),
        trigger: trigger(&rig),
        silent: false,
    };
    let never = std::future::pending::<()>;
    let pile_opts = rig.pile_options();
    let run = async {
        tokio::join!(
            bmsgw::sim::bms::run(&mut b, bms_opts(), never()),
            pile::run(&mut p, pile_opts, never()),
        )
    };
    let mut bem = 0;
    let (rb, _rp) = tokio::time::timeout(HANG, async {
        let mut run = std::pin::pin!(run);
        loop {
            tokio::select! {
                r = &mut run => return r,
                Ok(BusEvent::Frame(f)) = watch.recv() => {
                    if pgn(&f) == MessageKind::Bem.pgn().raw() { bem += 1 }
                }
            }
        }
    })
    .await
    .expect("the session hung");
    let ended = rig
        .session_ended(rig.config.session.bus_silence + Duration::from_secs(5))
        .await;
    assert!(
        matches!(&ended, Some((result, true)) if result != "completed"),
        "the daemon should end and record a failed session: {ended:?}"
    );
    rig.stop_daemon().await.expect("the daemon stays healthy");
    let ledger = rig.ledger();
    (rb, bem, ledger, rig)
}

fn assert_one_failed_voucher_record(ledger: &Ledger, rig: &Rig) {
    let (twice, lost) = Ledger::audit(&rig.issued, ledger.remaining, &ledger.records);
    assert_eq!((twice, lost), (0, 0), "{ledger:?}");
    assert_eq!(ledger.remaining, 1, "exactly one voucher spent");
    assert_eq!(ledger.records.len(), 1, "{ledger:?}");
    assert!(
        matches!(ledger.records[0].result, SessionResult::Failed { .. }),
        "{ledger:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn pile_silent_while_charging_ends_by_the_ccs_timeout_and_is_recorded() {
    // Silent from its first CCS on.
    let (bms, bem, ledger, rig) = silent_pile(|_| {
        Box::new(|f: &CanFrame, sent: bool| sent && pgn(f) == MessageKind::Ccs.pgn().raw())
    })
    .await;
    match &bms {
        Err(SimError::Session(Outcome::Failed {
            phase: Phase::Charging,
            reason:
                FailureReason::Timeout {
                    waiting_for: MessageKind::Ccs,
                },
        })) => {}
        other => panic!("expected the BMS's CCS timeout while charging, got {other:?}"),
    }
    assert!(bem > 0, "the BMS sent no BEM");
    assert_one_failed_voucher_record(&ledger, &rig);
}

#[tokio::test(start_paused = true)]
async fn pile_silent_during_authentication_ends_by_the_crm_timeout_and_is_recorded() {
    // Silent from the first frame of the gateway's AuthRequest on (its TP
    // RTS, from the gateway's address).
    let (bms, bem, ledger, rig) = silent_pile(|rig| {
        let gateway = rig.config.can.address.0;
        Box::new(move |f: &CanFrame, sent: bool| {
            !sent && J1939Id::from_can_id(f.id()).is_ok_and(|id| id.source.0 == gateway)
        })
    })
    .await;
    match &bms {
        Err(SimError::Session(Outcome::Failed {
            reason:
                FailureReason::Timeout {
                    waiting_for: MessageKind::Crm,
                },
            ..
        })) => {}
        other => panic!("expected the BMS's CRM(0xAA) timeout, got {other:?}"),
    }
    assert!(bem > 0, "the BMS sent no BEM");
    assert_one_failed_voucher_record(&ledger, &rig);
}

/// SIGTERM while the gateway waits for the cloud: the credential task has
/// spent nothing and must spend nothing afterwards, and the daemon must not
/// leave it running (it would hold the store and take a voucher for a
/// session that no longer exists once the cloud's timeout expires).
/// Real clock: the "cloud" is a TCP listener that accepts and never answers,
/// so the link stays connecting and the request waits for its timeout.
#[tokio::test]
async fn sigterm_while_the_cloud_is_asked_spends_no_voucher_and_stops_the_request() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("listener");
    let port = listener.local_addr().expect("address").port();
    let silent_broker = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let mut rig = Rig::new(Some(port));
    rig.config.cloud.request_timeout = Duration::from_secs(4);
    rig.add_vouchers(2);
    rig.start_daemon(no_faults());

    let (mut b, mut p) = (rig.bms.node(), rig.pile.node());
    let pile_opts = rig.pile_options();
    let sims = tokio::spawn(async move {
        let never = std::future::pending::<()>;
        tokio::join!(
            bmsgw::sim::bms::run(&mut b, bms_opts(), never()),
            pile::run(&mut p, pile_opts, never()),
        )
    });
    let asked = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some((_, n)) = rig.notices.recv().await {
            if matches!(
                n,
                bmsgw::gateway::orchestrator::Notice::ChargeRequest { .. }
            ) {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(asked, Ok(true), "no charge request reached the gateway");
    // Well inside the 4 s the request waits.
    tokio::time::sleep(Duration::from_millis(300)).await;
    rig.stop_daemon().await.expect("a clean stop");

    // Nothing of the daemon may still run: the store opens at once.
    let ledger = rig.ledger();
    assert_eq!(ledger.remaining, 2, "no voucher spent: {ledger:?}");
    assert!(
        Ledger::voucher_tickets(&ledger.records).is_empty(),
        "{ledger:?}"
    );
    // And stays so after the cloud's timeout would have expired.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        rig.ledger().remaining,
        2,
        "a voucher was spent after the stop"
    );
    sims.abort();
    silent_broker.abort();
}
