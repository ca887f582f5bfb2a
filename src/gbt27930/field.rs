//! The GB/T 27930 messages of one peer, checked and read the way the field
//! needs: deviations recognised, current signs settled, values checked for
//! plausibility, sans-IO.
//!
//! [`PeerCheck`] sits between the decoder and whatever acts on the peer's
//! messages: a role state machine ([`super::node::Node`]), the gateway's
//! bridge (one per side), and `bmsgw decode` (passively, both sides). It
//! sees every message of one session in both directions: the peer's, to
//! judge ([`PeerCheck::inbound`]), and the other side's, for context
//! ([`PeerCheck::context`]: has CRM(0xAA) gone out, has CCS started).
//!
//! For each inbound message it returns a [`Verdict`]:
//! - **Pass** with the message as the standard would have it (a current
//!   counted positive is turned round), so nothing after this point ever
//!   sees a deviation;
//! - **Drop** for a message whose one safe reading is "nothing happened"
//!   (a BEM reporting a CCS timeout before any CCS was due);
//! - **Refuse** with a [`PeerFault`]: a deviation the strict profile
//!   refuses, a current sign that cannot be settled, or an implausible
//!   value. The caller takes the standard's error path for the message
//!   ([`PeerFault::kind`]).
//!
//! Accepted deviations are reported once per session
//! ([`PeerCheck::poll_deviation`]).
//!
//! **Current sign.** GB/T counts charging current negative: raw
//! 4000 − 10·A. Some peers count it positive, raw 4000 + 10·A. Each peer's
//! convention is settled by its stated maximum (BCP for a BMS, CML for a
//! charger): a maximum *charging* current on the discharge side of zero
//! only makes sense as the positive convention. Every later current of that
//! peer must then sit on the same side of zero (a measured current may
//! stray [`MEASURED_SIGN_SLACK`] across it), and a demand may not exceed the
//! maximum. A current on the other side, or one with no maximum to settle
//! it, is refused: a wrong guess about which way current flows is never
//! acted on.
//!
//! **Plausibility.** BHM, BCP, BCL and BCS are checked against the limits
//! the other side stated (or the local role's own): voltages and currents
//! above the peer's own maximum by more than [`VOLTAGE_SLACK_PERCENT`] /
//! [`CURRENT_SLACK_PERCENT`] plus [`CURRENT_SLACK`], and a state of charge
//! above 100 %. CML and CCS get the same checks from the BMS's side.

use std::collections::VecDeque;
use std::time::Duration;

use super::messages::{
    Bcl, Bcp, Bcs, Bem, Ccs, ChargeMode, Cml, Message, MessageKind, Recognition, Sender,
};
use super::units::{Current, DeciVolt};
use crate::interop::{Deviation, Profile, Refusal};
use crate::time::Timestamp;

/// How far (in amps) a measured current may stray to the other side of
/// zero before its sign counts as contradicting the peer's convention:
/// sensor offsets at zero current.
pub const MEASURED_SIGN_SLACK: f32 = 5.0;
/// A measured or demanded voltage may exceed the stated maximum by this
/// much (measurement tolerance, rounding of 0.1 V steps).
pub const VOLTAGE_SLACK_PERCENT: u32 = 5;
/// A measured current may exceed the stated maximum by this share...
pub const CURRENT_SLACK_PERCENT: u32 = 10;
/// ...plus this many amps.
pub const CURRENT_SLACK: f32 = 5.0;
/// Below this, a BHM's maximum charging voltage is not a traction battery's
/// when the charger's minimum output is not known.
pub const BHM_FLOOR: DeciVolt = DeciVolt(1000);
/// A BEM reporting a CCS timeout within this long of the first CCS (or
/// before any) cannot be a real timeout: GB/T gives CCS 1 s.
const CCS_TIMEOUT: Duration = Duration::from_secs(1);

/// Raw current value of zero amps.
const ZERO: u16 = 4000;

/// Which way a peer counts charging current.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CurrentSign {
    /// GB/T: raw 4000 − 10·A.
    Standard,
    /// raw 4000 + 10·A.
    Positive,
}

impl CurrentSign {
    fn of(raw: u16) -> Option<CurrentSign> {
        match raw {
            r if r < ZERO => Some(CurrentSign::Standard),
            r if r > ZERO => Some(CurrentSign::Positive),
            _ => None,
        }
    }
}

