//! The CAN firewall's policy: what may cross between the BMS bus and the
//! pile bus, and how it is rewritten on the way.
//!
//! In bridge mode the gateway sits between two CAN buses: one to the BMS,
//! one to the charging inlet. The pile is untrusted, so nothing from it
//! reaches the BMS unless it is a GB/T 27930 message the BMS expects from a
//! charger, from the pile's address, decodable, and within a rate. The BMS
//! side is filtered the same way, mostly to keep the vehicle's own bus
//! traffic (and its VIN) off the inlet.
//!
//! This module owns the rules, the counters and the token buckets. It never
//! sees a transport session: [`super::bridge::Bridge`] terminates J1939 TP on
//! both sides and asks the firewall about every frame it receives
//! (`Firewall::classify`) and every whole message it would forward
//! (`Firewall::admit`). The rules, in the order they apply:
//!
//! 1. The identifier is a 29-bit J1939 id; anything else is `dropped_malformed`.
//! 2. The source is the node that lives on that side (`bms` on the BMS bus,
//!    `pile` on the pile bus), else `dropped_wrong_address`. Frames from our
//!    own `gateway` address on the pile bus are the vehicle-auth node's own
//!    traffic and are ignored without counting.
//! 3. A frame for the `gateway` address (auth messages, TP to it) is counted
//!    `for_gateway` and goes no further: the auth node reads it from the bus.
//! 4. The destination is the other node or global, else `dropped_wrong_address`.
//! 5. The message's PGN (for TP: the PGN its RTS/BAM announces) is in that
//!    direction's allowlist, else `dropped_not_allowed`. An RTS for a PGN
//!    that is not allowed is never answered, so nothing is buffered for it.
//! 6. A token bucket per (direction, PGN, source, destination): `rate`
//!    messages per second with a `burst`, else `dropped_rate_limited`. Whole
//!    messages are limited, not TP packets: a 512-byte BMV is 74 packets.
//!    The priority bits are left out of the key so that a sender cannot
//!    multiply its budget by varying them.
//! 7. A GB/T 27930 PGN must decode ([`Message::decode`]), else
//!    `dropped_malformed`: the BMS never sees what we cannot parse. A PGN
//!    the integrator added to an allowlist that is not GB/T passes as is.
//! 8. Rewrites: BRM from the BMS has its VIN (bytes 25–41, offset 24..41)
//!    filled with 0xFF when `blank_vin` (`vin_blanked`); CRM(0xAA) from the
//!    pile is forwarded as CRM(0x00) while `gate_recognition` holds and the
//!    pile is not authenticated (`crm_held`).

use std::collections::{BTreeSet, HashMap};

use tracing::debug;

use crate::can::CanFrame;
use crate::gbt27930::{Message, MessageKind, Sender};
use crate::interop::Profile;
use crate::j1939::tp::{Cm, J1939Message, TP_CM, TP_DT};
use crate::j1939::{Address, J1939Id, Pgn};
use crate::time::Timestamp;

/// One of the two buses the bridge joins.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    /// The vehicle's bus, with the BMS on it.
    Bms,
    /// The charging inlet, with the (untrusted) pile on it.
    Pile,
}

impl Side {
    pub fn other(self) -> Side {
        match self {
            Side::Bms => Side::Pile,
            Side::Pile => Side::Bms,
        }
    }
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::Bms => "bms",
            Side::Pile => "pile",
        })
    }
}

/// The deviations of the peer on `side`.
pub(crate) fn side_deviations(
    d: &mut crate::interop::LinkDeviations,
    side: Side,
) -> &mut crate::interop::SideDeviations {
    match side {
        Side::Bms => &mut d.bms,
        Side::Pile => &mut d.pile,
    }
}

/// A token bucket's shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    /// Sustained messages per second.
    pub per_second: u32,
    /// Messages allowed at once after a quiet spell. Below 1 is read as 1,
    /// since a bucket that holds nothing would silence the link.
    pub burst: u32,
}

impl Default for RateLimit {
    /// 100/s covers GB/T's fastest message (BST/CST every 10 ms); the burst
    /// absorbs the jitter of a pile's cyclic task.
    fn default() -> Self {
        RateLimit {
            per_second: 100,
            burst: 20,
        }
    }
}

