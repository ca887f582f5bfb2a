//! The charger and BMS state machines pumped against each other in memory,
//! message by message, with explicit time: a full session and a timeout in
//! every phase.

use std::time::Duration;

use super::bms::{Bms, BmsConfig, BmsStopReason};
use super::charger::{Charger, ChargerConfig};
use super::session::{FailureReason, Outcome, Phase, Role, SessionEvent};
use super::*;
use crate::time::Timestamp;

/// Everything a pump run produced.
#[derive(Debug, Default)]
struct Run {
    /// (time, sender is charger, message)
    log: Vec<(Timestamp, bool, Message)>,
    charger_phases: Vec<Phase>,
    bms_phases: Vec<Phase>,
    charger_outcome: Option<Outcome>,
    bms_outcome: Option<Outcome>,
}

fn drain_events(role: &mut impl Role, phases: &mut Vec<Phase>, outcome: &mut Option<Outcome>) {
    while let Some(ev) = role.poll_event() {
        match ev {
            SessionEvent::PhaseChanged(p) => phases.push(p),
            SessionEvent::Finished(o) => *outcome = Some(o),
        }
    }
}

/// Pump until both sides finish or `limit` passes. `deliver(from_charger,
/// msg, now)` decides whether a message reaches the other side; `on_tick`
/// lets a test act on the BMS (stop requests) as time passes.
fn pump(
    charger: &mut Charger,
    bms: &mut Bms,
    limit: Duration,
    deliver: impl Fn(bool, &Message, Timestamp) -> bool,
    mut on_tick: impl FnMut(&mut Bms, Timestamp),
) -> Run {
    let mut run = Run::default();
    let mut now = Timestamp::ZERO;
    let end = Timestamp::ZERO + limit;
    bms.start(now);
    charger.start(now);
    loop {
        // Exchange messages until both queues are empty (zero latency).
        loop {
            let mut moved = false;
            while let Some(m) = charger.poll_message() {
                moved = true;
                run.log.push((now, true, m.clone()));
                if deliver(true, &m, now) {
                    bms.handle_message(m, now);
                }
            }
            while let Some(m) = bms.poll_message() {
                moved = true;
                run.log.push((now, false, m.clone()));
                if deliver(false, &m, now) {
                    charger.handle_message(m, now);
                }
            }
            if !moved {
                break;
            }
        }
        drain_events(charger, &mut run.charger_phases, &mut run.charger_outcome);
        drain_events(bms, &mut run.bms_phases, &mut run.bms_outcome);
        if run.charger_outcome.is_some() && run.bms_outcome.is_some() {
            return run;
        }
        let next = [charger.poll_timeout(), bms.poll_timeout()]
            .into_iter()
            .flatten()
            .min();
        let Some(next) = next else { return run };
        if next > end {
            return run;
        }
        now = next.max(now);
        on_tick(bms, now);
        charger.handle_timeout(now);
        bms.handle_timeout(now);
    }
}

fn stop_bms_after(after: Duration) -> impl FnMut(&mut Bms, Timestamp) {
    let mut charging_since = None;
    move |bms: &mut Bms, now| {
        if bms.phase() == Phase::Charging {
            let since = *charging_since.get_or_insert(now);
            if now.saturating_since(since) >= after {
                bms.request_stop(BmsStopReason::SocTarget, now);
            }
        }
    }
}

fn kinds_sent(run: &Run, by_charger: bool) -> Vec<MessageKind> {
    let mut out: Vec<MessageKind> = Vec::new();
    for (_, c, m) in &run.log {
        if *c == by_charger && out.last() != Some(&m.kind()) {
            out.push(m.kind());
        }
    }
    out
}