/// Reads `c` in `sign` and returns it in the standard's convention, or
/// `None` when it is beyond what the field can hold (over 400 A).
fn normalize(c: Current, sign: CurrentSign) -> Option<Current> {
    match sign {
        CurrentSign::Standard => Some(c),
        CurrentSign::Positive => (2 * ZERO).checked_sub(c.0).map(Current),
    }
}

/// What the peer's message comes to.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// Act on this message (the standard's reading of what was sent).
    Pass(Message),
    /// Act as if nothing had been received.
    Drop,
    /// Refuse the session: the standard's error path for `fault.kind`.
    Refuse(PeerFault),
}

/// Why a peer's message ends the session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerFault {
    /// The message at fault: which BEM/CEM field (or CST/BST bit) says so.
    pub kind: MessageKind,
    pub reason: FaultReason,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FaultReason {
    /// A known deviation the strict profile refuses.
    Deviation(Refusal),
    /// A value that cannot be right, or a current sign that cannot be settled.
    Implausible(String),
}

impl FaultReason {
    /// The deviation, when that is what the fault is.
    pub fn deviation(&self) -> Option<Deviation> {
        match self {
            FaultReason::Deviation(r) => Some(r.deviation),
            FaultReason::Implausible(_) => None,
        }
    }
}

impl std::fmt::Display for PeerFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.reason {
            FaultReason::Deviation(r) => write!(f, "{}: {r}", self.kind),
            FaultReason::Implausible(why) => write!(f, "implausible {}: {why}", self.kind),
        }
    }
}

/// The limits one side stated: a charger's output range (its own config or
/// CML), a BMS's maxima (its own config, BHM/BCP).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    pub min_voltage: Option<DeciVolt>,
    pub max_voltage: Option<DeciVolt>,
    /// In the standard's convention.
    pub max_current: Option<Current>,
}

/// Checks the messages of one peer during one session (see the module docs).
#[derive(Debug)]
pub struct PeerCheck {
    profile: Profile,
    /// Whose messages are judged.
    peer: Sender,
    /// The other side's limits, from its config or its messages.
    other: Limits,
    /// Whether `other` came from the local role's config (kept across sessions).
    other_fixed: bool,
    state: SessionState,
    deviations: VecDeque<(Deviation, String)>,
}

/// What one session has shown so far.
#[derive(Debug, Default)]
struct SessionState {
    sign: Option<CurrentSign>,
    /// The peer's own stated maximum current (standard convention) and voltage.
    peer_max_current: Option<Current>,
    peer_max_voltage: Option<DeciVolt>,
    crm_recognized: bool,
    /// When CRO(0xAA) went out: the BMS's charging phase (and its CCS timer) began.
    charger_ready: Option<Timestamp>,
    first_ccs_at: Option<Timestamp>,
    bcl_seen: bool,
    reported: Vec<Deviation>,
}

impl PeerCheck {
    /// Judges a BMS; `charger` is the local charger's own output range, if
    /// this side is a charger (else CML supplies it).
    pub fn for_bms(profile: Profile, charger: Option<Limits>) -> Self {
        Self::new(profile, Sender::Bms, charger)
    }

    /// Judges a charger; `bms` is the local BMS's own maxima, if this side
    /// is a BMS (else BHM/BCP/BCL supply them).
    pub fn for_charger(profile: Profile, bms: Option<Limits>) -> Self {
        Self::new(profile, Sender::Charger, bms)
    }

    fn new(profile: Profile, peer: Sender, other: Option<Limits>) -> Self {
        PeerCheck {
            profile,
            peer,
            other: other.unwrap_or_default(),
            other_fixed: other.is_some(),
            state: SessionState::default(),
            deviations: VecDeque::new(),
        }
    }

    /// The peer's current convention, once settled.
    pub fn current_sign(&self) -> Option<CurrentSign> {
        self.state.sign
    }

    /// The next deviation accepted (field profile), once per kind and session.
    pub fn poll_deviation(&mut self) -> Option<(Deviation, String)> {
        self.deviations.pop_front()
    }