/// What the bridge lets through and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FirewallConfig {
    /// The BMS, the only node that may speak on the BMS bus.
    pub bms: Address,
    /// The pile, the only node that may speak on the pile bus.
    pub pile: Address,
    /// The vehicle-auth node: traffic for it is never forwarded.
    pub gateway: Address,
    /// PGNs forwarded from the BMS to the pile.
    pub bms_to_pile: BTreeSet<Pgn>,
    /// PGNs forwarded from the pile to the BMS.
    pub pile_to_bms: BTreeSet<Pgn>,
    pub rate: RateLimit,
    /// Fill BRM's VIN with 0xFF on its way to the pile (VIN privacy).
    pub blank_vin: bool,
    /// Hold the pile's CRM(0xAA) (forward it rewritten as CRM(0x00)) until
    /// `Bridge::set_pile_authenticated(true)`.
    pub gate_recognition: bool,
    /// How the BMS's deviations from the standards are met (docs/interop.md).
    pub bms_profile: Profile,
    /// How the pile's deviations from the standards are met.
    pub pile_profile: Profile,
}

impl FirewallConfig {
    /// GB/T 27930 between `bms` and `pile`: every message of the standard in
    /// its own direction, 100/s with a burst of 20, VIN blanked,
    /// recognition gated on pile authentication.
    pub fn gbt27930(bms: Address, pile: Address, gateway: Address) -> Self {
        FirewallConfig {
            bms,
            pile,
            gateway,
            bms_to_pile: default_bms_to_pile(),
            pile_to_bms: default_pile_to_bms(),
            rate: RateLimit::default(),
            blank_vin: true,
            gate_recognition: true,
            bms_profile: Profile::Field,
            pile_profile: Profile::Field,
        }
    }

    /// The profile for `side`'s peer.
    pub fn profile(&self, side: Side) -> Profile {
        match side {
            Side::Bms => self.bms_profile,
            Side::Pile => self.pile_profile,
        }
    }

    /// The node that lives on `side`.
    pub fn address(&self, side: Side) -> Address {
        match side {
            Side::Bms => self.bms,
            Side::Pile => self.pile,
        }
    }

    /// The PGNs allowed from `side` to the other.
    pub fn allowlist(&self, from: Side) -> &BTreeSet<Pgn> {
        match from {
            Side::Bms => &self.bms_to_pile,
            Side::Pile => &self.pile_to_bms,
        }
    }
}

fn pgns_sent_by(sender: Sender) -> BTreeSet<Pgn> {
    MessageKind::ALL
        .into_iter()
        .filter(|k| k.sender() == sender)
        .map(MessageKind::pgn)
        .collect()
}

/// Every GB/T 27930 message the BMS sends.
pub fn default_bms_to_pile() -> BTreeSet<Pgn> {
    pgns_sent_by(Sender::Bms)
}

/// Every GB/T 27930 message the charger sends.
pub fn default_pile_to_bms() -> BTreeSet<Pgn> {
    pgns_sent_by(Sender::Charger)
}

/// What the firewall did, for `bmsgw status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FirewallCounters {
    /// Whole messages forwarded, single frame or TP.
    pub forwarded_bms_to_pile: u64,
    pub forwarded_pile_to_bms: u64,
    pub dropped_not_allowed: u64,
    pub dropped_rate_limited: u64,
    pub dropped_wrong_address: u64,
    /// Not J1939, a TP.CM we cannot read, or a GB/T body that does not decode.
    pub dropped_malformed: u64,
    /// Accepted, but the other side's transport was still sending the
    /// previous long message to that node (or had no session free).
    #[serde(default)]
    pub dropped_busy: u64,
    pub vin_blanked: u64,
    /// Messages that arrived by TP and were re-sent by our own transport.
    pub resegmented: u64,
    /// CRM(0xAA) forwarded as CRM(0x00) because the pile was not yet authenticated.
    pub crm_held: u64,
    /// Frames addressed to the gateway itself, left to the auth node.
    pub for_gateway: u64,
    /// Copies of a BMS's early BCP sent to the pile after CRM(0xAA), for a
    /// BMS that sent BCP only before it (field profile, docs/interop.md).
    #[serde(default)]
    pub bcp_replayed: u64,
    /// Messages of either side not forwarded because they could not be
    /// acted on: a deviation the strict profile refuses, a current sign
    /// that cannot be settled, a value that cannot be right. Each got the
    /// standard's error message (CEM to the BMS, BEM to the pile).
    #[serde(default)]
    pub refused: u64,
    /// High-water marks of what the bridge holds after an input, before
    /// the shell drains it: open transport sessions and the bytes of their
    /// reassemblies (both sides together), and frames, events and messages
    /// queued. They show that an attacker cannot make the bridge hold more
    /// than its fixed limits (`TpConfig::gbt27930`).
    #[serde(default)]
    pub peak_tp_sessions: u64,
    #[serde(default)]
    pub peak_tp_buffered_bytes: u64,
    #[serde(default)]
    pub peak_queued: u64,
}