#[test]
fn full_session_stopped_by_the_bms() {
    let mut charger = Charger::new(ChargerConfig::default());
    let mut bms = Bms::new(BmsConfig::default());
    let run = pump(
        &mut charger,
        &mut bms,
        Duration::from_secs(60),
        |_, _, _| true,
        stop_bms_after(Duration::from_secs(3)),
    );
    assert!(
        run.charger_outcome
            .as_ref()
            .is_some_and(Outcome::is_completed),
        "{run:?}"
    );
    assert!(
        run.bms_outcome.as_ref().is_some_and(Outcome::is_completed),
        "{run:?}"
    );
    let expected = [
        Phase::Handshake,
        Phase::Recognition,
        Phase::Configuration,
        Phase::Charging,
        Phase::Stopping,
        Phase::Statistics,
        Phase::Done,
    ];
    assert_eq!(run.charger_phases, expected);
    assert_eq!(run.bms_phases, expected);
    // The charger's messages in order of first appearance.
    let c = kinds_sent(&run, true);
    let order = [
        MessageKind::Chm,
        MessageKind::Crm,
        MessageKind::Cts,
        MessageKind::Cro,
        MessageKind::Ccs,
        MessageKind::Cst,
        MessageKind::Csd,
    ];
    let pos: Vec<usize> = order
        .iter()
        .map(|k| {
            c.iter()
                .position(|x| x == k)
                .unwrap_or_else(|| panic!("{k} never sent: {c:?}"))
        })
        .collect();
    assert!(pos.windows(2).all(|w| w[0] < w[1]), "{c:?}");
    // BST carries the reason the BMS gave.
    let bst = run.log.iter().find_map(|(_, _, m)| match m {
        Message::Bst(b) => Some(b.clone()),
        _ => None,
    });
    assert_eq!(bst.map(|b| b.soc_target_reached), Some(Bits2::SET));
    // CCS repeats at 50 ms while charging: about 3 s / 50 ms of them.
    let ccs = run
        .log
        .iter()
        .filter(|(_, c, m)| *c && m.kind() == MessageKind::Ccs)
        .count();
    assert!((55..=65).contains(&ccs), "{ccs} CCS in 3 s");
}

#[test]
fn full_session_stopped_by_the_charger() {
    let mut charger = Charger::new(ChargerConfig {
        max_charging_time: Some(Duration::from_secs(2)),
        ..ChargerConfig::default()
    });
    let mut bms = Bms::new(BmsConfig::default());
    let run = pump(
        &mut charger,
        &mut bms,
        Duration::from_secs(60),
        |_, _, _| true,
        |_, _| {},
    );
    assert!(
        run.charger_outcome
            .as_ref()
            .is_some_and(Outcome::is_completed),
        "{run:?}"
    );
    assert!(
        run.bms_outcome.as_ref().is_some_and(Outcome::is_completed),
        "{run:?}"
    );
    let cst = run.log.iter().find_map(|(_, _, m)| match m {
        Message::Cst(c) => Some(c.clone()),
        _ => None,
    });
    assert_eq!(cst.map(|c| c.conditions_reached), Some(Bits2::SET));
    let bst = run.log.iter().find_map(|(_, _, m)| match m {
        Message::Bst(b) => Some(b.clone()),
        _ => None,
    });
    assert_eq!(bst.map(|b| b.charger_stopped), Some(Bits2::SET));
}

/// Silence one side from the moment the other enters `phase`, and check that
/// the other side times out waiting for `waiting_for` in that phase and sends
/// the error message with the matching flag.
fn silent_peer(silence_charger: bool, phase: Phase, waiting_for: MessageKind) -> Run {
    let mut charger = Charger::new(ChargerConfig::default());
    let mut bms = Bms::new(BmsConfig::default());
    let silent = std::cell::Cell::new(false);
    let run = pump(
        &mut charger,
        &mut bms,
        Duration::from_secs(60),
        |from_charger, msg, _| {
            // The silence starts once the watched side sends a message that
            // shows it has entered `phase`.
            let starts = phase_starts_with(phase, !silence_charger);
            if from_charger != silence_charger && starts.contains(&msg.kind()) {
                silent.set(true);
            }
            !(from_charger == silence_charger && silent.get())
        },
        stop_bms_after(Duration::from_secs(2)),
    );
    let (outcome, phases) = if silence_charger {
        (&run.bms_outcome, &run.bms_phases)
    } else {
        (&run.charger_outcome, &run.charger_phases)
    };
    match outcome {
        Some(Outcome::Failed { phase: p, reason }) => {
            assert_eq!(*p, phase, "{run:?}");
            assert_eq!(*reason, FailureReason::Timeout { waiting_for }, "{run:?}");
        }
        other => panic!("expected a timeout in {phase}, got {other:?}"),
    }
    assert!(phases.contains(&Phase::Error), "{phases:?}");
    run
}

