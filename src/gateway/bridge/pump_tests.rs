//! A BMS node and a charger node, each on its own bus, with the bridge
//! between them: whole sessions in memory, frame by frame, with explicit time.

use std::time::Duration;

use super::*;
use crate::gbt27930::bms::{Bms, BmsConfig, BmsStopReason};
use crate::gbt27930::charger::{Charger, ChargerConfig};
use crate::gbt27930::node::{Node, NodeEvent};
use crate::gbt27930::session::{FailureReason, Outcome, Phase, Role, SessionEvent};
use crate::gbt27930::{BMS_ADDRESS, CHARGER_ADDRESS, Crm, Message, MessageKind, Recognition};
use crate::j1939::Address;

const BMS: Address = Address(BMS_ADDRESS);
const PILE: Address = Address(CHARGER_ADDRESS);

struct Rig {
    bms: Node<Bms>,
    charger: Node<Charger>,
    bridge: Bridge,
    now: Timestamp,
    /// What the BMS decoded, with the time.
    bms_received: Vec<(Timestamp, Message)>,
    bms_outcome: Option<Outcome>,
    charger_outcome: Option<Outcome>,
    /// Messages the bridge reported, with the time.
    observed: Vec<(Timestamp, Side, J1939Message)>,
}

impl Rig {
    fn new(config: FirewallConfig) -> Self {
        let mut rig = Rig {
            bms: Node::new(
                Bms::new(BmsConfig::default()),
                BMS,
                PILE,
                TpConfig::gbt27930(),
            ),
            charger: Node::new(
                Charger::new(ChargerConfig::default()),
                PILE,
                BMS,
                TpConfig::gbt27930(),
            ),
            bridge: Bridge::new(config),
            now: Timestamp::ZERO,
            bms_received: Vec::new(),
            bms_outcome: None,
            charger_outcome: None,
            observed: Vec::new(),
        };
        rig.bms.role_mut().start(Timestamp::ZERO);
        rig.charger.role_mut().start(Timestamp::ZERO);
        rig.bms.handle_timeout(Timestamp::ZERO);
        rig.charger.handle_timeout(Timestamp::ZERO);
        rig
    }

    /// Moves frames between the nodes and the bridge until all are quiet.
    fn settle(&mut self) {
        let now = self.now;
        loop {
            let mut moved = false;
            while let Some(f) = self.bms.poll_transmit() {
                moved = true;
                self.bridge.handle_frame(Side::Bms, &f, now);
            }
            while let Some(f) = self.charger.poll_transmit() {
                moved = true;
                self.bridge.handle_frame(Side::Pile, &f, now);
            }
            while let Some((side, f)) = self.bridge.poll_transmit() {
                moved = true;
                match side {
                    Side::Bms => self.bms.handle_frame(&f, now),
                    Side::Pile => self.charger.handle_frame(&f, now),
                }
            }
            if !moved {
                break;
            }
        }
        while let Some(ev) = self.bms.poll_event() {
            match ev {
                NodeEvent::Received(m) => self.bms_received.push((now, m)),
                NodeEvent::Session(SessionEvent::Finished(o)) => self.bms_outcome = Some(o),
                _ => {}
            }
        }
        while let Some(ev) = self.charger.poll_event() {
            if let NodeEvent::Session(SessionEvent::Finished(o)) = ev {
                self.charger_outcome = Some(o);
            }
        }
        while let Some((side, m)) = self.bridge.poll_message() {
            self.observed.push((now, side, m));
        }
    }

    /// Runs until both sides finish or `limit`; `on_tick` acts between steps.
    fn run(&mut self, limit: Duration, mut on_tick: impl FnMut(&mut Rig)) {
        let end = Timestamp::ZERO + limit;
        loop {
            self.settle();
            if self.bms_outcome.is_some() && self.charger_outcome.is_some() {
                return;
            }
            let next = [
                self.bms.poll_timeout(),
                self.charger.poll_timeout(),
                self.bridge.poll_timeout(),
            ]
            .into_iter()
            .flatten()
            .min();
            let Some(next) = next else { return };
            if next > end {
                return;
            }
            self.now = self.now.max(next);
            on_tick(self);
            let now = self.now;
            self.bridge.handle_timeout(now);
            self.bms.handle_timeout(now);
            self.charger.handle_timeout(now);
        }
    }

    fn first_crm00_from_pile(&self) -> Option<Timestamp> {
        self.observed.iter().find_map(|(t, side, m)| {
            (*side == Side::Pile
                && m.pgn == MessageKind::Crm.pgn()
                && m.data.first() == Some(&0x00))
            .then_some(*t)
        })
    }
}

fn is_crm_aa(m: &Message) -> bool {
    matches!(
        m,
        Message::Crm(Crm {
            recognition: Recognition::Recognized,
            ..
        })
    )
}

/// The BMS stops 3 s into charging; the gateway authenticates the pile
/// `auth_after` after the pile's first CRM(0x00), if at all.
fn session(config: FirewallConfig, auth_after: Option<Duration>) -> Rig {
    let mut rig = Rig::new(config);
    let mut charging_since = None;
    rig.run(Duration::from_secs(60), |rig| {
        let now = rig.now;
        if let (Some(after), Some(crm00)) = (auth_after, rig.first_crm00_from_pile())
            && !rig.bridge.pile_authenticated()
            && now >= crm00 + after
        {
            rig.bridge.set_pile_authenticated(true, now);
        }
        if rig.bms.role().phase() == Phase::Charging {
            let since = *charging_since.get_or_insert(now);
            if now.saturating_since(since) >= Duration::from_secs(3) {
                rig.bms
                    .role_mut()
                    .request_stop(BmsStopReason::SocTarget, now);
                rig.bms.handle_timeout(now);
            }
        }
    });
    rig
}