    /// A message the other side sent (ours, or in a bridge the other peer's
    /// as forwarded). It starts a new session when the charger begins again.
    pub fn context(&mut self, msg: &Message, now: Timestamp) {
        match msg {
            Message::Chm(_) if self.state.crm_recognized => self.new_session(),
            Message::Crm(crm) if self.peer == Sender::Bms => {
                if crm.recognition == Recognition::Recognized {
                    self.state.crm_recognized = true;
                } else if self.state.crm_recognized {
                    // A new CRM(0x00) after recognition: the pile started over.
                    self.new_session();
                }
            }
            Message::Cro(cro) if self.peer == Sender::Bms => {
                if cro.ready == super::messages::Readiness::Ready {
                    self.state.charger_ready.get_or_insert(now);
                } else {
                    self.state.charger_ready = None;
                }
            }
            Message::Ccs(_) if self.peer == Sender::Bms => {
                self.state.first_ccs_at.get_or_insert(now);
            }
            Message::Cml(cml) if !self.other_fixed => {
                self.other.min_voltage = Some(cml.min_output_voltage);
                self.other.max_voltage = Some(cml.max_output_voltage);
            }
            // BCP states it again; an implausible BHM (below any charger's
            // output) is not taken as the limit.
            Message::Bhm(bhm) if !self.other_fixed && bhm.max_charging_voltage >= BHM_FLOOR => {
                self.other.max_voltage = Some(bhm.max_charging_voltage);
            }
            Message::Bcp(bcp) if !self.other_fixed => {
                self.other.max_voltage = Some(bcp.max_charging_voltage);
                self.other.max_current = Some(bcp.max_charging_current);
            }
            _ => {}
        }
    }

    /// Judges one message from the peer. `body_len` is the length of its
    /// body as received (BCS's single-frame form shows only there).
    pub fn inbound(&mut self, msg: Message, body_len: usize, now: Timestamp) -> Verdict {
        let result = match self.peer {
            Sender::Bms => self.judge_bms(msg, body_len, now),
            Sender::Charger => self.judge_charger(msg),
        };
        match result {
            Ok(Some(m)) => Verdict::Pass(m),
            Ok(None) => Verdict::Drop,
            Err(fault) => Verdict::Refuse(fault),
        }
    }

    fn new_session(&mut self) {
        self.state = SessionState::default();
    }

    /// A known deviation of the peer in message `kind`: `Ok` when the
    /// profile accepts it (reported once per session), a fault otherwise.
    fn deviation(
        &mut self,
        kind: MessageKind,
        d: Deviation,
        detail: impl Into<String>,
    ) -> Result<(), PeerFault> {
        let detail = detail.into();
        if self.profile.is_strict() {
            return Err(PeerFault {
                kind,
                reason: FaultReason::Deviation(Refusal::new(d, detail)),
            });
        }
        if !self.state.reported.contains(&d) {
            self.state.reported.push(d);
            self.deviations.push_back((d, detail));
        }
        Ok(())
    }

    fn judge_bms(
        &mut self,
        msg: Message,
        body_len: usize,
        now: Timestamp,
    ) -> Result<Option<Message>, PeerFault> {
        Ok(Some(match msg {
            Message::Bhm(bhm) => {
                let floor = self.other.min_voltage.unwrap_or(BHM_FLOOR);
                if bhm.max_charging_voltage < floor {
                    // Only used for the insulation check's voltage; BCP
                    // states the limit again and is checked in full.
                    self.deviation(
                        MessageKind::Bhm,
                        Deviation::BhmImplausible,
                        format!(
                            "BHM says {} (below {floor}); BCP's maximum is used instead",
                            bhm.max_charging_voltage
                        ),
                    )?;
                }
                Message::Bhm(bhm)
            }
            Message::Bcp(bcp) => Message::Bcp(self.bcp(bcp)?),
            Message::Bcl(bcl) => Message::Bcl(self.bcl(bcl)?),
            Message::Bcs(bcs) => {
                if body_len == 8 {
                    self.deviation(
                        MessageKind::Bcs,
                        Deviation::BcsSingleFrame,
                        "BCS in one 8-byte frame",
                    )?;
                }
                Message::Bcs(self.bcs(bcs)?)
            }
            Message::Bem(bem)
                if early_ccs_timeout(
                    &bem,
                    self.state.charger_ready,
                    self.state.first_ccs_at,
                    now,
                ) =>
            {
                self.deviation(
                    MessageKind::Bem,
                    Deviation::EarlyCcsTimeout,
                    match self.state.first_ccs_at {
                        None => "BEM(CCS timeout) before any CCS was due".to_string(),
                        Some(at) => format!(
                            "BEM(CCS timeout) {} ms after the first CCS",
                            now.saturating_since(at).as_millis()
                        ),
                    },
                )?;
                return Ok(None);
            }
            other => other,
        }))
    }