/// Messages that show the sender has entered `phase`.
fn phase_starts_with(phase: Phase, charger: bool) -> Vec<MessageKind> {
    use MessageKind as K;
    match (phase, charger) {
        (Phase::Handshake, false) => vec![K::Bhm],
        (Phase::Recognition, false) => vec![K::Brm],
        (Phase::Configuration, false) => vec![K::Bcp],
        (Phase::Charging, false) => vec![K::Bcl],
        (Phase::Stopping, false) => vec![K::Bst],
        (Phase::Statistics, false) => vec![K::Bsd],
        (Phase::Recognition, true) => vec![K::Crm],
        (Phase::Configuration, true) => vec![K::Cml],
        (Phase::Charging, true) => vec![K::Ccs],
        (Phase::Stopping, true) => vec![K::Cst],
        (Phase::Statistics, true) => vec![K::Csd],
        _ => vec![],
    }
}

fn error_message(run: &Run, from_charger: bool) -> Option<Message> {
    run.log
        .iter()
        .rev()
        .find(|(_, c, m)| *c == from_charger && matches!(m, Message::Bem(_) | Message::Cem(_)))
        .map(|(_, _, m)| m.clone())
}

/// Reads the flag a timeout should set.
type BemFlag = fn(&Bem) -> Bits2;
type CemFlag = fn(&Cem) -> Bits2;

#[test]
fn bms_times_out_in_every_phase_and_sends_the_matching_bem() {
    use MessageKind as K;
    let cases: [(Phase, K, BemFlag); 6] = [
        (Phase::Handshake, K::Crm, |b| b.crm00_timeout),
        (Phase::Recognition, K::Crm, |b| b.crmaa_timeout),
        (Phase::Configuration, K::Cml, |b| b.cts_cml_timeout),
        (Phase::Charging, K::Ccs, |b| b.ccs_timeout),
        (Phase::Stopping, K::Cst, |b| b.cst_timeout),
        (Phase::Statistics, K::Csd, |b| b.csd_timeout),
    ];
    for (phase, waiting_for, flag) in cases {
        let run = silent_peer(true, phase, waiting_for);
        match error_message(&run, false) {
            Some(Message::Bem(bem)) => assert_eq!(flag(&bem), Bits2::SET, "{phase}: {bem:?}"),
            other => panic!("{phase}: expected BEM, got {other:?}"),
        }
    }
}

#[test]
fn charger_times_out_in_every_phase_and_sends_the_matching_cem() {
    use MessageKind as K;
    let cases: [(Phase, K, CemFlag); 5] = [
        (Phase::Recognition, K::Brm, |c| c.brm_timeout),
        (Phase::Configuration, K::Bro, |c| c.bro_timeout),
        (Phase::Charging, K::Bcl, |c| c.bcl_timeout),
        (Phase::Stopping, K::Bsd, |c| c.bsd_timeout),
        (Phase::Statistics, K::Csd, |_| Bits2::SET),
    ];
    for (phase, waiting_for, flag) in cases {
        if phase == Phase::Statistics {
            // The charger's last phase waits for nothing: it sends CSD and ends.
            continue;
        }
        let run = silent_peer(false, phase, waiting_for);
        match error_message(&run, true) {
            Some(Message::Cem(cem)) => assert_eq!(flag(&cem), Bits2::SET, "{phase}: {cem:?}"),
            other => panic!("{phase}: expected CEM, got {other:?}"),
        }
    }
}