#[test]
fn a_session_completes_through_the_bridge_with_the_vin_blanked() {
    let auth_after = Duration::from_millis(700);
    let rig = session(
        FirewallConfig::gbt27930(BMS, PILE, Address(0xF5)),
        Some(auth_after),
    );
    assert!(
        rig.bms_outcome.as_ref().is_some_and(Outcome::is_completed),
        "{:?}",
        rig.bms_outcome
    );
    assert!(
        rig.charger_outcome
            .as_ref()
            .is_some_and(Outcome::is_completed),
        "{:?}",
        rig.charger_outcome
    );
    // The pile saw the BMS's identity without its VIN.
    let brm = rig
        .charger
        .role()
        .bms_identity()
        .expect("BRM reached the pile");
    assert_eq!(brm.vin, [0xFF; 17]);
    assert_eq!(brm.manufacturer, BmsConfig::default().identity.manufacturer);

    // The BMS saw no CRM(0xAA) before the pile was authenticated.
    let crm00 = rig
        .first_crm00_from_pile()
        .expect("the pile sent CRM(0x00)");
    let authenticated_at = crm00 + auth_after;
    let first_aa = rig
        .bms_received
        .iter()
        .find(|(_, m)| is_crm_aa(m))
        .map(|(t, _)| *t)
        .expect("the BMS got CRM(0xAA)");
    assert!(
        first_aa >= authenticated_at,
        "{first_aa} < {authenticated_at}"
    );
    // Released on authentication, not at the pile's next period.
    assert!(
        first_aa.saturating_since(authenticated_at) < Duration::from_millis(250),
        "{first_aa}"
    );

    let c = rig.bridge.counters();
    assert!(c.crm_held > 0, "{c:?}");
    assert!(c.vin_blanked > 0 && c.resegmented > 0, "{c:?}");
    assert!(
        c.forwarded_bms_to_pile > 50 && c.forwarded_pile_to_bms > 50,
        "{c:?}"
    );
    assert_eq!(
        (
            c.dropped_not_allowed,
            c.dropped_rate_limited,
            c.dropped_wrong_address,
            c.dropped_malformed,
            c.dropped_busy,
            c.for_gateway
        ),
        (0, 0, 0, 0, 0, 0),
        "{c:?}"
    );

    // The observer saw the whole session from both sides, as rewritten.
    let kinds = |side: Side| -> Vec<MessageKind> {
        rig.observed
            .iter()
            .filter(|(_, s, _)| *s == side)
            .filter_map(|(_, _, m)| MessageKind::from_pgn(m.pgn))
            .collect()
    };
    let from_pile = kinds(Side::Pile);
    let from_bms = kinds(Side::Bms);
    for k in [
        MessageKind::Chm,
        MessageKind::Crm,
        MessageKind::Ccs,
        MessageKind::Csd,
    ] {
        assert!(from_pile.contains(&k), "{k} not observed");
    }
    for k in [
        MessageKind::Bhm,
        MessageKind::Brm,
        MessageKind::Bcs,
        MessageKind::Bsd,
    ] {
        assert!(from_bms.contains(&k), "{k} not observed");
    }
    assert!(rig.observed.iter().all(|(_, side, m)| {
        side != &Side::Bms
            || m.pgn != MessageKind::Brm.pgn()
            || m.data.get(24..41) == Some(&[0xFF; 17][..])
    }));
}

#[test]
fn an_unauthenticated_pile_never_gets_the_bms_past_recognition() {
    let rig = session(FirewallConfig::gbt27930(BMS, PILE, Address(0xF5)), None);
    match &rig.bms_outcome {
        Some(Outcome::Failed {
            phase: Phase::Recognition,
            reason: FailureReason::Timeout { waiting_for },
        }) => assert_eq!(*waiting_for, MessageKind::Crm),
        other => panic!("{other:?}"),
    }
    assert!(!rig.bms_received.iter().any(|(_, m)| is_crm_aa(m)));
    assert!(rig.bridge.counters().crm_held > 0);
    // The pile, which believes it recognised the BMS, never gets BCP: it
    // ends in recognition too (its 5 s BCP timeout and the BMS's BEM race).
    assert!(
        matches!(
            rig.charger_outcome,
            Some(Outcome::Failed {
                phase: Phase::Recognition,
                ..
            })
        ),
        "{:?}",
        rig.charger_outcome
    );
}

#[test]
fn without_gate_and_blanking_the_bridge_is_transparent() {
    let mut config = FirewallConfig::gbt27930(BMS, PILE, Address(0xF5));
    config.gate_recognition = false;
    config.blank_vin = false;
    let rig = session(config, None);
    assert!(rig.bms_outcome.as_ref().is_some_and(Outcome::is_completed));
    assert!(
        rig.charger_outcome
            .as_ref()
            .is_some_and(Outcome::is_completed)
    );
    let brm = rig
        .charger
        .role()
        .bms_identity()
        .expect("BRM reached the pile");
    assert_eq!(brm.vin, BmsConfig::default().identity.vin);
    let c = rig.bridge.counters();
    assert_eq!((c.crm_held, c.vin_blanked), (0, 0));
}
