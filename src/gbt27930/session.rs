//! What the charger and BMS state machines share: phases, outcomes, the
//! standard's timeouts, and the periodic-transmit schedule.

use std::fmt;
use std::time::Duration;

use super::field::{PeerCheck, PeerFault};
use super::messages::{Bem, Cem, Message, MessageKind};
use crate::interop::Refusal;
use crate::time::Timestamp;

/// The phases of a charging session (GB/T 27930-2015, section 9).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Phase {
    /// Not started, or waiting for the peer's first message.
    Idle,
    Handshake,
    Recognition,
    Configuration,
    Charging,
    Stopping,
    Statistics,
    /// BEM/CEM are being sent after a timeout.
    Error,
    Done,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Phase::Idle => "idle",
            Phase::Handshake => "handshake",
            Phase::Recognition => "recognition",
            Phase::Configuration => "configuration",
            Phase::Charging => "charging",
            Phase::Stopping => "stopping",
            Phase::Statistics => "statistics",
            Phase::Error => "error",
            Phase::Done => "done",
        };
        f.write_str(s)
    }
}

/// The standard's receive timeouts: 5 s by default, BCL and CCS 1 s.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub default: Duration,
    pub bcl: Duration,
    pub ccs: Duration,
    /// How long BEM/CEM is repeated after a timeout before the session ends.
    pub error_linger: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            default: Duration::from_secs(5),
            bcl: Duration::from_secs(1),
            ccs: Duration::from_secs(1),
            error_linger: Duration::from_secs(1),
        }
    }
}

impl Timeouts {
    /// How long we wait for `kind` before declaring a timeout.
    pub fn for_kind(&self, kind: MessageKind) -> Duration {
        match kind {
            MessageKind::Bcl => self.bcl,
            MessageKind::Ccs => self.ccs,
            _ => self.default,
        }
    }
}

/// Why a session did not complete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FailureReason {
    /// We waited for `waiting_for` longer than the standard allows.
    Timeout { waiting_for: MessageKind },
    /// The BMS reported an error (BEM).
    BmsError(Bem),
    /// The charger reported an error (CEM).
    ChargerError(Cem),
    /// The peer stopped the session before charging began.
    StoppedEarly { by: MessageKind },
    /// The charger cannot meet the BMS's parameters.
    Incompatible(String),
    /// The shell ended the session (shutdown, bus lost).
    Aborted(String),
    /// A message of the peer could not be acted on: a deviation the strict
    /// profile refuses, a current sign that cannot be settled, or an
    /// implausible value.
    Peer(PeerFault),
    /// The peer's transport showed a deviation the strict profile refuses.
    Transport(Refusal),
}

impl fmt::Display for FailureReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FailureReason::Timeout { waiting_for } => {
                write!(f, "timed out waiting for {waiting_for}")
            }
            FailureReason::BmsError(bem) => {
                write!(f, "BMS reported an error: {}", Message::Bem(bem.clone()))
            }
            FailureReason::ChargerError(cem) => {
                write!(
                    f,
                    "charger reported an error: {}",
                    Message::Cem(cem.clone())
                )
            }
            FailureReason::StoppedEarly { by } => write!(f, "peer sent {by} before charging began"),
            FailureReason::Incompatible(why) => write!(f, "incompatible parameters: {why}"),
            FailureReason::Aborted(why) => write!(f, "aborted: {why}"),
            FailureReason::Peer(fault) => write!(f, "refused {fault}"),
            FailureReason::Transport(refusal) => write!(f, "transport: {refusal}"),
        }
    }
}

/// What a finished session reports.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Charging happened and ended with a normal stop and statistics exchange.
    Completed(Summary),
    Failed {
        phase: Phase,
        reason: FailureReason,
    },
}

impl Outcome {
    pub fn is_completed(&self) -> bool {
        matches!(self, Outcome::Completed(_))
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Completed(s) => write!(
                f,
                "completed: {} min, {:.1} kWh, final SOC {}%",
                s.charging_minutes,
                f32::from(s.energy_decikwh) / 10.0,
                s.final_soc_percent
            ),
            Outcome::Failed { phase, reason } => write!(f, "failed in {phase}: {reason}"),
        }
    }
}

/// The statistics exchanged at the end (BSD/CSD).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Summary {
    pub final_soc_percent: u8,
    pub charging_minutes: u16,
    pub energy_decikwh: u16,
}

/// What a role state machine tells its shell.
#[derive(Clone, Debug, PartialEq)]
pub enum SessionEvent {
    PhaseChanged(Phase),
    Finished(Outcome),
}

/// The sans-IO interface both roles implement. The shell feeds decoded
/// messages from the peer and the time; the role says what to send and when
/// it next needs to be woken.
pub trait Role {
    fn handle_message(&mut self, msg: Message, now: Timestamp);
    /// Ends the session for `reason` (a [`FailureReason::Peer`] or
    /// [`FailureReason::Transport`]), with the standard's error message
    /// where it has one for the fault.
    fn refuse(&mut self, reason: FailureReason, now: Timestamp);
    /// The check the peer's messages go through before
    /// [`Role::handle_message`] (see [`super::field`]).
    fn peer_check(&self) -> PeerCheck;
    fn handle_timeout(&mut self, now: Timestamp);
    fn poll_message(&mut self) -> Option<Message>;
    fn poll_event(&mut self) -> Option<SessionEvent>;
    fn poll_timeout(&self) -> Option<Timestamp>;
    fn phase(&self) -> Phase;
}

/// The set of messages a role sends periodically in its current phase.
///
/// Entries fire at `now` when added (the standard starts a message as soon as
/// its phase begins) and then every period. A late wake-up fires once, not a
/// burst, as a real ECU's cyclic task would.
#[derive(Debug, Default)]
pub(crate) struct Schedule {
    entries: Vec<(MessageKind, Duration, Timestamp)>,
}

