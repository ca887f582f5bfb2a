//! The session orchestrator, sans-IO: every decision the gateway takes in
//! a charging session. The shell around it only does I/O and reports facts.
//!
//! It listens to the [`SessionObserver`](super::observer::SessionObserver),
//! to the cloud link's state and to the answers to its own actions, and says
//! what to do next. A session goes through typed stages:
//!
//! 1. **Started**, until the pile's first CRM(0x00) names the charger.
//! 2. **AwaitingCloud**: the cloud is asked (cloud first). If it does not
//!    answer within the request timeout, or the link is known down, or the
//!    request fails, a voucher is used instead (**SpendingVoucher**), since
//!    the BMS waits only 5 s for CRM(0xAA). A denial is final: a voucher
//!    would bypass it. While the owner is asked to approve, the wait runs
//!    to the owner's deadline and a timeout is a denial.
//! 3. A voucher comes spent, with the session's draft record in the same
//!    commit; an online ticket first has its draft journaled
//!    (**Journaling**). Either way a crash after the pile saw the
//!    credential leaves a record.
//! 4. **Authenticating** with the pile, then **Open** (the gate lets
//!    recognition through), or **Failed** with the reason.
//! 5. The session ended: the final record for the outbox.
//!
//! A session that never got a credential leaves no record: nothing was
//! spent and the pile never charged on our behalf. An answer for a session
//! that has ended is dropped, except a voucher that was spent for it: that
//! is recorded as unused, so that the cloud's books balance.

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

/// What the shell learnt from the cloud for a session ([`Action::AskCloud`]).
#[derive(Debug)]
pub enum CloudAnswer {
    /// A ticket for this pile, and vouchers for offline sessions.
    Granted {
        credential: Credential,
        vouchers: Vec<Credential>,
        /// Request to grant.
        elapsed: Duration,
        /// Answers refused on the way (forged, replayed).
        refused: u32,
    },
    /// The cloud holds the grant until the owner approves, by `deadline`
    /// (Unix seconds).
    Pending { deadline: u32 },
    /// An answer was refused (forged, replayed, for another vehicle); the
    /// request goes on.
    Refused(String),
    /// The cloud said no (denied, or the owner declined): no voucher is
    /// used then, since that would bypass the decision.
    Denied(String),
    /// No answer: the request failed or timed out in the shell.
    Failed(String),
}

/// What the shell's wallet did with [`Action::SpendVoucher`].
#[derive(Debug)]
pub enum VoucherAnswer {
    /// Spent, in one commit with the session's draft record
    /// ([`DraftBasis::draft`]).
    Taken(Credential),
    /// No voucher for this pile.
    None,
    /// The wallet or the store failed; nothing was spent.
    Failed(String),
}

/// What the shell knows of the cloud link; it reports each change
/// ([`Orchestrator::on_cloud_link`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CloudLink {
    /// No cloud in the config: vouchers and imported tickets only.
    Disabled,
    /// Connected, connecting, or lost just now: a request is sent on
    /// connect, and a waiting request makes the link reconnect at once.
    Usable,
    /// Known down (in backoff after a failed attempt): asking would only
    /// wait out the timeout the BMS cannot afford (5 s for CRM(0xAA)).
    Down(String),
}

/// How credentials are obtained.
#[derive(Clone, Debug)]
pub struct CredentialPolicy {
    /// Vouchers to ask for with each grant.
    pub want_vouchers: u16,
    /// How long the cloud has to answer before a voucher is used.
    pub request_timeout: Duration,
}

impl Default for CredentialPolicy {
    fn default() -> Self {
        CredentialPolicy {
            want_vouchers: 4,
            request_timeout: Duration::from_secs(2),
        }
    }
}

/// What a session's draft record needs besides its credential, all known
/// at the charge request. The shell gets it with [`Action::SpendVoucher`]
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