#[test]
fn charger_without_bhm_gives_up_after_the_default_timeout() {
    let mut charger = Charger::new(ChargerConfig::default());
    let mut bms = Bms::new(BmsConfig::default());
    let run = pump(
        &mut charger,
        &mut bms,
        Duration::from_secs(60),
        |c, _, _| c,
        |_, _| {},
    );
    match run.charger_outcome {
        Some(Outcome::Failed { phase, reason }) => {
            assert_eq!(phase, Phase::Handshake);
            assert_eq!(
                reason,
                FailureReason::Timeout {
                    waiting_for: MessageKind::Bhm
                }
            );
        }
        other => panic!("{other:?}"),
    }
    // Gave up at 5 s, not before.
    let last_chm = run
        .log
        .iter()
        .filter(|(_, c, _)| *c)
        .map(|(t, _, _)| *t)
        .max();
    assert!(
        last_chm
            .is_some_and(|t| t >= Timestamp::from_millis(4750) && t < Timestamp::from_millis(5000))
    );
}

#[test]
fn bem_from_the_bms_ends_the_charger_session() {
    let mut charger = Charger::new(ChargerConfig::default());
    charger.start(Timestamp::ZERO);
    charger.handle_message(
        Message::Bem(Bem {
            ccs_timeout: Bits2::SET,
            ..Bem::default()
        }),
        Timestamp::from_millis(10),
    );
    let mut outcome = None;
    while let Some(ev) = charger.poll_event() {
        if let SessionEvent::Finished(o) = ev {
            outcome = Some(o);
        }
    }
    assert!(matches!(
        outcome,
        Some(Outcome::Failed {
            reason: FailureReason::BmsError(_),
            ..
        })
    ));
    assert_eq!(charger.poll_timeout(), None);
}

#[test]
fn held_recognition_keeps_crm_at_00_until_released() {
    let mut charger = Charger::new(ChargerConfig {
        hold_recognition: true,
        ..ChargerConfig::default()
    });
    let mut bms = Bms::new(BmsConfig::default());
    // Never released: the BMS times out waiting for CRM(0xAA).
    let run = pump(
        &mut charger,
        &mut bms,
        Duration::from_secs(60),
        |_, _, _| true,
        |_, _| {},
    );
    assert!(run.log.iter().all(|(_, _, m)| !matches!(
        m,
        Message::Crm(Crm {
            recognition: Recognition::Recognized,
            ..
        })
    )));
    assert!(matches!(
        run.bms_outcome,
        Some(Outcome::Failed {
            phase: Phase::Recognition,
            reason: FailureReason::Timeout {
                waiting_for: MessageKind::Crm
            }
        })
    ));
}

#[test]
fn charger_times_out_on_bcs_alone_while_bcl_keeps_coming() {
    let mut charger = Charger::new(ChargerConfig::default());
    let mut bms = Bms::new(BmsConfig::default());
    let run = pump(
        &mut charger,
        &mut bms,
        Duration::from_secs(60),
        |_, m, _| m.kind() != MessageKind::Bcs,
        |_, _| {},
    );
    assert!(matches!(
        run.charger_outcome,
        Some(Outcome::Failed {
            phase: Phase::Charging,
            reason: FailureReason::Timeout {
                waiting_for: MessageKind::Bcs
            }
        })
    ));
    match error_message(&run, true) {
        Some(Message::Cem(cem)) => assert_eq!(cem.bcs_timeout, Bits2::SET),
        other => panic!("expected CEM, got {other:?}"),
    }
}