    fn bcp(&mut self, mut bcp: Bcp) -> Result<Bcp, PeerFault> {
        let kind = MessageKind::Bcp;
        let implausible = |why: String| implausible(kind, why);
        if !self.state.crm_recognized {
            self.deviation(
                kind,
                Deviation::BcpBeforeRecognition,
                "BCP before CRM(0xAA); kept for when recognition completes",
            )?;
        }
        let (sign, max) =
            self.settle_sign(kind, "maximum charging current", bcp.max_charging_current)?;
        bcp.max_charging_current = max;
        if bcp.max_charging_voltage.0 == 0 {
            return Err(implausible(
                "the maximum charging voltage is 0 V".to_string(),
            ));
        }
        if bcp.soc.0 > 1000 {
            return Err(implausible(format!("state of charge {}", bcp.soc)));
        }
        if bcp.battery_voltage > with_slack(bcp.max_charging_voltage) {
            return Err(implausible(format!(
                "battery voltage {} is above its own maximum {}",
                bcp.battery_voltage, bcp.max_charging_voltage
            )));
        }
        self.state.sign = Some(sign);
        self.state.peer_max_current = Some(bcp.max_charging_current);
        self.state.peer_max_voltage = Some(bcp.max_charging_voltage);
        Ok(bcp)
    }

    fn bcl(&mut self, mut bcl: Bcl) -> Result<Bcl, PeerFault> {
        let kind = MessageKind::Bcl;
        let implausible = |why: String| implausible(kind, why);
        let raw = bcl.current_demand.0;
        let sign = match (self.state.sign, CurrentSign::of(raw)) {
            (Some(settled), Some(s)) if s != settled => {
                return Err(implausible(format!(
                    "current sign cannot be settled: BCP counts current {}, BCL demands raw {raw}",
                    sign_words(settled)
                )));
            }
            (Some(settled), _) => settled,
            (None, Some(CurrentSign::Positive)) => {
                return Err(implausible(format!(
                    "current sign cannot be settled: BCL demands raw {raw} (discharge, or a positive count) and no BCP stated the maximum"
                )));
            }
            (None, _) => CurrentSign::Standard,
        };
        bcl.current_demand = normalize(bcl.current_demand, sign)
            .ok_or_else(|| implausible(format!("current demand raw {raw} is over 400 A")))?;
        // A demand a little above the BMS's own maximum (rounding) is met
        // at that maximum by the charger; far above it cannot be right.
        if let Some(max) = self.state.peer_max_current
            && over_current(bcl.current_demand, max)
        {
            return Err(implausible(format!(
                "current demand {} is above BCP's maximum {max}",
                bcl.current_demand
            )));
        }
        if let Some(max) = self.state.peer_max_voltage
            && bcl.voltage_demand > with_slack(max)
        {
            return Err(implausible(format!(
                "voltage demand {} is above BCP's maximum {max}",
                bcl.voltage_demand
            )));
        }
        if bcl.mode == ChargeMode::ConstantCurrent && bcl.current_demand.charging_amps() < 0.0 {
            return Err(implausible(format!(
                "constant-current mode with a discharge demand {}",
                bcl.current_demand
            )));
        }
        if !self.state.bcl_seen {
            self.state.bcl_seen = true;
            if let Some(at) = self.state.first_ccs_at {
                self.deviation(
                    kind,
                    Deviation::BclWaitsForCcs,
                    format!("first BCL came after CCS had started ({at})"),
                )?;
            }
        }
        Ok(bcl)
    }

    fn bcs(&mut self, mut bcs: Bcs) -> Result<Bcs, PeerFault> {
        let kind = MessageKind::Bcs;
        let implausible = |why: String| implausible(kind, why);
        bcs.measured_current = self.measured(kind, bcs.measured_current)?;
        if bcs.soc_percent > 100 {
            return Err(implausible(format!("state of charge {}%", bcs.soc_percent)));
        }
        let limits = Limits {
            min_voltage: None,
            max_voltage: self.state.peer_max_voltage,
            max_current: self.state.peer_max_current,
        };
        within(
            kind,
            "measured",
            bcs.measured_voltage,
            bcs.measured_current,
            limits,
            "BCP's maximum",
        )?;
        Ok(bcs)
    }