/// What the shell must do. Each action that has an answer names the fact
/// the shell reports back.
#[derive(Debug)]
pub enum Action {
    /// Ask the cloud for a grant; report [`Orchestrator::on_cloud`].
    AskCloud {
        session: u64,
        params: ExchangeParams,
    },
    /// The answer to `session`'s request is no longer wanted (a voucher is
    /// used instead, or the session ended): stop waiting for it.
    CancelCloud {
        session: u64,
        /// The request timed out (rather than its session ending).
        timed_out: bool,
    },
    /// Spend a voucher for the pile, and journal `draft.draft(Voucher, its
    /// ticket id, now)` in the same commit, so that a voucher is spent
    /// exactly when its session has a record; report
    /// [`Orchestrator::on_voucher`].
    SpendVoucher { session: u64, draft: DraftBasis },
    /// Keep vouchers that came with a grant.
    StoreVouchers { vouchers: Vec<Credential> },
    /// Journal `draft`: the record to report if the session never ends.
    /// Report [`Orchestrator::on_journaled`] once it is committed; the
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

/// Where the session is in getting and presenting its credential.
#[derive(Debug)]
enum Stage {
    /// Started; the pile has not asked to charge yet.
    Started,
    /// The cloud was asked; at `deadline` a voucher is used instead, or,
    /// while the owner is asked to approve (`approval`, Unix seconds), the
    /// session gets no credential.
    AwaitingCloud {
        deadline: Timestamp,
        approval: Option<u32>,
        /// Answers refused so far, and the last one's reason.
        refused: u32,
        last_refusal: Option<String>,
    },
    /// The shell is spending a voucher; `why` the cloud was not used, and
    /// how many of its answers were refused.
    SpendingVoucher { why: String, refused: u32 },
    /// An online credential, held until its draft record is durable: a
    /// crash in between would leave a session the pile accepted (and may
    /// charge) with no record of it.
    Journaling {
        credential: Credential,
        pile: Address,
    },
    /// The credential was presented to the pile.
    Authenticating,
    /// The pile proved its key; the gate is open.
    Open,
    /// No credential, or the pile failed: why. Nothing more happens until
    /// the session ends.
    Failed { reason: String },
}

#[derive(Debug)]
struct Session {
    view: SessionView,
    stage: Stage,
    pile: Option<Address>,
    requested_at: Option<Timestamp>,
    record_id: Option<Id16>,
    /// The credential this session used (spent, for a voucher).
    used: Option<UsedCredential>,
    /// What the BMS and the pile deviated in, for the record.
    deviations: LinkDeviations,
    /// A message the bridge refused (strict profile, implausible value):
    /// why the session failed.
    refusal: Option<String>,
}

/// A session that ended while its voucher was being spent. The shell's
/// wallet commits the spend whatever happens meanwhile, so a voucher that
/// arrives for such a session is spent all the same, and the cloud's books
/// balance only if it is recorded (the record says it was never used).
#[derive(Debug)]
struct Unanswered {
    session: u64,
    record_id: Id16,
    charger_number: u32,
    started_at: u32,
    ended_at: u32,
}

/// How many [`Unanswered`] sessions are remembered: the wallet answers
/// within one commit, long before more sessions can end.
const UNANSWERED_KEPT: usize = 8;

/// The orchestrator; see the module docs.
#[derive(Debug)]
pub struct Orchestrator {
    vehicle_id: VehicleId,
    policy: CredentialPolicy,
    cloud: CloudLink,
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
    /// With the cloud link [`CloudLink::Usable`] until told otherwise.
    pub fn new(vehicle_id: VehicleId, policy: CredentialPolicy) -> Self {
        Orchestrator {
            vehicle_id,
            policy,
            cloud: CloudLink::Usable,
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

    /// Whether `event` starts a new session: the shell opens the session's
    /// log span before it hands the event over.
    pub fn starts_session(&self, event: &ObserverEvent) -> bool {
        self.session.is_none()
            && matches!(
                event,
                ObserverEvent::Started | ObserverEvent::ChargeRequest { .. }
            )
    }

    /// The owner is being asked to approve the current session's grant.
    pub fn awaiting_approval(&self) -> bool {
        matches!(
            self.session.as_ref().map(|s| &s.stage),
            Some(Stage::AwaitingCloud {
                approval: Some(_),
                ..
            })
        )
    }

    /// When [`handle_timeout`](Self::handle_timeout) is due.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        match self.session.as_ref().map(|s| &s.stage) {
            Some(Stage::AwaitingCloud { deadline, .. }) => Some(*deadline),
            _ => None,
        }
    }