impl Schedule {
    /// Replace the set with `kinds`, each at its standard period.
    pub fn set(&mut self, kinds: &[MessageKind], now: Timestamp) {
        self.entries = kinds.iter().map(|&k| (k, k.period(), now)).collect();
    }

    pub fn clear(&mut self) {
        self.entries.clear();
    }

    /// Kinds due at `now`, rescheduled for their next period.
    pub fn due(&mut self, now: Timestamp) -> Vec<MessageKind> {
        let mut out = Vec::new();
        for (kind, period, next) in &mut self.entries {
            if *next <= now {
                out.push(*kind);
                let mut n = *next + *period;
                if n <= now {
                    n = now + *period;
                }
                *next = n;
            }
        }
        out
    }

    pub fn next(&self) -> Option<Timestamp> {
        self.entries.iter().map(|e| e.2).min()
    }
}

/// A receive deadline: "`kind` must arrive by `at`".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Deadline {
    pub kind: MessageKind,
    pub at: Timestamp,
}

impl Deadline {
    pub fn new(kind: MessageKind, now: Timestamp, timeouts: &Timeouts) -> Self {
        Deadline {
            kind,
            at: now + timeouts.for_kind(kind),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_fires_at_once_then_every_period_without_bursts() {
        let mut s = Schedule::default();
        let t0 = Timestamp::ZERO;
        s.set(&[MessageKind::Chm, MessageKind::Bcl], t0);
        assert_eq!(s.due(t0), vec![MessageKind::Chm, MessageKind::Bcl]);
        assert_eq!(s.next(), Some(Timestamp::from_millis(50)));
        assert_eq!(s.due(Timestamp::from_millis(50)), vec![MessageKind::Bcl]);
        // A wake-up 1 s late sends each message once, not 20 BCLs.
        assert_eq!(
            s.due(Timestamp::from_millis(1100)),
            vec![MessageKind::Chm, MessageKind::Bcl]
        );
        assert_eq!(s.next(), Some(Timestamp::from_millis(1150)));
    }

    #[test]
    fn timeouts_follow_the_standard() {
        let t = Timeouts::default();
        assert_eq!(t.for_kind(MessageKind::Bcl), Duration::from_secs(1));
        assert_eq!(t.for_kind(MessageKind::Ccs), Duration::from_secs(1));
        assert_eq!(t.for_kind(MessageKind::Brm), Duration::from_secs(5));
    }
}

/// The bookkeeping both roles share: current phase, the periodic schedule,
/// one receive deadline, and the queues the shell drains.
#[derive(Debug)]
pub(crate) struct RoleCore {
    pub phase: Phase,
    pub schedule: Schedule,
    pub deadline: Option<Deadline>,
    pub timeouts: Timeouts,
    /// Where the session failed, while BEM/CEM is being repeated.
    pub failure: Option<(Phase, FailureReason, Timestamp)>,
    events: std::collections::VecDeque<SessionEvent>,
}

impl RoleCore {
    pub fn new(timeouts: Timeouts) -> Self {
        RoleCore {
            phase: Phase::Idle,
            schedule: Schedule::default(),
            deadline: None,
            timeouts,
            failure: None,
            events: Default::default(),
        }
    }

    /// Enter `phase`, sending `kinds` periodically from now on.
    pub fn enter(&mut self, phase: Phase, kinds: &[MessageKind], now: Timestamp) {
        if self.phase != phase {
            self.phase = phase;
            self.events.push_back(SessionEvent::PhaseChanged(phase));
        }
        self.schedule.set(kinds, now);
    }

    /// Wait for `kind` with the standard's timeout.
    pub fn wait_for(&mut self, kind: MessageKind, now: Timestamp) {
        self.deadline = Some(Deadline::new(kind, now, &self.timeouts));
    }

    /// The deadline that expired at `now`, if any.
    pub fn expired(&self, now: Timestamp) -> Option<MessageKind> {
        self.deadline.filter(|d| d.at <= now).map(|d| d.kind)
    }

    /// Start repeating the error message (`BEM`/`CEM`) for `error_linger`,
    /// then finish as failed.
    pub fn fail_with_error(&mut self, error: MessageKind, reason: FailureReason, now: Timestamp) {
        let failed_in = self.phase;
        self.deadline = None;
        self.enter(Phase::Error, &[error], now);
        self.failure = Some((failed_in, reason, now + self.timeouts.error_linger));
    }

    /// End the session now.
    pub fn finish(&mut self, outcome: Outcome) {
        if self.phase == Phase::Done {
            return;
        }
        self.deadline = None;
        self.schedule.clear();
        self.failure = None;
        self.phase = Phase::Done;
        self.events
            .push_back(SessionEvent::PhaseChanged(Phase::Done));
        self.events.push_back(SessionEvent::Finished(outcome));
    }

    /// End the session as failed in the current phase.
    pub fn fail(&mut self, reason: FailureReason) {
        let phase = self.phase;
        self.finish(Outcome::Failed { phase, reason });
    }

    /// Finish a lingering error once its time is up. Returns true if done.
    pub fn finish_error_if_due(&mut self, now: Timestamp) -> bool {
        if let Some((phase, reason, until)) = self.failure.clone()
            && until <= now
        {
            self.finish(Outcome::Failed { phase, reason });
            return true;
        }
        false
    }

    pub fn next_timeout(&self) -> Option<Timestamp> {
        if self.phase == Phase::Done {
            return None;
        }
        [
            self.schedule.next(),
            self.deadline.map(|d| d.at),
            self.failure.as_ref().map(|f| f.2),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    pub fn poll_event(&mut self) -> Option<SessionEvent> {
        self.events.pop_front()
    }
}