    /// The peer's current convention, settled by its stated maximum `max`
    /// (BCP's, CML's; `what` names it): the convention, and the maximum in
    /// the standard's. A maximum on the discharge side is the positive
    /// count (a deviation); 0 A, over 400 A, or a convention other than
    /// one already settled this session cannot be right.
    fn settle_sign(
        &mut self,
        kind: MessageKind,
        what: &str,
        max: Current,
    ) -> Result<(CurrentSign, Current), PeerFault> {
        let raw = max.0;
        let sign =
            CurrentSign::of(raw).ok_or_else(|| implausible(kind, format!("the {what} is 0 A")))?;
        if let Some(settled) = self.state.sign
            && settled != sign
        {
            return Err(implausible(
                kind,
                format!("the current sign changed within the session ({what} raw {raw})"),
            ));
        }
        if sign == CurrentSign::Positive {
            self.deviation(
                kind,
                Deviation::PositiveCurrent,
                format!(
                    "{kind}'s {what} is raw {raw} ({} counted positive)",
                    Current(2 * ZERO - raw.min(2 * ZERO))
                ),
            )?;
        }
        let normalized = normalize(max, sign)
            .ok_or_else(|| implausible(kind, format!("{what} raw {raw} is over 400 A")))?;
        Ok((sign, normalized))
    }

    /// A measured current (BCS, CCS) in the peer's settled convention.
    fn measured(&self, kind: MessageKind, c: Current) -> Result<Current, PeerFault> {
        let implausible = |why: String| implausible(kind, why);
        let Some(sign) = self.state.sign else {
            // No maximum stated yet: only the standard reading is safe to take.
            return Ok(c);
        };
        let normalized = normalize(c, sign)
            .ok_or_else(|| implausible(format!("current raw {} is over 400 A", c.0)))?;
        if normalized.charging_amps() < -MEASURED_SIGN_SLACK {
            return Err(implausible(format!(
                "current sign cannot be settled: the peer counts current {}, but raw {} reads as {} discharging",
                sign_words(sign),
                c.0,
                Current(2 * ZERO - normalized.0.min(2 * ZERO))
            )));
        }
        Ok(normalized)
    }

    fn judge_charger(&mut self, msg: Message) -> Result<Option<Message>, PeerFault> {
        Ok(Some(match msg {
            Message::Cml(cml) => Message::Cml(self.cml(cml)?),
            Message::Ccs(ccs) => Message::Ccs(self.ccs(ccs)?),
            other => other,
        }))
    }

    fn cml(&mut self, mut cml: Cml) -> Result<Cml, PeerFault> {
        let kind = MessageKind::Cml;
        let implausible = |why: String| implausible(kind, why);
        let (sign, max) =
            self.settle_sign(kind, "maximum output current", cml.max_output_current)?;
        cml.max_output_current = max;
        // The minimum current is informational and seen garbled in the
        // field (above the maximum): turned round with the maximum when it
        // can be, left alone otherwise, never refused.
        cml.min_output_current = cml
            .min_output_current
            .map(|c| normalize(c, sign).unwrap_or(c));
        if cml.max_output_voltage < cml.min_output_voltage {
            return Err(implausible(format!(
                "maximum output voltage {} is below the minimum {}",
                cml.max_output_voltage, cml.min_output_voltage
            )));
        }
        self.state.sign = Some(sign);
        self.state.peer_max_current = Some(cml.max_output_current);
        self.state.peer_max_voltage = Some(cml.max_output_voltage);
        Ok(cml)
    }

    fn ccs(&mut self, mut ccs: Ccs) -> Result<Ccs, PeerFault> {
        let kind = MessageKind::Ccs;
        ccs.output_current = self.measured(kind, ccs.output_current)?;
        // Against the BMS's maximum, not its latest demand: a charger's
        // output follows a falling demand with a lag.
        within(
            kind,
            "output",
            ccs.output_voltage,
            ccs.output_current,
            self.other,
            "the BMS's maximum",
        )?;
        Ok(ccs)
    }
}