    /// The cloud did not answer in time: a voucher, or, if the owner was
    /// being asked, no credential.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        let Some(s) = self.session.as_mut() else {
            return;
        };
        let Stage::AwaitingCloud {
            deadline,
            approval,
            refused,
            ref last_refusal,
        } = s.stage
        else {
            return;
        };
        if now < deadline {
            return;
        }
        let refusals = last_refusal
            .as_ref()
            .map(|r| format!(" ({refused} answer(s) refused, last: {r})"))
            .unwrap_or_default();
        let session = s.view.session;
        self.actions.push_back(Action::CancelCloud {
            session,
            timed_out: true,
        });
        if approval.is_some() {
            self.fail_credential(format!("the owner did not approve in time{refusals}"));
        } else {
            let why = format!(
                "cloud: no valid answer within {:?}{refusals}",
                self.policy.request_timeout
            );
            self.spend_voucher(why);
        }
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
                s.pile = Some(pile);
                s.view.charger_number = Some(charger_number);
                // The record id is drawn now so the draft and the final
                // record carry the same one (the cloud deduplicates on it).
                let mut id = [0u8; 16];
                rng.fill(&mut id);
                s.record_id = Some(id);
                let session = s.view.session;
                self.notices.push_back(Notice::ChargeRequest {
                    charger_number,
                    region_code,
                });
                if let Err(throttled) = self.throttle.request(unix) {
                    let reason = format!("no credential requested: {throttled}");
                    warn!(charger = charger_number, pile = %pile, %reason, "charge request throttled");
                    self.fail_credential(reason);
                    return;
                }
                match self.cloud.clone() {
                    CloudLink::Usable => {
                        info!(charger = charger_number, pile = %pile, "charge request; asking the cloud");
                        if let Some(s) = self.session.as_mut() {
                            s.stage = Stage::AwaitingCloud {
                                deadline: now + self.policy.request_timeout,
                                approval: None,
                                refused: 0,
                                last_refusal: None,
                            };
                        }
                        self.actions.push_back(Action::AskCloud {
                            session,
                            params: ExchangeParams {
                                charger_number,
                                region_code,
                                want_vouchers: self.policy.want_vouchers,
                            },
                        });
                    }
                    CloudLink::Disabled => {
                        info!(charger = charger_number, pile = %pile, "charge request; cloud disabled");
                        self.spend_voucher("cloud link disabled".into());
                    }
                    CloudLink::Down(why) => {
                        info!(charger = charger_number, pile = %pile, %why, "charge request; cloud link down");
                        self.spend_voucher(format!("cloud link is {why}"));
                    }
                }
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

    /// The cloud link changed. A session waiting for the cloud (not for
    /// its owner) stops waiting once the link is known down: the request
    /// was sent while the link was usable, and its reconnect has failed.
    pub fn on_cloud_link(&mut self, link: CloudLink) {
        self.cloud = link;
        let CloudLink::Down(why) = &self.cloud else {
            return;
        };
        let Some(s) = self.session.as_ref() else {
            return;
        };
        let Stage::AwaitingCloud {
            approval: None,
            ref refused,
            ref last_refusal,
            ..
        } = s.stage
        else {
            return;
        };
        let refusals = last_refusal
            .as_ref()
            .map(|r| format!(" ({refused} answer(s) refused, last: {r})"))
            .unwrap_or_default();
        let why = format!("cloud link is {why}{refusals}");
        self.actions.push_back(Action::CancelCloud {
            session: s.view.session,
            timed_out: false,
        });
        self.spend_voucher(why);
    }