/// Why a frame or message was not forwarded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    Malformed,
    WrongAddress,
    NotAllowed,
    RateLimited,
    ForGateway,
    /// Our own auth node's frame seen on the pile bus: not counted.
    OwnTraffic,
}

/// Where a received frame goes next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FrameClass {
    /// TP.CM or TP.DT for the transport standing in for the other node.
    Transport,
    /// A single-frame message, to [`Firewall::admit`].
    Single(J1939Id),
    Refused(Refusal),
}

/// Offset of BRM's 17-byte VIN (bytes 25–41 in the standard's 1-based
/// numbering): version 3, battery type 1, capacity 2, voltage 2,
/// manufacturer 4, pack serial 4, date 3, charge count 3, ownership 1,
/// reserved 1.
pub(crate) const BRM_VIN: std::ops::Range<usize> = 24..41;

/// CRM byte 1 values.
const CRM_RECOGNIZED: u8 = 0xAA;
const CRM_NOT_RECOGNIZED: u8 = 0x00;

/// The rules, the buckets and the counters. Pure: the bridge feeds it ids,
/// messages and the time.
#[derive(Debug)]
pub(crate) struct Firewall {
    config: FirewallConfig,
    buckets: HashMap<BucketKey, Bucket>,
    counters: FirewallCounters,
    pile_authenticated: bool,
}

/// (direction, PGN, source, destination). Only allowed messages from the
/// side's one node get a bucket, so the map stays small.
type BucketKey = (Side, Pgn, Address, Address);

impl Firewall {
    pub(crate) fn new(config: FirewallConfig) -> Self {
        Firewall {
            config,
            buckets: HashMap::new(),
            counters: FirewallCounters::default(),
            pile_authenticated: false,
        }
    }

    pub(crate) fn config(&self) -> &FirewallConfig {
        &self.config
    }

    pub(crate) fn counters(&self) -> &FirewallCounters {
        &self.counters
    }

    pub(crate) fn counters_mut(&mut self) -> &mut FirewallCounters {
        &mut self.counters
    }

    pub(crate) fn pile_authenticated(&self) -> bool {
        self.pile_authenticated
    }

    pub(crate) fn set_pile_authenticated(&mut self, yes: bool) {
        self.pile_authenticated = yes;
    }

    /// Rules 1–5 for one received frame; refusals are counted here.
    pub(crate) fn classify(&mut self, from: Side, frame: &CanFrame) -> FrameClass {
        let class = self.classify_inner(from, frame);
        if let FrameClass::Refused(r) = class {
            self.count(r);
            debug!(side = %from, %frame, refusal = ?r, "frame not forwarded");
        }
        class
    }

    fn classify_inner(&self, from: Side, frame: &CanFrame) -> FrameClass {
        let Ok(id) = J1939Id::from_can_id(frame.id()) else {
            return FrameClass::Refused(Refusal::Malformed);
        };
        if id.source != self.config.address(from) {
            let own = from == Side::Pile && id.source == self.config.gateway;
            return FrameClass::Refused(if own {
                Refusal::OwnTraffic
            } else {
                Refusal::WrongAddress
            });
        }
        if id.destination == self.config.gateway {
            return FrameClass::Refused(Refusal::ForGateway);
        }
        if id.destination != self.config.address(from.other()) && !id.destination.is_global() {
            return FrameClass::Refused(Refusal::WrongAddress);
        }
        if id.pgn == TP_DT {
            return FrameClass::Transport;
        }
        if id.pgn == TP_CM {
            return match Cm::parse(frame.data()) {
                Ok(Cm::Rts { pgn, .. } | Cm::Bam { pgn, .. })
                    if !self.config.allowlist(from).contains(&pgn) =>
                {
                    FrameClass::Refused(Refusal::NotAllowed)
                }
                Ok(_) => FrameClass::Transport,
                Err(_) => FrameClass::Refused(Refusal::Malformed),
            };
        }
        FrameClass::Single(id)
    }