/// A charger holding recognition (authentication pending) keeps an early
/// BCP but never acts on it: no configuration, no CML, until released.
#[test]
fn an_early_bcp_never_gets_past_a_held_recognition() {
    let t = Timestamp::from_millis;
    // A charger holding recognition, given BHM, BRM and then an early BCP.
    let held_with_early_bcp = || {
        let mut charger = Charger::new(ChargerConfig {
            hold_recognition: true,
            ..ChargerConfig::default()
        });
        charger.start(t(0));
        charger.handle_message(
            Message::Bhm(Bhm {
                max_charging_voltage: units::DeciVolt(4200),
            }),
            t(10),
        );
        charger.handle_message(Message::Brm(BmsConfig::default().identity), t(20));
        let bcp = Bms::new(BmsConfig::default())
            .charging_parameters()
            .expect("a BCP");
        charger.handle_message(Message::Bcp(bcp), t(30));
        charger
    };
    let mut charger = held_with_early_bcp();
    for ms in (40..10_000).step_by(50) {
        charger.handle_timeout(t(ms));
    }
    let sent: Vec<Message> = std::iter::from_fn(|| charger.poll_message()).collect();
    assert!(
        sent.iter()
            .all(|m| !matches!(m, Message::Cml(_) | Message::Cts(_)))
    );
    assert!(sent.iter().all(|m| !matches!(
        m,
        Message::Crm(Crm {
            recognition: Recognition::Recognized,
            ..
        })
    )));
    // Released: CRM(0xAA) goes out, then configuration on the kept BCP.
    let mut charger = held_with_early_bcp();
    charger.release_recognition(t(100));
    for ms in [100, 101, 350] {
        charger.handle_timeout(t(ms));
    }
    let sent: Vec<MessageKind> = std::iter::from_fn(|| charger.poll_message())
        .map(|m| m.kind())
        .collect();
    let crm_aa = sent.iter().rposition(|k| *k == MessageKind::Crm);
    let cml = sent.iter().position(|k| *k == MessageKind::Cml);
    assert!(
        matches!((crm_aa, cml), (Some(a), Some(c)) if a < c),
        "{sent:?}"
    );
    assert_eq!(charger.phase(), Phase::Configuration);
}

/// A BMS that waits for CCS before BCL: the field charger starts CCS
/// (output off) 500 ms after CRO(0xAA) and the session goes on; the strict
/// one times out on BCL and names the deviation.
#[test]
fn a_bms_waiting_for_ccs_gets_it_from_a_field_charger_only() {
    use crate::interop::{Deviation, Profile};
    for profile in [Profile::Field, Profile::Strict] {
        let mut charger = Charger::new(ChargerConfig {
            profile,
            max_charging_time: Some(Duration::from_secs(2)),
            ..ChargerConfig::default()
        });
        let mut bms = Bms::new(BmsConfig::default());
        // The BMS's BCLs are held back until it has heard a CCS.
        let ccs_heard = std::cell::Cell::new(false);
        let run = pump(
            &mut charger,
            &mut bms,
            Duration::from_secs(60),
            |from_charger, m, _| {
                if from_charger && m.kind() == MessageKind::Ccs {
                    ccs_heard.set(true);
                }
                from_charger || m.kind() != MessageKind::Bcl || ccs_heard.get()
            },
            |_, _| {},
        );
        match profile {
            Profile::Field => {
                assert!(
                    matches!(run.charger_outcome, Some(Outcome::Completed(_))),
                    "{:?}",
                    run.charger_outcome
                );
                let cro = run
                    .log
                    .iter()
                    .find(|(_, c, m)| *c && m.kind() == MessageKind::Cro)
                    .map(|(t, ..)| *t)
                    .expect("CRO");
                let ccs = run
                    .log
                    .iter()
                    .find(|(_, c, m)| *c && m.kind() == MessageKind::Ccs)
                    .map(|(t, ..)| *t)
                    .expect("CCS");
                assert!(
                    ccs.saturating_since(cro) <= Duration::from_millis(600),
                    "{cro} {ccs}"
                );
            }
            Profile::Strict => match &run.charger_outcome {
                Some(Outcome::Failed {
                    reason: FailureReason::Peer(fault),
                    ..
                }) => assert_eq!(fault.reason.deviation(), Some(Deviation::BclWaitsForCcs)),
                other => panic!("{other:?}"),
            },
        }
    }
}