    /// What the cloud answered for `session`, or that asking it failed.
    pub fn on_cloud(&mut self, session: u64, answer: CloudAnswer, now: Timestamp, unix: u32) {
        let current = self.session.as_ref().filter(|s| {
            s.view.session == session && matches!(s.stage, Stage::AwaitingCloud { .. })
        });
        if current.is_none() {
            // Too late (a voucher was used, or the session ended): the
            // ticket is dropped unused, but the vouchers are good for
            // later sessions.
            if let CloudAnswer::Granted { vouchers, .. } = answer
                && !vouchers.is_empty()
            {
                self.actions.push_back(Action::StoreVouchers { vouchers });
            }
            return;
        }
        match answer {
            CloudAnswer::Granted {
                credential,
                vouchers,
                elapsed,
                refused,
            } => {
                if !vouchers.is_empty() {
                    self.actions.push_back(Action::StoreVouchers { vouchers });
                }
                self.use_credential(
                    credential,
                    CredentialKind::Online,
                    elapsed,
                    refused,
                    "grant from the cloud".into(),
                    unix,
                );
            }
            CloudAnswer::Pending { deadline } => {
                // The wait runs to the owner's deadline, plus one timeout
                // for the final answer to travel.
                let wait = Duration::from_secs(u64::from(deadline.saturating_sub(unix)))
                    + self.policy.request_timeout;
                if let Some(Stage::AwaitingCloud {
                    deadline: until,
                    approval,
                    ..
                }) = self.session.as_mut().map(|s| &mut s.stage)
                {
                    *until = now + wait;
                    *approval = Some(deadline);
                }
                info!(deadline, "awaiting owner approval");
                self.notices
                    .push_back(Notice::AwaitingApproval { deadline });
            }
            CloudAnswer::Refused(why) => {
                if let Some(Stage::AwaitingCloud {
                    refused,
                    last_refusal,
                    ..
                }) = self.session.as_mut().map(|s| &mut s.stage)
                {
                    *refused += 1;
                    *last_refusal = Some(why);
                }
            }
            CloudAnswer::Denied(reason) => self.fail_credential(reason),
            CloudAnswer::Failed(why) => self.spend_voucher(format!("cloud: {why}")),
        }
    }

    /// What the wallet did with [`Action::SpendVoucher`] for `session`.
    pub fn on_voucher(&mut self, session: u64, answer: VoucherAnswer, unix: u32) {
        let (why, refused) = match self.session.as_ref().map(|s| (s.view.session, &s.stage)) {
            Some((id, Stage::SpendingVoucher { why, refused })) if id == session => {
                (why.clone(), *refused)
            }
            _ => {
                if let VoucherAnswer::Taken(credential) = &answer {
                    self.late_voucher(session, credential);
                }
                return;
            }
        };
        let charger = self
            .session
            .as_ref()
            .and_then(|s| s.view.charger_number)
            .unwrap_or_default();
        match answer {
            VoucherAnswer::Taken(credential) => self.use_credential(
                credential,
                CredentialKind::Voucher,
                Duration::ZERO,
                refused,
                format!("voucher ({why})"),
                unix,
            ),
            VoucherAnswer::None => {
                self.fail_credential(format!("{why}, and no voucher for charger {charger}"))
            }
            VoucherAnswer::Failed(e) => {
                self.fail_credential(format!("{why}, and the wallet failed: {e}"))
            }
        }
    }

