//! The session orchestrator, sans-IO: what the gateway does at each step of
//! a charging session.
//!
//! It listens to the [`SessionObserver`](super::observer::SessionObserver)
//! and to the results of the shell's work (a credential fetched, the pile's
//! answer) and says what to do next:
//!
//! 1. On the pile's first CRM(0x00) the charger number is known: fetch a
//!    credential (the shell asks the cloud and falls back to a voucher).
//! 2. With a credential: journal a draft record (a voucher is already spent,
//!    so a crash must not lose the session), then authenticate to the pile.
//! 3. The pile accepted: open the gate (in bridge mode CRM(0xAA) may reach
//!    the BMS now).
//! 4. The session ended: the final record for the outbox.
//!
//! A session that never got a credential leaves no record: nothing was
//! spent and the pile never charged on our behalf. Results that arrive for
//! a session that has already ended are dropped (and a credential that came
//! too late is reported, since a voucher may have been spent for it).

use std::collections::VecDeque;
use std::time::Duration;

use tracing::{info, warn};

use super::firewall::Side;
use super::observer::{EndResult, ObserverEvent, SessionEnd};
use super::throttle::{CredentialThrottle, ThrottleConfig};
use super::vehicle_auth::AuthOutcome;
use crate::auth::Credential;
use crate::cloud::exchange::ExchangeParams;
use crate::cloud::messages::{CredentialKind, Id16, SessionRecord, SessionResult, UsedCredential};
use crate::cloud::topics::VehicleId;
use crate::gbt27930::session::Phase;
use crate::interop::{Deviation, LinkDeviations};
use crate::j1939::Address;
use crate::time::Timestamp;

/// How the shell's credential task ended.
#[derive(Debug)]
pub enum CredentialResult {
    /// An online ticket from the cloud.
    Online {
        credential: Credential,
        /// Request to grant.
        elapsed: Duration,
        /// Answers refused on the way (forged, replayed).
        refused: u32,
    },
    /// A voucher from the wallet, already spent durably; `journaled`: its
    /// draft record ([`DraftBasis::draft`]) was committed with the spend, so
    /// it can be presented at once.
    Voucher {
        credential: Credential,
        why: String,
        journaled: bool,
    },
    /// The cloud said no (denied, owner declined or did not approve in
    /// time); no voucher is used then, since that would bypass the decision.
    Denied(String),
    /// Neither the cloud nor the wallet had a credential.
    Unavailable(String),
}

/// What a session's draft record needs besides its credential, all known
/// at the charge request. The shell gets it with [`Action::FetchCredential`]
/// so that it can spend a voucher and journal the draft in one commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DraftBasis {
    pub record_id: Id16,
    pub vehicle_id: VehicleId,
    pub charger_number: u32,
    pub started_at: u32,
}

impl DraftBasis {
    /// The record to report if the session never ends (a crash, `kill -9`):
    /// failed, no energy, stopped at `unix`. The final record replaces it.
    pub fn draft(&self, kind: CredentialKind, ticket_id: [u8; 12], unix: u32) -> SessionRecord {
        let result = SessionResult::Failed {
            reason: "interrupted: the gateway stopped unexpectedly during the session \
                     (recovered at the next start)"
                .into(),
        };
        self.record(UsedCredential { kind, ticket_id }, result, 0, unix)
    }

    /// The session's record, draft or final.
    fn record(
        &self,
        credential: UsedCredential,
        result: SessionResult,
        energy_wh: u32,
        unix: u32,
    ) -> SessionRecord {
        SessionRecord {
            record_id: self.record_id,
            vehicle_id: self.vehicle_id.clone(),
            charger_number: self.charger_number,
            credential,
            energy_wh,
            started_at: self.started_at,
            stopped_at: unix,
            result,
            deviations: LinkDeviations::default(),
        }
    }
}

/// What the shell must do.
#[derive(Debug)]
pub enum Action {
    /// Ask for a credential for `session` (cloud first, voucher fallback).
    FetchCredential {
        session: u64,
        params: ExchangeParams,
        /// For the draft record, if the shell spends a voucher.
        draft: DraftBasis,
    },
    /// Journal `draft`: the record to report if the session never ends.
    /// Call [`Orchestrator::on_journaled`] once it is committed; the
    /// credential is held back until then.
    Journal { draft: SessionRecord },
    /// Run the handshake with the pile at `pile`.
    StartAuth {
        credential: Credential,
        pile: Address,
    },
    /// The pile is authenticated: let recognition through.
    OpenGate,
    /// A new session: hold recognition until the pile proves itself.
    CloseGate,
    /// Queue the final record (and clear its draft).
    Record { record: SessionRecord },
}