    /// Rules 5–8 for a whole message from `from`: the message to forward
    /// (possibly rewritten), or why not. Refusals and rewrites are counted.
    pub(crate) fn admit(
        &mut self,
        from: Side,
        mut msg: J1939Message,
        now: Timestamp,
    ) -> Result<J1939Message, Refusal> {
        let verdict = self.check(from, &msg, now);
        if let Err(r) = verdict {
            self.count(r);
            debug!(side = %from, pgn = %msg.pgn, len = msg.data.len(), refusal = ?r, "message not forwarded");
            return Err(r);
        }
        let kind = MessageKind::from_pgn(msg.pgn);
        match (from, kind) {
            (Side::Bms, Some(MessageKind::Brm)) if self.config.blank_vin => {
                // The decode in `check` proved the body holds the VIN.
                if let Some(vin) = msg.data.get_mut(BRM_VIN) {
                    vin.fill(0xFF);
                    self.counters.vin_blanked += 1;
                }
            }
            (Side::Pile, Some(MessageKind::Crm)) if self.holds_recognition() => {
                if let Some(b) = msg.data.first_mut()
                    && *b == CRM_RECOGNIZED
                {
                    *b = CRM_NOT_RECOGNIZED;
                    self.counters.crm_held += 1;
                }
            }
            _ => {}
        }
        Ok(msg)
    }

    /// Whether a CRM(0xAA) from the pile would be rewritten right now.
    pub(crate) fn holds_recognition(&self) -> bool {
        self.config.gate_recognition && !self.pile_authenticated
    }

    /// Whether `msg` is the pile's CRM(0xAA).
    pub(crate) fn is_crm_recognized(&self, from: Side, msg: &J1939Message) -> bool {
        from == Side::Pile
            && MessageKind::from_pgn(msg.pgn) == Some(MessageKind::Crm)
            && msg.data.first() == Some(&CRM_RECOGNIZED)
    }

    fn check(&mut self, from: Side, msg: &J1939Message, now: Timestamp) -> Result<(), Refusal> {
        if !self.config.allowlist(from).contains(&msg.pgn) {
            return Err(Refusal::NotAllowed);
        }
        let key = (from, msg.pgn, msg.source, msg.destination);
        let rate = self.config.rate;
        let bucket = self
            .buckets
            .entry(key)
            .or_insert_with(|| Bucket::full(rate, now));
        if !bucket.take(rate, now) {
            return Err(Refusal::RateLimited);
        }
        if MessageKind::from_pgn(msg.pgn).is_some()
            && let Err(e) = Message::decode(msg.pgn, &msg.data)
        {
            debug!(side = %from, pgn = %msg.pgn, error = %e, "GB/T message does not decode");
            return Err(Refusal::Malformed);
        }
        Ok(())
    }

    fn count(&mut self, r: Refusal) {
        let c = &mut self.counters;
        match r {
            Refusal::Malformed => c.dropped_malformed += 1,
            Refusal::WrongAddress => c.dropped_wrong_address += 1,
            Refusal::NotAllowed => c.dropped_not_allowed += 1,
            Refusal::RateLimited => c.dropped_rate_limited += 1,
            Refusal::ForGateway => c.for_gateway += 1,
            Refusal::OwnTraffic => {}
        }
    }
}

/// Micro-tokens per message: integer arithmetic with sub-token refill.
const TOKEN: u64 = 1_000_000;

/// A token bucket in micro-tokens: `per_second` tokens a second is
/// `per_second` micro-tokens a microsecond, so refill needs no division.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    micro_tokens: u64,
    at: Timestamp,
}

impl Bucket {
    fn capacity(rate: RateLimit) -> u64 {
        u64::from(rate.burst.max(1)).saturating_mul(TOKEN)
    }