    /// The shell committed the draft `record_id` ([`Action::Journal`]):
    /// present the credential now, if its session is still running.
    pub fn on_journaled(&mut self, record_id: &Id16) {
        let Some(s) = self.session.as_mut().filter(|s| {
            s.record_id.as_ref() == Some(record_id) && matches!(s.stage, Stage::Journaling { .. })
        }) else {
            return;
        };
        if let Stage::Journaling { credential, pile } =
            std::mem::replace(&mut s.stage, Stage::Authenticating)
        {
            self.actions
                .push_back(Action::StartAuth { credential, pile });
        }
    }

    /// The handshake with the pile ended.
    pub fn on_auth(&mut self, outcome: AuthOutcome, now: Timestamp) {
        let Some(s) = self
            .session
            .as_mut()
            .filter(|s| matches!(s.stage, Stage::Authenticating))
        else {
            return;
        };
        let reason = match outcome {
            AuthOutcome::Accepted(_) => {
                s.stage = Stage::Open;
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
        s.stage = Stage::Failed {
            reason: reason.clone(),
        };
        self.notices.push_back(Notice::PileRefused { reason });
    }

    /// The current session will use no credential: why.
    fn fail_credential(&mut self, reason: String) {
        let Some(s) = self.session.as_mut() else {
            return;
        };
        warn!(%reason, "no credential for this session");
        s.stage = Stage::Failed {
            reason: reason.clone(),
        };
        self.notices.push_back(Notice::NoCredential { reason });
    }

    /// Fall back to a voucher for the current session (`why`: the cloud
    /// was not used).
    fn spend_voucher(&mut self, why: String) {
        let Some(draft) = self.draft_basis() else {
            return;
        };
        let Some(s) = self.session.as_mut() else {
            return;
        };
        // The cloud's refused answers, counted while it was asked.
        let refused = match s.stage {
            Stage::AwaitingCloud { refused, .. } => refused,
            _ => 0,
        };
        s.stage = Stage::SpendingVoucher { why, refused };
        self.actions.push_back(Action::SpendVoucher {
            session: s.view.session,
            draft,
        });
    }

    /// The current session has its credential: a voucher (spent, its draft
    /// committed with the spend) is presented at once; an online ticket
    /// after its draft is journaled.
    fn use_credential(
        &mut self,
        credential: Credential,
        kind: CredentialKind,
        elapsed: Duration,
        refused: u32,
        detail: String,
        unix: u32,
    ) {
        let Some(basis) = self.draft_basis() else {
            return;
        };
        let Some(s) = self.session.as_mut() else {
            return;
        };
        let Some(pile) = s.pile else {
            return;
        };
        let ticket_id = credential.ticket_id();
        s.view.credential = Some(kind);
        s.used = Some(UsedCredential { kind, ticket_id });
        self.notices.push_back(Notice::Credential {
            kind,
            elapsed,
            refused,
            detail,
        });
        match kind {
            CredentialKind::Voucher => {
                s.stage = Stage::Authenticating;
                self.actions
                    .push_back(Action::StartAuth { credential, pile });
            }
            CredentialKind::Online => {
                s.stage = Stage::Journaling { credential, pile };
                self.actions.push_back(Action::Journal {
                    draft: basis.draft(kind, ticket_id, unix),
                });
            }
        }
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
            stage: Stage::Started,
            pile: None,
            requested_at: None,
            record_id: None,
            used: None,
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
        let failure = match &s.stage {
            Stage::Failed { reason } => Some(reason),
            _ => None,
        };
        let result = match (&end.result, failure) {
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
        // Asking the cloud spends nothing: stop. A voucher being spent
        // will be spent: remember the session, to record it.
        if let Some(s) = self
            .session
            .as_ref()
            .filter(|s| matches!(s.stage, Stage::AwaitingCloud { .. }))
        {
            self.actions.push_back(Action::CancelCloud {
                session: s.view.session,
                timed_out: false,
            });
        }
        if let Some(s) = self
            .session
            .as_ref()
            .filter(|s| matches!(s.stage, Stage::SpendingVoucher { .. }))
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
        let credential = s.used.clone()?;
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
mod tests;