/// What happened, for the log, `bmsgw status` and the demo's timeline.
#[derive(Clone, Debug, PartialEq)]
pub enum Notice {
    SessionStarted {
        session: u64,
    },
    ChargeRequest {
        charger_number: u32,
        region_code: [u8; 3],
    },
    Credential {
        kind: CredentialKind,
        elapsed: Duration,
        refused: u32,
        detail: String,
    },
    NoCredential {
        reason: String,
    },
    /// The cloud holds the grant until the owner approves (by `deadline`,
    /// Unix seconds).
    AwaitingApproval {
        deadline: u32,
    },
    PileAuthenticated {
        since_request: Duration,
    },
    PileRefused {
        reason: String,
    },
    /// The gateway refused a message of the BMS or the pile (a deviation
    /// the strict profile refuses, or a value that cannot be right).
    Refused {
        reason: String,
    },
    /// CRM(0xAA): the pile recognised the vehicle and charging can start.
    Recognized {
        since_request: Option<Duration>,
    },
    Phase(Phase),
    SessionEnded {
        result: String,
        energy_wh: Option<u32>,
        recorded: bool,
    },
}

/// The orchestrator's view of the session in progress.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionView {
    pub session: u64,
    pub phase: Phase,
    pub charger_number: Option<u32>,
    pub credential: Option<CredentialKind>,
    pub pile_authenticated: bool,
    pub started_at: u32,
    pub request_to_recognized: Option<Duration>,
}

#[derive(Debug)]
struct Session {
    view: SessionView,
    pile: Option<Address>,
    requested_at: Option<Timestamp>,
    record_id: Option<Id16>,
    ticket_id: Option<[u8; 12]>,
    /// The pile refused or could not be authenticated.
    auth_failure: Option<String>,
    /// A credential was asked for and no answer has come yet.
    fetching: bool,
    /// The credential and the pile to present it to, held until the shell
    /// reports the draft journaled ([`Orchestrator::on_journaled`]).
    held_auth: Option<(Credential, Address)>,
    /// What the BMS and the pile deviated in, for the record.
    deviations: LinkDeviations,
    /// A message the bridge refused (strict profile, implausible value):
    /// why the session failed.
    refusal: Option<String>,
}

/// A session that ended while its credential was still being fetched. The
/// shell's wallet spends a voucher before it hands it over, so a voucher
/// that arrives for such a session is spent all the same, and the cloud's
/// books balance only if it is recorded (the record says it was never used).
#[derive(Debug)]
struct Unanswered {
    session: u64,
    record_id: Id16,
    charger_number: u32,
    started_at: u32,
    ended_at: u32,
}

/// How many [`Unanswered`] sessions are remembered: the credential task
/// answers within the request timeout, long before more sessions can end.
const UNANSWERED_KEPT: usize = 8;

/// The orchestrator; see the module docs.
#[derive(Debug)]
pub struct Orchestrator {
    vehicle_id: VehicleId,
    want_vouchers: u16,
    next_session: u64,
    session: Option<Session>,
    /// How the last session ended, and its energy.
    last: Option<(String, Option<u32>)>,
    unanswered: VecDeque<Unanswered>,
    actions: VecDeque<Action>,
    notices: VecDeque<Notice>,
    /// Limits credential requests (restarting or fake piles).
    throttle: CredentialThrottle,
}

impl Orchestrator {
    pub fn new(vehicle_id: VehicleId, want_vouchers: u16) -> Self {
        Orchestrator {
            vehicle_id,
            want_vouchers,
            next_session: 1,
            session: None,
            last: None,
            unanswered: VecDeque::new(),
            actions: VecDeque::new(),
            notices: VecDeque::new(),
            throttle: CredentialThrottle::default(),
        }
    }

    /// Other limits on credential requests than the defaults.
    pub fn with_throttle(mut self, config: ThrottleConfig) -> Self {
        self.throttle = CredentialThrottle::new(config);
        self
    }

    /// The session in progress, if any.
    pub fn current(&self) -> Option<&SessionView> {
        self.session.as_ref().map(|s| &s.view)
    }

    /// The id the next session will get.
    pub fn next_session_id(&self) -> u64 {
        self.next_session
    }

    /// How the last finished session ended ("completed" or "failed: …").
    pub fn last_result(&self) -> Option<&str> {
        self.last.as_ref().map(|(r, _)| r.as_str())
    }