/// Only the CCS-timeout flag, within 1 s of the CCS timer's start: of
/// CRO(0xAA), or of the first CCS when one came. Before CRO(0xAA) no CCS
/// timer runs (a BEM then comes from a BMS still in an earlier session);
/// 1 s after it without any CCS, the timeout is real.
fn early_ccs_timeout(
    bem: &Bem,
    charger_ready: Option<Timestamp>,
    first_ccs_at: Option<Timestamp>,
    now: Timestamp,
) -> bool {
    let Some(timer_start) = first_ccs_at.or(charger_ready) else {
        return false;
    };
    let others = [
        bem.crm00_timeout,
        bem.crmaa_timeout,
        bem.cts_cml_timeout,
        bem.cro_timeout,
        bem.cst_timeout,
        bem.csd_timeout,
    ];
    bem.ccs_timeout.is_set()
        && others.iter().all(|b| !b.is_set())
        && now.saturating_since(timer_start) < CCS_TIMEOUT
}

fn implausible(kind: MessageKind, why: String) -> PeerFault {
    PeerFault {
        kind,
        reason: FaultReason::Implausible(why),
    }
}

/// A measured voltage and current (`what`: "measured", "output") against
/// `max`'s maxima, with the slack of the module docs.
fn within(
    kind: MessageKind,
    what: &str,
    v: DeciVolt,
    i: Current,
    max: Limits,
    whose: &str,
) -> Result<(), PeerFault> {
    if let Some(max_v) = max.max_voltage
        && v > with_slack(max_v)
    {
        return Err(implausible(
            kind,
            format!("{what} voltage {v} is above {whose} {max_v}"),
        ));
    }
    if let Some(max_i) = max.max_current
        && over_current(i, max_i)
    {
        return Err(implausible(
            kind,
            format!("{what} current {i} is above {whose} {max_i}"),
        ));
    }
    Ok(())
}

fn with_slack(v: DeciVolt) -> DeciVolt {
    DeciVolt(
        u16::try_from(u32::from(v.0) * (100 + VOLTAGE_SLACK_PERCENT) / 100).unwrap_or(u16::MAX),
    )
}

/// Whether measured current `c` exceeds `max` beyond the slack.
fn over_current(c: Current, max: Current) -> bool {
    let limit =
        max.charging_amps().max(0.0) * (100 + CURRENT_SLACK_PERCENT) as f32 / 100.0 + CURRENT_SLACK;
    c.charging_amps() > limit
}

fn sign_words(sign: CurrentSign) -> &'static str {
    match sign {
        CurrentSign::Standard => "negative (GB/T)",
        CurrentSign::Positive => "positive",
    }
}

#[cfg(test)]
mod tests;

/// What a [`LinkWatch`] found in one message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Finding {
    /// `by` showed a known deviation (read the field profile's way).
    Deviation {
        by: Sender,
        deviation: Deviation,
        detail: String,
    },
    /// A message of `by` a peer would refuse even under the field profile.
    Fault { by: Sender, fault: PeerFault },
    /// A message the receiver acts on as if it had not come (a BEM
    /// reporting a CCS timeout before any CCS was due).
    Ignored { by: Sender },
}

/// Both peers of a GB/T link watched from the side, as `bmsgw decode` and
/// the gateway in single-bus mode watch them: each message is judged as its
/// receiver would under the field profile, and what that finds is reported.
/// It never refuses anything; it only tells.
#[derive(Debug)]
pub struct LinkWatch {
    bms: PeerCheck,
    charger: PeerCheck,
}

impl Default for LinkWatch {
    fn default() -> Self {
        LinkWatch {
            bms: PeerCheck::for_bms(Profile::Field, None),
            charger: PeerCheck::for_charger(Profile::Field, None),
        }
    }
}

impl LinkWatch {
    /// One decoded message from `by`, with its body length as received.
    pub fn message(
        &mut self,
        by: Sender,
        msg: &Message,
        body_len: usize,
        now: Timestamp,
    ) -> Vec<Finding> {
        let (judge, other) = match by {
            Sender::Bms => (&mut self.bms, &mut self.charger),
            Sender::Charger => (&mut self.charger, &mut self.bms),
        };
        let verdict = judge.inbound(msg.clone(), body_len, now);
        let mut out: Vec<Finding> = std::iter::from_fn(|| judge.poll_deviation())
            .map(|(deviation, detail)| Finding::Deviation {
                by,
                deviation,
                detail,
            })
            .collect();
        match verdict {
            Verdict::Pass(m) => other.context(&m, now),
            Verdict::Drop => out.push(Finding::Ignored { by }),
            Verdict::Refuse(fault) => out.push(Finding::Fault { by, fault }),
        }
        out
    }
}