    fn full(rate: RateLimit, now: Timestamp) -> Self {
        Bucket {
            micro_tokens: Self::capacity(rate),
            at: now,
        }
    }

    /// Refills for the time since the last call and takes one token if there is one.
    fn take(&mut self, rate: RateLimit, now: Timestamp) -> bool {
        let elapsed = now.saturating_since(self.at);
        let elapsed_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let refill = elapsed_us.saturating_mul(u64::from(rate.per_second));
        self.micro_tokens = self
            .micro_tokens
            .saturating_add(refill)
            .min(Self::capacity(rate));
        // Time never runs backwards for a bucket: a stale `now` refills nothing.
        self.at = self.at.max(now);
        if self.micro_tokens >= TOKEN {
            self.micro_tokens -= TOKEN;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::gbt27930::{BMS_ADDRESS, CHARGER_ADDRESS};

    fn config() -> FirewallConfig {
        FirewallConfig::gbt27930(
            Address(BMS_ADDRESS),
            Address(CHARGER_ADDRESS),
            Address(0xF5),
        )
    }

    #[test]
    fn default_lists_split_the_standard_by_sender() {
        let b2p = default_bms_to_pile();
        let p2b = default_pile_to_bms();
        assert_eq!(b2p.len() + p2b.len(), MessageKind::ALL.len());
        assert!(b2p.is_disjoint(&p2b));
        assert!(b2p.contains(&MessageKind::Brm.pgn()));
        assert!(b2p.contains(&MessageKind::Bem.pgn()));
        assert!(p2b.contains(&MessageKind::Crm.pgn()));
        assert!(p2b.contains(&MessageKind::Csd.pgn()));
        assert!(!p2b.contains(&MessageKind::Bcl.pgn()));
        // The auth PGN is for the gateway, never forwarded.
        let auth = Pgn::new(crate::auth::AUTH_PGN).unwrap();
        assert!(!b2p.contains(&auth) && !p2b.contains(&auth));
    }

    #[test]
    fn gbt27930_defaults() {
        let c = config();
        assert_eq!(
            c.rate,
            RateLimit {
                per_second: 100,
                burst: 20
            }
        );
        assert!(c.blank_vin && c.gate_recognition);
        assert_eq!(c.address(Side::Bms), Address(0xF4));
        assert_eq!(c.address(Side::Pile), Address(0x56));
        assert_eq!(Side::Bms.other(), Side::Pile);
    }

    #[test]
    fn brm_vin_offset_matches_the_codec() {
        let brm = crate::gbt27930::bms::BmsConfig::default().identity;
        let bytes = Message::Brm(brm.clone()).encode();
        assert_eq!(bytes.get(BRM_VIN), Some(&brm.vin[..]));
    }

    #[test]
    fn bucket_allows_the_burst_then_the_rate() {
        let rate = RateLimit {
            per_second: 100,
            burst: 20,
        };
        let t0 = Timestamp::from_millis(1000);
        let mut b = Bucket::full(rate, t0);
        assert_eq!((0..30).filter(|_| b.take(rate, t0)).count(), 20);
        // 100/s: one token every 10 ms.
        assert!(!b.take(rate, t0 + Duration::from_millis(9)));
        assert!(b.take(rate, t0 + Duration::from_millis(10)));
        assert!(!b.take(rate, t0 + Duration::from_millis(10)));
        // A long pause refills up to the burst, no more.
        let later = t0 + Duration::from_secs(60);
        assert_eq!((0..30).filter(|_| b.take(rate, later)).count(), 20);
        // A stale time refills nothing and does not rewind the bucket.
        assert!(!b.take(rate, t0));
        assert!(!b.take(rate, later + Duration::from_millis(5)));
        assert!(b.take(rate, later + Duration::from_millis(10)));
    }

    #[test]
    fn bucket_with_zero_burst_still_passes_one() {
        let rate = RateLimit {
            per_second: 0,
            burst: 0,
        };
        let mut b = Bucket::full(rate, Timestamp::ZERO);
        assert!(b.take(rate, Timestamp::ZERO));
        assert!(!b.take(rate, Timestamp::from_millis(10_000)));
    }
}