    /// The energy the pile reported for the last finished session.
    pub fn last_energy_wh(&self) -> Option<u32> {
        self.last.as_ref().and_then(|(_, e)| *e)
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    pub fn poll_notice(&mut self) -> Option<Notice> {
        self.notices.pop_front()
    }

    /// An event from the session observer. `unix` is the wall clock (for
    /// the record), `now` the monotonic one.
    pub fn on_observer(
        &mut self,
        event: ObserverEvent,
        now: Timestamp,
        unix: u32,
        rng: &mut dyn crate::auth::Rng,
    ) {
        match event {
            ObserverEvent::Started => self.start(unix),
            ObserverEvent::ChargeRequest {
                charger_number,
                region_code,
                pile,
            } => {
                if self.session.is_none() {
                    self.start(unix);
                }
                let Some(s) = self.session.as_mut() else {
                    return;
                };
                if s.requested_at.is_some() {
                    return;
                }
                s.requested_at = Some(now);
                s.fetching = true;
                s.pile = Some(pile);
                s.view.charger_number = Some(charger_number);
                // The record id is drawn now so the draft and the final
                // record carry the same one (the cloud deduplicates on it).
                let mut id = [0u8; 16];
                rng.fill(&mut id);
                s.record_id = Some(id);
                self.notices.push_back(Notice::ChargeRequest {
                    charger_number,
                    region_code,
                });
                if let Err(throttled) = self.throttle.request(unix) {
                    let reason = format!("no credential requested: {throttled}");
                    warn!(charger = charger_number, pile = %pile, %reason, "charge request throttled");
                    s.auth_failure = Some(reason.clone());
                    s.fetching = false;
                    self.notices.push_back(Notice::NoCredential { reason });
                    return;
                }
                info!(charger = charger_number, pile = %pile, "charge request; fetching a credential");
                let draft = DraftBasis {
                    record_id: id,
                    vehicle_id: self.vehicle_id.clone(),
                    charger_number,
                    started_at: s.view.started_at,
                };
                self.actions.push_back(Action::FetchCredential {
                    session: s.view.session,
                    params: ExchangeParams {
                        charger_number,
                        region_code,
                        want_vouchers: self.want_vouchers,
                    },
                    draft,
                });
            }
            ObserverEvent::BmsIdentified => {}
            ObserverEvent::Recognized => {
                if let Some(s) = self.session.as_mut() {
                    let since = s.requested_at.map(|t| now.saturating_since(t));
                    if s.view.request_to_recognized.is_none() {
                        s.view.request_to_recognized = since;
                        self.notices.push_back(Notice::Recognized {
                            since_request: since,
                        });
                    }
                }
            }
            ObserverEvent::PhaseChanged(phase) => {
                if let Some(s) = self.session.as_mut() {
                    s.view.phase = phase;
                }
                self.notices.push_back(Notice::Phase(phase));
            }
            ObserverEvent::Ended(end) => self.end(end, unix),
        }
    }

    /// The shell's credential task for `session` finished.
    pub fn on_credential(&mut self, session: u64, result: CredentialResult, unix: u32) {
        let Some(s) = self
            .session
            .as_mut()
            .filter(|s| s.view.session == session && s.view.credential.is_none())
        else {
            if let CredentialResult::Voucher { credential, .. } = &result {
                self.late_voucher(session, credential);
            }
            return;
        };
        s.fetching = false;
        let journaled = matches!(
            result,
            CredentialResult::Voucher {
                journaled: true,
                ..
            }
        );
        let (credential, kind, elapsed, refused, detail) = match result {
            CredentialResult::Online {
                credential,
                elapsed,
                refused,
            } => (
                credential,
                CredentialKind::Online,
                elapsed,
                refused,
                "grant from the cloud".to_string(),
            ),
            CredentialResult::Voucher {
                credential, why, ..
            } => (credential, CredentialKind::Voucher, Duration::ZERO, 0, why),
            CredentialResult::Denied(reason) | CredentialResult::Unavailable(reason) => {
                warn!(%reason, "no credential for this session");
                s.auth_failure = Some(reason.clone());
                self.notices.push_back(Notice::NoCredential { reason });
                return;
            }
        };
        s.view.credential = Some(kind);
        s.ticket_id = Some(credential.ticket_id());
        let Some(pile) = s.pile else {
            return;
        };
        self.notices.push_back(Notice::Credential {
            kind,
            elapsed,
            refused,
            detail,
        });
        let draft = self
            .draft_basis()
            .map(|b| b.draft(kind, credential.ticket_id(), unix));
        match draft {
            // Already committed with the voucher's spend.
            Some(_) if journaled => self
                .actions
                .push_back(Action::StartAuth { credential, pile }),
            // The draft must be durable before the pile sees the
            // credential: a crash in between would leave a session the
            // pile accepted (and may charge) with no record of it.
            Some(draft) => {
                if let Some(s) = self.session.as_mut() {
                    s.held_auth = Some((credential, pile));
                }
                self.actions.push_back(Action::Journal { draft });
            }
            None => self
                .actions
                .push_back(Action::StartAuth { credential, pile }),
        }
    }

    /// The shell committed the draft `record_id` ([`Action::Journal`]):
    /// present the credential now, if its session is still running.
    pub fn on_journaled(&mut self, record_id: &Id16) {
        let Some(s) = self
            .session
            .as_mut()
            .filter(|s| s.record_id.as_ref() == Some(record_id))
        else {
            return;
        };
        if let Some((credential, pile)) = s.held_auth.take() {
            self.actions
                .push_back(Action::StartAuth { credential, pile });
        }
    }

    /// The handshake with the pile ended.
    pub fn on_auth(&mut self, outcome: AuthOutcome, now: Timestamp) {
        let Some(s) = self.session.as_mut() else {
            return;
        };
        let reason = match outcome {
            AuthOutcome::Accepted(_) => {
                s.view.pile_authenticated = true;
                let since = s
                    .requested_at
                    .map_or(Duration::ZERO, |t| now.saturating_since(t));
                self.notices.push_back(Notice::PileAuthenticated {
                    since_request: since,
                });
                self.actions.push_back(Action::OpenGate);
                return;
            }
            AuthOutcome::Rejected(code) => format!("the pile refused the credential: {code}"),
            AuthOutcome::FakePile => {
                "the pile failed to prove it holds the pile's key (fake pile?)".into()
            }
            AuthOutcome::Timeout(what) => {
                format!("the pile did not answer in time (waiting for {what})")
            }
        };
        warn!(%reason, "pile authentication failed");
        s.auth_failure = Some(reason.clone());
        self.notices.push_back(Notice::PileRefused { reason });
    }

    /// The gateway is stopping: end the session in progress as interrupted,
    /// naming the phase it had reached (energy is unknown, so 0).
    pub fn on_shutdown(&mut self, unix: u32) {
        let Some(phase) = self.current().map(|v| v.phase) else {
            return;
        };
        self.finish(
            SessionResult::Failed {
                reason: format!("interrupted in the {phase} phase: the gateway stopped"),
            },
            None,
            unix,
        );
    }

    fn start(&mut self, unix: u32) {
        if self.session.is_some() {
            return;
        }
        let session = self.next_session;
        self.next_session += 1;
        self.session = Some(Session {
            view: SessionView {
                session,
                phase: Phase::Handshake,
                charger_number: None,
                credential: None,
                pile_authenticated: false,
                started_at: unix,
                request_to_recognized: None,
            },
            pile: None,
            requested_at: None,
            record_id: None,
            ticket_id: None,
            auth_failure: None,
            fetching: false,
            held_auth: None,
            deviations: LinkDeviations::default(),
            refusal: None,
        });
        self.notices.push_back(Notice::SessionStarted { session });
        self.actions.push_back(Action::CloseGate);
    }

    fn end(&mut self, end: SessionEnd, unix: u32) {
        let Some(s) = self.session.as_ref() else {
            return;
        };
        let result = match (&end.result, &s.auth_failure) {
            (EndResult::Completed, _) => SessionResult::Completed,
            // What the gateway refused explains the end better than the
            // error or timeout the refusal caused.
            _ if s.refusal.is_some() => SessionResult::Failed {
                reason: s.refusal.clone().unwrap_or_default(),
            },
            // The pile's refusal explains the end better than the timeout
            // it caused.
            (_, Some(why)) => SessionResult::Failed {
                reason: why.clone(),
            },
            (other, None) => SessionResult::Failed {
                reason: end_reason(other),
            },
        };
        self.finish(result, end.energy_wh, unix);
    }

    /// A voucher for a session that has ended: it stays spent (the wallet
    /// never hands a voucher out twice), and is recorded as unused if the
    /// session ended waiting for it.
    fn late_voucher(&mut self, session: u64, credential: &Credential) {
        let ticket_id = credential.ticket_id();
        let Some(at) = self.unanswered.iter().position(|u| u.session == session) else {
            warn!(
                session,
                ticket = %hex::encode(ticket_id),
                "a voucher arrived after its session ended; it stays spent"
            );
            return;
        };
        let Some(u) = self.unanswered.remove(at) else {
            return;
        };
        warn!(
            session,
            ticket = %hex::encode(ticket_id),
            "a voucher arrived after its session ended; it stays spent and is recorded as unused"
        );
        self.actions.push_back(Action::Record {
            record: SessionRecord {
                record_id: u.record_id,
                vehicle_id: self.vehicle_id.clone(),
                charger_number: u.charger_number,
                credential: UsedCredential {
                    kind: CredentialKind::Voucher,
                    ticket_id,
                },
                energy_wh: 0,
                started_at: u.started_at,
                stopped_at: u.ended_at,
                result: SessionResult::Failed {
                    reason: "the session ended before its voucher was ready; the voucher was \
                             spent but never shown to the pile"
                        .into(),
                },
                deviations: LinkDeviations::default(),
            },
        });
    }

    fn finish(&mut self, result: SessionResult, energy_wh: Option<u32>, unix: u32) {
        if let Some(s) = &self.session
            && s.view.credential.is_some()
        {
            self.throttle
                .on_session_end(s.view.pile_authenticated, unix);
        }
        if let Some(s) = self.session.as_ref().filter(|s| s.fetching)
            && let (Some(record_id), Some(charger_number)) = (s.record_id, s.view.charger_number)
        {
            if self.unanswered.len() == UNANSWERED_KEPT {
                self.unanswered.pop_front();
            }
            self.unanswered.push_back(Unanswered {
                session: s.view.session,
                record_id,
                charger_number,
                started_at: s.view.started_at,
                ended_at: unix,
            });
        }
        let text = match &result {
            SessionResult::Completed => "completed".to_string(),
            SessionResult::Failed { reason } => format!("failed: {reason}"),
        };
        let record = self.record(result, energy_wh.unwrap_or(0), unix);
        let recorded = record.is_some();
        info!(result = %text, energy_wh, recorded, "session ended");
        if let Some(record) = record {
            self.actions.push_back(Action::Record { record });
        }
        self.last = Some((text.clone(), energy_wh));
        self.notices.push_back(Notice::SessionEnded {
            result: text,
            energy_wh,
            recorded,
        });
        self.session = None;
        self.actions.push_back(Action::CloseGate);
    }

    /// The record of the current session, if it used a credential.
    fn draft_basis(&self) -> Option<DraftBasis> {
        let s = self.session.as_ref()?;
        Some(DraftBasis {
            record_id: s.record_id?,
            vehicle_id: self.vehicle_id.clone(),
            charger_number: s.view.charger_number?,
            started_at: s.view.started_at,
        })
    }

    fn record(&self, result: SessionResult, energy_wh: u32, unix: u32) -> Option<SessionRecord> {
        let s = self.session.as_ref()?;
        let credential = UsedCredential {
            kind: s.view.credential?,
            ticket_id: s.ticket_id?,
        };
        let mut record = self
            .draft_basis()?
            .record(credential, result, energy_wh, unix);
        record.deviations = s.deviations.clone();
        Some(record)
    }

    /// `side`'s peer showed `deviation`, accepted or refused: counted in the
    /// session's record.
    pub fn on_deviation(&mut self, side: Side, deviation: Deviation, refused: bool) {
        let Some(s) = self.session.as_mut() else {
            return;
        };
        super::firewall::side_deviations(&mut s.deviations, side).add(deviation, refused);
    }

    /// The bridge refused a message of `side`'s peer and took the
    /// standard's error path: the first such refusal is why the session
    /// failed.
    pub fn on_refusal(&mut self, side: Side, why: &str) {
        let Some(s) = self.session.as_mut() else {
            return;
        };
        if s.refusal.is_none() {
            let reason = format!("the gateway refused the {side}'s message: {why}");
            warn!(%side, %reason, "session refused");
            self.notices.push_back(Notice::Refused {
                reason: reason.clone(),
            });
            s.refusal = Some(reason);
        }
    }
}

fn end_reason(result: &EndResult) -> String {
    match result {
        EndResult::Completed => "completed".into(),
        EndResult::BmsError(e) => format!("BMS reported an error: {e}"),
        EndResult::ChargerError(e) => format!("charger reported an error: {e}"),
        EndResult::Silence(d) => format!("no GB/T traffic for {d:?} (cable pulled?)"),
        EndResult::PileRestarted => "the pile restarted the session".into(),
        EndResult::StoppedBeforeCharging(why) => format!("stopped before charging: {why}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::RootKey;
    use crate::auth::rng::StreamRng;
    use crate::gateway::vehicle_auth::Authenticated;

    const NOW: u32 = 1_760_000_000;
    const PILE: Address = Address(0x56);

    fn orch() -> Orchestrator {
        Orchestrator::new(VehicleId::parse("veh-a").expect("valid id"), 4)
    }

    fn t(ms: u64) -> Timestamp {
        Timestamp::from_millis(ms)
    }

    fn credential(voucher: bool) -> Credential {
        Credential::issue(
            &RootKey::from_bytes([7; 32]),
            0,
            1,
            [1; 16],
            NOW - 10,
            NOW + 600,
            0,
            voucher,
            &mut StreamRng::new(1),
        )
    }

    fn request() -> ObserverEvent {
        ObserverEvent::ChargeRequest {
            charger_number: 1,
            region_code: *b"310",
            pile: PILE,
        }
    }

    fn actions(o: &mut Orchestrator) -> Vec<Action> {
        std::iter::from_fn(|| o.poll_action()).collect()
    }

    fn ended(result: EndResult, energy: Option<u32>) -> ObserverEvent {
        ObserverEvent::Ended(SessionEnd {
            result,
            energy_wh: energy,
            charging_minutes: None,
            final_soc_percent: None,
            phase_reached: Phase::Statistics,
        })
    }

    #[test]
    fn online_session_fetches_journals_authenticates_and_records() {
        let mut o = orch();
        let mut rng = StreamRng::new(9);
        o.on_observer(ObserverEvent::Started, t(0), NOW, &mut rng);
        assert!(matches!(actions(&mut o)[..], [Action::CloseGate]));
        o.on_observer(request(), t(250), NOW, &mut rng);
        // Repeats of CRM(0x00) do not ask again.
        o.on_observer(request(), t(500), NOW, &mut rng);
        let fetch = actions(&mut o);
        let [
            Action::FetchCredential {
                session, params, ..
            },
        ] = &fetch[..]
        else {
            panic!("expected one fetch, got {fetch:?}");
        };
        assert_eq!(params.charger_number, 1);
        assert_eq!(params.want_vouchers, 4);
        let cred = credential(false);
        let ticket_id = cred.ticket_id();
        o.on_credential(
            *session,
            CredentialResult::Online {
                credential: cred,
                elapsed: Duration::from_millis(40),
                refused: 0,
            },
            NOW + 1,
        );
        let next = actions(&mut o);
        // The credential waits for the draft to be durable.
        let [Action::Journal { draft }] = &next[..] else {
            panic!("expected the journal alone, got {next:?}");
        };
        o.on_journaled(&[0xEE; 16]);
        assert!(actions(&mut o).is_empty(), "another draft's commit");
        o.on_journaled(&draft.record_id);
        let next = actions(&mut o);
        let [Action::StartAuth { pile, .. }] = &next[..] else {
            panic!("expected auth after the commit, got {next:?}");
        };
        assert_eq!(*pile, PILE);
        o.on_journaled(&draft.record_id);
        assert!(
            actions(&mut o).is_empty(),
            "the credential is presented once"
        );
        assert!(matches!(draft.result, SessionResult::Failed { .. }));
        o.on_auth(
            AuthOutcome::Accepted(Authenticated {
                charger_number: 1,
                pile_address: PILE,
            }),
            t(400),
        );
        assert!(matches!(actions(&mut o)[..], [Action::OpenGate]));
        o.on_observer(ObserverEvent::Recognized, t(420), NOW + 1, &mut rng);
        assert_eq!(
            o.current().and_then(|v| v.request_to_recognized),
            Some(Duration::from_millis(170))
        );
        o.on_observer(
            ended(EndResult::Completed, Some(1200)),
            t(9000),
            NOW + 9,
            &mut rng,
        );
        let end = actions(&mut o);
        let [Action::Record { record }, Action::CloseGate] = &end[..] else {
            panic!("expected record then close, got {end:?}");
        };
        assert_eq!(
            record.record_id, draft.record_id,
            "draft and record share the id"
        );
        assert_eq!(record.credential.kind, CredentialKind::Online);
        assert_eq!(record.credential.ticket_id, ticket_id);
        assert_eq!(record.energy_wh, 1200);
        assert_eq!(record.result, SessionResult::Completed);
        assert!(o.current().is_none());
        assert_eq!(o.last_result(), Some("completed"));
    }

    #[test]
    fn a_session_without_credential_leaves_no_record() {
        let mut o = orch();
        let mut rng = StreamRng::new(9);
        o.on_observer(request(), t(0), NOW, &mut rng);
        let session = match actions(&mut o).pop() {
            Some(Action::FetchCredential { session, .. }) => session,
            other => panic!("expected a fetch, got {other:?}"),
        };
        o.on_credential(
            session,
            CredentialResult::Unavailable("no voucher".into()),
            NOW,
        );
        assert!(actions(&mut o).is_empty());
        o.on_observer(
            ended(EndResult::BmsError("CRM timeout".into()), None),
            t(6000),
            NOW + 6,
            &mut rng,
        );
        let end = actions(&mut o);
        assert!(
            !end.iter().any(|a| matches!(a, Action::Record { .. })),
            "no credential was spent, so there is nothing to record: {end:?}"
        );
        assert!(std::iter::from_fn(|| o.poll_notice()).any(
            |n| matches!(n, Notice::SessionEnded { recorded: false, ref result, .. } if result.contains("no voucher"))
        ));
    }

    #[test]
    fn a_refused_pile_is_the_reason_in_the_record_and_a_late_credential_is_dropped() {
        let mut o = orch();
        let mut rng = StreamRng::new(9);
        o.on_observer(request(), t(0), NOW, &mut rng);
        let session = match actions(&mut o).pop() {
            Some(Action::FetchCredential { session, .. }) => session,
            other => panic!("expected a fetch, got {other:?}"),
        };
        o.on_credential(
            session,
            CredentialResult::Voucher {
                credential: credential(true),
                why: "voucher (cloud link is backoff)".into(),
                journaled: false,
            },
            NOW,
        );
        let _ = actions(&mut o);
        o.on_auth(AuthOutcome::FakePile, t(300));
        o.on_observer(
            ended(EndResult::BmsError("CRM(0xAA) timeout".into()), None),
            t(6000),
            NOW + 6,
            &mut rng,
        );
        let end = actions(&mut o);
        let Some(Action::Record { record }) = end.first() else {
            panic!("expected a record, got {end:?}");
        };
        assert_eq!(record.credential.kind, CredentialKind::Voucher);
        match &record.result {
            SessionResult::Failed { reason } => assert!(reason.contains("fake pile"), "{reason}"),
            other => panic!("expected a failure, got {other:?}"),
        }
        // A result for the ended session changes nothing.
        o.on_credential(
            session,
            CredentialResult::Voucher {
                credential: credential(true),
                why: "late".into(),
                journaled: false,
            },
            NOW + 7,
        );
        assert!(actions(&mut o).is_empty());
        assert!(o.current().is_none());
    }

    /// The session's deviations go into its record, and a refusal by the
    /// bridge is the reason, ahead of the error it caused.
    #[test]
    fn deviations_and_a_refusal_are_in_the_record() {
        use crate::interop::Deviation;
        let mut o = orch();
        let mut rng = StreamRng::new(10);
        o.on_observer(request(), t(0), NOW, &mut rng);
        let session = match actions(&mut o).pop() {
            Some(Action::FetchCredential { session, .. }) => session,
            other => panic!("expected a fetch, got {other:?}"),
        };
        o.on_credential(
            session,
            CredentialResult::Voucher {
                credential: credential(true),
                why: "voucher".into(),
                journaled: false,
            },
            NOW,
        );
        let _ = actions(&mut o);
        o.on_deviation(Side::Pile, Deviation::CtsWithoutPgn, false);
        o.on_deviation(Side::Bms, Deviation::PositiveCurrent, true);
        o.on_refusal(
            Side::Bms,
            "BCP: deviation positive-current refused by the strict profile",
        );
        o.on_refusal(Side::Pile, "a later one");
        o.on_observer(
            ended(EndResult::ChargerError("CEM timeout=BCP".into()), None),
            t(6000),
            NOW + 6,
            &mut rng,
        );
        let end = actions(&mut o);
        let Some(Action::Record { record }) = end.first() else {
            panic!("expected a record, got {end:?}");
        };
        assert_eq!(
            record
                .deviations
                .pile
                .accepted
                .get(Deviation::CtsWithoutPgn),
            1
        );
        assert_eq!(
            record
                .deviations
                .bms
                .refused
                .get(Deviation::PositiveCurrent),
            1
        );
        match &record.result {
            SessionResult::Failed { reason } => {
                assert!(reason.contains("refused the bms's message"), "{reason}");
                assert!(reason.contains("positive-current"), "{reason}");
            }
            other => panic!("expected a failure, got {other:?}"),
        }
        // Between sessions nothing is counted.
        o.on_deviation(Side::Pile, Deviation::CtsWithoutPgn, false);
        assert!(o.current().is_none());
    }

    #[test]
    fn a_voucher_journaled_with_its_spend_is_presented_at_once_under_the_same_record_id() {
        let mut o = orch();
        let mut rng = StreamRng::new(9);
        o.on_observer(request(), t(0), NOW, &mut rng);
        let fetch = actions(&mut o);
        let Some(Action::FetchCredential { session, draft, .. }) = fetch.last() else {
            panic!("expected a fetch, got {fetch:?}");
        };
        let (session, basis) = (*session, draft.clone());
        assert_eq!(basis.charger_number, 1);
        // What the shell journals with the spend is the orchestrator's own
        // draft: same id, same ticket, "interrupted".
        let cred = credential(true);
        let shell_draft = basis.draft(CredentialKind::Voucher, cred.ticket_id(), NOW + 1);
        assert!(matches!(shell_draft.result, SessionResult::Failed { .. }));
        o.on_credential(
            session,
            CredentialResult::Voucher {
                credential: cred.clone(),
                why: "voucher (cloud link is backoff)".into(),
                journaled: true,
            },
            NOW + 1,
        );
        let next = actions(&mut o);
        let [Action::StartAuth { pile, .. }] = &next[..] else {
            panic!("expected auth at once, no second journal, got {next:?}");
        };
        assert_eq!(*pile, PILE);
        o.on_observer(
            ended(EndResult::Completed, Some(800)),
            t(9000),
            NOW + 9,
            &mut rng,
        );
        let end = actions(&mut o);
        let Some(Action::Record { record }) = end.first() else {
            panic!("expected a record, got {end:?}");
        };
        // The final record replaces the journaled draft (same id).
        assert_eq!(record.record_id, shell_draft.record_id);
        assert_eq!(record.credential.ticket_id, cred.ticket_id());
        assert_eq!(record.result, SessionResult::Completed);
    }

    #[test]
    fn shutdown_mid_session_records_it_as_interrupted() {
        let mut o = orch();
        let mut rng = StreamRng::new(9);
        o.on_observer(request(), t(0), NOW, &mut rng);
        let session = match actions(&mut o).pop() {
            Some(Action::FetchCredential { session, .. }) => session,
            other => panic!("expected a fetch, got {other:?}"),
        };
        o.on_credential(
            session,
            CredentialResult::Online {
                credential: credential(false),
                elapsed: Duration::ZERO,
                refused: 0,
            },
            NOW,
        );
        let _ = actions(&mut o);
        o.on_shutdown(NOW + 3);
        let end = actions(&mut o);
        let Some(Action::Record { record }) = end.first() else {
            panic!("expected a record, got {end:?}");
        };
        let SessionResult::Failed { reason } = &record.result else {
            panic!("expected a failure, got {:?}", record.result);
        };
        assert!(
            reason.contains("interrupted in the handshake phase")
                && reason.contains("gateway stopped"),
            "{reason}"
        );
        assert_eq!(record.stopped_at, NOW + 3);
    }

    /// A fake pile restarting the session (or flipping its charger number)
    /// gets a few credentials, then none: offline, each would be a voucher.
    #[test]
    fn a_pile_that_never_proves_its_key_stops_getting_credentials() {
        let mut o = orch().with_throttle(ThrottleConfig {
            burst: 10,
            refill: Duration::from_secs(1),
            max_unproven: 3,
            cooldown: Duration::from_secs(600),
        });
        let mut rng = StreamRng::new(9);
        let mut fetched = 0;
        for attempt in 0..6u32 {
            let unix = NOW + attempt * 20;
            o.on_observer(
                ObserverEvent::ChargeRequest {
                    charger_number: 1 + attempt,
                    region_code: *b"310",
                    pile: PILE,
                },
                t(u64::from(attempt) * 20_000),
                unix,
                &mut rng,
            );
            let fetch = actions(&mut o).into_iter().find_map(|a| match a {
                Action::FetchCredential { session, .. } => Some(session),
                _ => None,
            });
            if let Some(session) = fetch {
                fetched += 1;
                o.on_credential(
                    session,
                    CredentialResult::Voucher {
                        credential: credential(true),
                        why: "offline".into(),
                        journaled: false,
                    },
                    unix,
                );
                o.on_auth(AuthOutcome::FakePile, t(u64::from(attempt) * 20_000 + 100));
            } else {
                let notices: Vec<_> = std::iter::from_fn(|| o.poll_notice()).collect();
                assert!(
                    notices
                        .iter()
                        .any(|n| matches!(n, Notice::NoCredential { reason }
                        if reason.contains("never proved their key"))),
                    "{notices:?}"
                );
            }
            o.on_observer(
                ended(EndResult::BmsError("CRM(0xAA) timeout".into()), None),
                t(u64::from(attempt) * 20_000 + 5_000),
                unix + 5,
                &mut rng,
            );
            let _ = actions(&mut o);
            while o.poll_notice().is_some() {}
        }
        assert_eq!(fetched, 3, "three credentials, then the cooldown");
    }

    #[test]
    fn restarts_in_quick_succession_are_rate_limited() {
        let mut o = orch();
        let mut rng = StreamRng::new(9);
        let mut fetched = 0;
        for attempt in 0..8u32 {
            o.on_observer(
                request(),
                t(u64::from(attempt) * 1000),
                NOW + attempt,
                &mut rng,
            );
            fetched += actions(&mut o)
                .iter()
                .filter(|a| matches!(a, Action::FetchCredential { .. }))
                .count();
            o.on_observer(
                ended(EndResult::PileRestarted, None),
                t(u64::from(attempt) * 1000 + 500),
                NOW + attempt,
                &mut rng,
            );
            let _ = actions(&mut o);
        }
        assert_eq!(fetched, ThrottleConfig::default().burst as usize);
    }

    /// Regression (fault suite, 10% loss through the gateway): a session
    /// ended while its voucher was being taken from the wallet; the voucher
    /// was spent and no record said so.
    #[test]
    fn a_voucher_for_a_session_that_ended_waiting_for_it_is_recorded_as_unused() {
        let mut o = orch();
        let mut rng = StreamRng::new(9);
        o.on_observer(request(), t(0), NOW, &mut rng);
        let session = match actions(&mut o).pop() {
            Some(Action::FetchCredential { session, .. }) => session,
            other => panic!("expected a fetch, got {other:?}"),
        };
        o.on_observer(
            ended(EndResult::BmsError("CRM(0xAA) timeout".into()), None),
            t(5000),
            NOW + 5,
            &mut rng,
        );
        let end = actions(&mut o);
        assert!(
            !end.iter().any(|a| matches!(a, Action::Record { .. })),
            "nothing spent yet: {end:?}"
        );
        let voucher = credential(true);
        let ticket_id = voucher.ticket_id();
        o.on_credential(
            session,
            CredentialResult::Voucher {
                credential: voucher,
                why: "voucher (cloud link disabled)".into(),
                journaled: false,
            },
            NOW + 6,
        );
        let late = actions(&mut o);
        let [Action::Record { record }] = &late[..] else {
            panic!("expected one record, got {late:?}");
        };
        assert_eq!(record.credential.kind, CredentialKind::Voucher);
        assert_eq!(record.credential.ticket_id, ticket_id);
        assert_eq!((record.started_at, record.stopped_at), (NOW, NOW + 5));
        assert!(
            matches!(&record.result, SessionResult::Failed { reason } if reason.contains("never shown to the pile")),
            "{record:?}"
        );
        // Only once, and an online ticket (not spent) is not recorded.
        o.on_credential(
            session,
            CredentialResult::Voucher {
                credential: credential(true),
                why: "again".into(),
                journaled: false,
            },
            NOW + 7,
        );
        assert!(actions(&mut o).is_empty());
        o.on_observer(request(), t(9000), NOW + 9, &mut rng);
        let second = match actions(&mut o).pop() {
            Some(Action::FetchCredential { session, .. }) => session,
            other => panic!("expected a fetch, got {other:?}"),
        };
        o.on_observer(
            ended(EndResult::Silence(Duration::from_secs(10)), None),
            t(20_000),
            NOW + 20,
            &mut rng,
        );
        let _ = actions(&mut o);
        o.on_credential(
            second,
            CredentialResult::Online {
                credential: credential(false),
                elapsed: Duration::ZERO,
                refused: 0,
            },
            NOW + 21,
        );
        assert!(actions(&mut o).is_empty());
    }
}
