//! The identity service's decisions, sans-IO: messages and the time in, the
//! sealed replies and what to log out. The MQTT shell around it feeds it
//! every message from the cloud's subscriptions and calls
//! [`CloudService::on_tick`] at [`CloudService::next_deadline`].
//!
//! Instances share nothing but the registries: each request reaches one
//! instance through the shared subscription and is answered there; approvals
//! reach every instance, and only the one holding the request acts.
//!
//! The rules (`docs/protocol.md` §6.6), in order:
//! - a message that does not open under the registered vehicle's (or
//!   owner's) key is dropped and logged ([`Output::Rejected`]): the cloud
//!   cannot, or must not, answer it;
//! - a request that contradicts its own envelope gets `bad_request`;
//! - a revoked vehicle gets `revoked`, a request whose time is more than
//!   `max_request_age_s` from ours gets `stale_request`, and a pile not in
//!   the registry gets `unknown_pile`;
//! - with approval required, the vehicle gets `PendingApproval` at once, and
//!   the grant follows the owner's approval or `approval_denied`, or
//!   `approval_timeout` at the deadline;
//! - otherwise the grant: an online ticket for the pile valid from now for
//!   `grant_lifetime_s`, and up to `vouchers_per_grant` vouchers.
//!
//! A repeated request (the vehicle retrying over a reconnect) gets the same
//! reply again instead of a second ticket.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

use super::config::CloudSettings;
use super::registry::{ApprovalPolicy, PileEntry, Registry};
use crate::auth::{Credential, Rng};
use crate::cloud::envelope::{self, EnvelopeError, KeyPair, PublicKey};
use crate::cloud::messages::{
    Approval, Denied, DenyReason, Event, Id16, IdentityGrant, IdentityRequest, MAX_VOUCHERS,
    MessageError, Payload, PendingApproval, Push, Request, Response, Revocation, SessionRecord,
    TicketId, Voucher, VoucherBatch,
};
use crate::cloud::topics::{self, TopicError, TopicKind, VehicleId};

/// Requests remembered for answering repeats.
const ANSWERED_CAPACITY: usize = 4096;
/// Session record ids remembered for deduplication.
const RECORDS_CAPACITY: usize = 65_536;
/// Requests one vehicle may have waiting for approval at once.
const HELD_PER_VEHICLE: usize = 4;

/// One message from the cloud's subscriptions.
#[derive(Clone, Copy, Debug)]
pub struct Inbound<'a> {
    pub topic: &'a str,
    /// MQTT 5 Correlation Data: the request id of a request, the record id
    /// of an event; none on approvals.
    pub correlation: Option<&'a [u8]>,
    /// MQTT 5 Response Topic (requests only).
    pub response_topic: Option<&'a str>,
    pub payload: &'a [u8],
}

/// What a reply said, for logs and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplyKind {
    Granted {
        charger_number: u32,
        not_after: u32,
        /// The ticket ids of the vouchers sealed with the grant, so the
        /// shell can log what it issued (the fault suite checks no voucher
        /// is spent twice against this).
        vouchers: Vec<TicketId>,
    },
    Pending {
        request_id: Id16,
        deadline: u32,
    },
    Denied(DenyReason),
}

/// What the shell should do.
#[derive(Clone, Debug)]
pub enum Output {
    /// Publish `payload` at QoS 1 on `topic` (the vehicle's
    /// `identity/resp`) with Correlation Data `correlation`.
    Reply {
        vehicle: VehicleId,
        topic: String,
        correlation: Id16,
        payload: Vec<u8>,
        kind: ReplyKind,
    },
    /// Publish `payload` at QoS 1 on `topic` (the vehicle's `vouchers`),
    /// without correlation data.
    Push {
        vehicle: VehicleId,
        topic: String,
        payload: Vec<u8>,
    },
    /// A new session record, for reconciliation.
    Recorded(SessionRecord),
    /// A message dropped without a reply; log it.
    Rejected {
        vehicle: Option<VehicleId>,
        reason: RejectReason,
    },
}

/// Why a message got no reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RejectReason {
    #[error("{0}")]
    Topic(#[from] TopicError),
    #[error("the cloud does not take messages on {0} topics")]
    NotForCloud(TopicKind),
    #[error("vehicle not in the registry; no key to answer with")]
    UnknownVehicle,
    #[error("no correlation data on a request")]
    MissingCorrelation,
    #[error("response topic {found:?} is not the vehicle's identity/resp")]
    ResponseTopic { found: String },
    #[error("{0}")]
    Envelope(#[from] EnvelopeError),
    #[error("{0}")]
    Decode(#[from] MessageError),
    #[error("message names vehicle {found}, not the topic's")]
    WrongVehicle { found: VehicleId },
    #[error("approval for a vehicle with no owner key in the registry")]
    NoOwnerKey,
    #[error("approval for request {} which is not waiting here", hex::encode(.request_id))]
    NotPending { request_id: Id16 },
    #[error("session record's correlation data is not its record id")]
    RecordCorrelation,
    #[error("session record {} already recorded", hex::encode(.record_id))]
    DuplicateRecord { record_id: Id16 },
}

/// Why an operator action (a push) failed.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("vehicle {0} is not in the registry")]
    UnknownVehicle(VehicleId),
    #[error("charger {0} is not in the pile registry")]
    UnknownPile(u32),
    #[error("{0}")]
    Message(#[from] MessageError),
    #[error("{0}")]
    Envelope(#[from] EnvelopeError),
}

/// A request waiting for its owner.
#[derive(Debug)]
struct Held {
    request: IdentityRequest,
    deadline_ms: u64,
}

/// Insertion-ordered, bounded: the oldest entry goes first.
#[derive(Debug)]
struct Bounded<K, V> {
    map: HashMap<K, V>,
    order: VecDeque<K>,
    capacity: usize,
}

impl<K: Clone + Eq + Hash, V> Bounded<K, V> {
    fn new(capacity: usize) -> Self {
        Bounded {
            map: HashMap::new(),
            order: VecDeque::new(),
            capacity,
        }
    }

    fn get(&self, k: &K) -> Option<&V> {
        self.map.get(k)
    }

    fn insert(&mut self, k: K, v: V) {
        if self.map.insert(k.clone(), v).is_none() {
            self.order.push_back(k);
            if self.order.len() > self.capacity
                && let Some(old) = self.order.pop_front()
            {
                self.map.remove(&old);
            }
        }
    }
}

type RequestKey = (VehicleId, Id16);

/// A registered vehicle to answer: its id and the key answers are sealed to.
struct To<'a> {
    vehicle: &'a VehicleId,
    key: PublicKey,
}

/// The reference cloud identity service.
#[derive(Debug)]
pub struct CloudService {
    registry: Registry,
    keys: KeyPair,
    settings: CloudSettings,
    held: HashMap<RequestKey, Held>,
    /// The last reply to each recent request, sent again for a repeat.
    answered: Bounded<RequestKey, Output>,
    records: Bounded<(VehicleId, Id16), ()>,
}

fn unix_s(now_ms: u64) -> u32 {
    u32::try_from(now_ms / 1000).unwrap_or(u32::MAX)
}

fn random16(rng: &mut dyn Rng) -> Id16 {
    let mut b = [0u8; 16];
    rng.fill(&mut b);
    b
}

impl CloudService {
    pub fn new(registry: Registry, keys: KeyPair, settings: CloudSettings) -> CloudService {
        CloudService {
            registry,
            keys,
            settings,
            held: HashMap::new(),
            answered: Bounded::new(ANSWERED_CAPACITY),
            records: Bounded::new(RECORDS_CAPACITY),
        }
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// For operator changes (revoking a vehicle) while running.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// Handle one message from the subscriptions.
    pub fn handle(&mut self, msg: Inbound<'_>, now_unix_ms: u64, rng: &mut dyn Rng) -> Vec<Output> {
        let (vehicle, kind) = match topics::parse(msg.topic) {
            Ok(v) => v,
            Err(e) => return vec![rejected(None, e.into())],
        };
        let result = match kind {
            TopicKind::IdentityRequest => self.on_request(&vehicle, msg, now_unix_ms, rng),
            TopicKind::Approval => self.on_approval(&vehicle, msg, now_unix_ms, rng),
            TopicKind::Events => self.on_event(&vehicle, msg),
            TopicKind::IdentityResponse | TopicKind::Vouchers => {
                Err(RejectReason::NotForCloud(kind))
            }
        };
        match result {
            Ok(out) => vec![out],
            Err(reason) => vec![rejected(Some(vehicle), reason)],
        }
    }

    /// Deny every held request whose approval deadline has passed.
    pub fn on_tick(&mut self, now_unix_ms: u64, rng: &mut dyn Rng) -> Vec<Output> {
        let mut due: Vec<(u64, RequestKey)> = self
            .held
            .iter()
            .filter(|(_, h)| h.deadline_ms <= now_unix_ms)
            .map(|(k, h)| (h.deadline_ms, k.clone()))
            .collect();
        due.sort();
        let mut out = Vec::with_capacity(due.len());
        for (_, key) in due {
            let Some(held) = self.held.remove(&key) else {
                continue;
            };
            let reply = match self.registry.vehicle(&key.0) {
                Some(entry) => self.deny(
                    &To {
                        vehicle: &key.0,
                        key: entry.hpke_public,
                    },
                    &held.request,
                    DenyReason::ApprovalTimeout,
                    "the owner did not answer before the deadline",
                    rng,
                ),
                // Removed from the registry while waiting: nothing to seal to.
                None => rejected(Some(key.0.clone()), RejectReason::UnknownVehicle),
            };
            self.answered.insert(key, reply.clone());
            out.push(reply);
        }
        out
    }

    /// When [`on_tick`](Self::on_tick) next has something to do (Unix ms).
    pub fn next_deadline(&self) -> Option<u64> {
        self.held.values().map(|h| h.deadline_ms).min()
    }

    /// A revocation pushed to `vehicle`'s `vouchers` topic.
    pub fn revoke(
        &self,
        vehicle: &VehicleId,
        seq: u64,
        ticket_ids: Vec<TicketId>,
        now_unix_ms: u64,
        rng: &mut dyn Rng,
    ) -> Result<Output, ServiceError> {
        let push = Push::Revocation(Revocation {
            vehicle_id: vehicle.clone(),
            seq,
            issued_at: unix_s(now_unix_ms),
            ticket_ids,
        });
        self.push(vehicle, &push, rng)
    }

    /// A fresh batch of `count` vouchers (at most 64) for `charger_number`,
    /// pushed to `vehicle`'s `vouchers` topic.
    pub fn push_vouchers(
        &self,
        vehicle: &VehicleId,
        charger_number: u32,
        count: usize,
        now_unix_ms: u64,
        rng: &mut dyn Rng,
    ) -> Result<Output, ServiceError> {
        let pile = self
            .registry
            .pile(charger_number)
            .ok_or(ServiceError::UnknownPile(charger_number))?;
        let (batch, _) = self.vouchers(vehicle, pile, count, unix_s(now_unix_ms), rng);
        self.push(vehicle, &Push::Vouchers(batch), rng)
    }

    fn push(
        &self,
        vehicle: &VehicleId,
        push: &Push,
        rng: &mut dyn Rng,
    ) -> Result<Output, ServiceError> {
        let entry = self
            .registry
            .vehicle(vehicle)
            .ok_or_else(|| ServiceError::UnknownVehicle(vehicle.clone()))?;
        push.check()?;
        let topic = topics::vouchers(vehicle);
        let payload = envelope::seal(
            &entry.hpke_public,
            &self.keys,
            &topic,
            &[],
            &push.encode(),
            rng,
        )?;
        Ok(Output::Push {
            vehicle: vehicle.clone(),
            topic,
            payload,
        })
    }

    fn on_request(
        &mut self,
        vehicle: &VehicleId,
        msg: Inbound<'_>,
        now_ms: u64,
        rng: &mut dyn Rng,
    ) -> Result<Output, RejectReason> {
        let entry = self
            .registry
            .vehicle(vehicle)
            .ok_or(RejectReason::UnknownVehicle)?;
        let (key, revoked, approval) = (entry.hpke_public, entry.revoked, entry.approval);
        let to = To { vehicle, key };
        let correlation = msg.correlation.ok_or(RejectReason::MissingCorrelation)?;
        // Answers go to the vehicle's own identity/resp only; the envelope
        // would make them useless elsewhere anyway.
        if let Some(rt) = msg.response_topic
            && rt != topics::identity_resp(vehicle)
        {
            return Err(RejectReason::ResponseTopic {
                found: rt.chars().take(100).collect(),
            });
        }
        let plain = envelope::open(
            self.keys.secret(),
            &key,
            msg.topic,
            correlation,
            msg.payload,
        )?;
        let Request::Identity(req) = Request::decode(&plain)?;

        let request_key = (vehicle.clone(), req.request_id);
        if let Some(previous) = self.answered.get(&request_key) {
            return Ok(previous.clone());
        }
        if let Some(held) = self.held.get(&request_key) {
            // Still waiting for the owner: say so again.
            let deadline_ms = held.deadline_ms;
            return Ok(self.pending(&to, &req, deadline_ms, rng));
        }
        let now_s = unix_s(now_ms);
        let reply = if req.vehicle_id != *vehicle {
            let detail = "the request names another vehicle than its topic";
            self.deny(&to, &req, DenyReason::BadRequest, detail, rng)
        } else if correlation != req.request_id {
            let detail = "the correlation data is not the request id";
            self.deny(&to, &req, DenyReason::BadRequest, detail, rng)
        } else if revoked {
            self.deny(
                &to,
                &req,
                DenyReason::Revoked,
                "this vehicle is revoked",
                rng,
            )
        } else if now_s.abs_diff(req.time) > self.settings.max_request_age_s {
            let detail = format!(
                "request time {} is more than {} s from the cloud's {now_s}",
                req.time, self.settings.max_request_age_s
            );
            self.deny(&to, &req, DenyReason::StaleRequest, &detail, rng)
        } else if approval == ApprovalPolicy::Required {
            // An unknown pile is refused at once rather than after approval.
            match self.registry.pile(req.charger_number) {
                None => self.unknown_pile(&to, &req, rng),
                Some(_) => return Ok(self.hold(&to, req, now_ms, rng)),
            }
        } else {
            self.grant_or_deny(&to, &req, now_s, rng)
        };
        self.answered.insert(request_key, reply.clone());
        Ok(reply)
    }

    fn hold(
        &mut self,
        to: &To<'_>,
        req: IdentityRequest,
        now_ms: u64,
        rng: &mut dyn Rng,
    ) -> Output {
        let waiting = self.held.keys().filter(|(v, _)| v == to.vehicle).count();
        if waiting >= HELD_PER_VEHICLE {
            let detail = format!("{waiting} requests already wait for the owner's approval");
            return self.deny(to, &req, DenyReason::BadRequest, &detail, rng);
        }
        let deadline_ms =
            now_ms.saturating_add(u64::from(self.settings.approval_deadline_s) * 1000);
        let reply = self.pending(to, &req, deadline_ms, rng);
        self.held.insert(
            (to.vehicle.clone(), req.request_id),
            Held {
                request: req,
                deadline_ms,
            },
        );
        reply
    }

    fn pending(
        &self,
        to: &To<'_>,
        req: &IdentityRequest,
        deadline_ms: u64,
        rng: &mut dyn Rng,
    ) -> Output {
        let deadline = unix_s(deadline_ms);
        let pending = Response::Pending(PendingApproval {
            vehicle_id: to.vehicle.clone(),
            request_nonce: req.nonce,
            deadline,
        });
        let kind = ReplyKind::Pending {
            request_id: req.request_id,
            deadline,
        };
        self.reply(to, req, &pending, kind, rng)
    }

    fn on_approval(
        &mut self,
        vehicle: &VehicleId,
        msg: Inbound<'_>,
        now_ms: u64,
        rng: &mut dyn Rng,
    ) -> Result<Output, RejectReason> {
        let entry = self
            .registry
            .vehicle(vehicle)
            .ok_or(RejectReason::UnknownVehicle)?;
        let owner = entry.owner_public.ok_or(RejectReason::NoOwnerKey)?;
        let to = To {
            vehicle,
            key: entry.hpke_public,
        };
        // Approvals carry no correlation data; the request id inside binds
        // each to one held request.
        let plain = envelope::open(self.keys.secret(), &owner, msg.topic, &[], msg.payload)?;
        let Approval::Owner(approval) = Approval::decode(&plain)?;
        if approval.vehicle_id != *vehicle {
            return Err(RejectReason::WrongVehicle {
                found: approval.vehicle_id,
            });
        }
        let key = (vehicle.clone(), approval.request_id);
        let held = self.held.remove(&key).ok_or(RejectReason::NotPending {
            request_id: approval.request_id,
        })?;
        let reply = if approval.approve {
            self.grant_or_deny(&to, &held.request, unix_s(now_ms), rng)
        } else {
            let detail = "the owner denied the request";
            self.deny(&to, &held.request, DenyReason::ApprovalDenied, detail, rng)
        };
        self.answered.insert(key, reply.clone());
        Ok(reply)
    }

    fn on_event(&mut self, vehicle: &VehicleId, msg: Inbound<'_>) -> Result<Output, RejectReason> {
        let entry = self
            .registry
            .vehicle(vehicle)
            .ok_or(RejectReason::UnknownVehicle)?;
        let correlation = msg.correlation.unwrap_or_default();
        let plain = envelope::open(
            self.keys.secret(),
            &entry.hpke_public,
            msg.topic,
            correlation,
            msg.payload,
        )?;
        let Event::SessionRecord(record) = Event::decode(&plain)?;
        if record.vehicle_id != *vehicle {
            return Err(RejectReason::WrongVehicle {
                found: record.vehicle_id,
            });
        }
        if correlation != record.record_id {
            return Err(RejectReason::RecordCorrelation);
        }
        let key = (vehicle.clone(), record.record_id);
        if self.records.get(&key).is_some() {
            return Err(RejectReason::DuplicateRecord {
                record_id: record.record_id,
            });
        }
        self.records.insert(key, ());
        Ok(Output::Recorded(record))
    }

    /// The grant, unless the vehicle was revoked or the pile removed (both
    /// can happen while a request waits for approval).
    fn grant_or_deny(
        &self,
        to: &To<'_>,
        req: &IdentityRequest,
        now_s: u32,
        rng: &mut dyn Rng,
    ) -> Output {
        if self.registry.vehicle(to.vehicle).is_none_or(|v| v.revoked) {
            return self.deny(to, req, DenyReason::Revoked, "this vehicle is revoked", rng);
        }
        match self.registry.pile(req.charger_number) {
            Some(pile) => self.grant(to, req, pile, now_s, rng),
            None => self.unknown_pile(to, req, rng),
        }
    }

    fn unknown_pile(&self, to: &To<'_>, req: &IdentityRequest, rng: &mut dyn Rng) -> Output {
        let detail = format!("charger {} is not registered", req.charger_number);
        self.deny(to, req, DenyReason::UnknownPile, &detail, rng)
    }

    fn grant(
        &self,
        to: &To<'_>,
        req: &IdentityRequest,
        pile: &PileEntry,
        now_s: u32,
        rng: &mut dyn Rng,
    ) -> Output {
        let s = &self.settings;
        let not_after = now_s.saturating_add(s.grant_lifetime_s);
        let pseudonym = random16(rng);
        let online = Credential::issue(
            &pile.root,
            pile.key_offset,
            pile.charger_number,
            pseudonym,
            now_s,
            not_after,
            s.grant_energy_cap_wh,
            false,
            rng,
        );
        let count = usize::from(req.want_vouchers.min(s.vouchers_per_grant)).min(MAX_VOUCHERS);
        let (vouchers, voucher_ids) = if count > 0 {
            let (batch, ids) = self.vouchers(to.vehicle, pile, count, now_s, rng);
            (Some(batch), ids)
        } else {
            (None, Vec::new())
        };
        let kind = ReplyKind::Granted {
            charger_number: pile.charger_number,
            not_after,
            vouchers: voucher_ids,
        };
        let grant = Response::Grant(IdentityGrant::new(
            to.vehicle.clone(),
            req.nonce,
            &online,
            vouchers,
        ));
        self.reply(to, req, &grant, kind, rng)
    }

    fn vouchers(
        &self,
        vehicle: &VehicleId,
        pile: &PileEntry,
        count: usize,
        now_s: u32,
        rng: &mut dyn Rng,
    ) -> (VoucherBatch, Vec<TicketId>) {
        let s = &self.settings;
        let not_after = now_s.saturating_add(s.voucher_lifetime_s);
        let mut ids = Vec::with_capacity(count.min(MAX_VOUCHERS));
        let vouchers = (0..count.min(MAX_VOUCHERS))
            .map(|_| {
                // A fresh pseudonym per ticket, so piles cannot link them.
                let pseudonym = random16(rng);
                let voucher = Credential::issue(
                    &pile.root,
                    pile.key_offset,
                    pile.charger_number,
                    pseudonym,
                    now_s,
                    not_after,
                    s.voucher_energy_cap_wh,
                    true,
                    rng,
                );
                ids.push(voucher.ticket_id());
                Voucher::from_credential(&voucher)
            })
            .collect();
        let batch = VoucherBatch {
            vehicle_id: vehicle.clone(),
            batch_id: random16(rng),
            issued_at: now_s,
            vouchers,
        };
        (batch, ids)
    }

    fn deny(
        &self,
        to: &To<'_>,
        req: &IdentityRequest,
        reason: DenyReason,
        detail: &str,
        rng: &mut dyn Rng,
    ) -> Output {
        let denied = Response::Denied(Denied {
            vehicle_id: to.vehicle.clone(),
            request_nonce: req.nonce,
            reason,
            detail: detail.to_owned(),
        });
        self.reply(to, req, &denied, ReplyKind::Denied(reason), rng)
    }

    fn reply(
        &self,
        to: &To<'_>,
        req: &IdentityRequest,
        response: &Response,
        kind: ReplyKind,
        rng: &mut dyn Rng,
    ) -> Output {
        let topic = topics::identity_resp(to.vehicle);
        let payload = envelope::seal(
            &to.key,
            &self.keys,
            &topic,
            &req.request_id,
            &response.encode(),
            rng,
        )
        // Invariant: a topic built from a VehicleId, 16 bytes of correlation
        // data, and a response of at most MAX_VOUCHERS vouchers and short
        // details fit the envelope.
        .expect("a response always fits the envelope");
        Output::Reply {
            vehicle: to.vehicle.clone(),
            topic,
            correlation: req.request_id,
            payload,
            kind,
        }
    }
}

fn rejected(vehicle: Option<VehicleId>, reason: RejectReason) -> Output {
    Output::Rejected { vehicle, reason }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::rng::StreamRng;
    use crate::auth::{PileKeys, RootKey, ticket};
    use crate::cloud::exchange::{
        self, ExchangeError, ExchangeEvent, ExchangeParams, IdentityExchange, OutgoingRequest,
        PushEvent, VehicleKeys,
    };
    use crate::cloud::messages::OwnerApproval;
    use crate::sim::cloud::owner::seal_approval;
    use crate::sim::cloud::registry::VehicleEntry;

    const T0_MS: u64 = 1_760_000_000_000;
    const T0: u32 = 1_760_000_000;
    const PILE: u32 = 1;
    const ROOT: [u8; 32] = [0x42; 32];

    struct World {
        cloud: CloudService,
        cloud_public: PublicKey,
        /// veh-a: no approval; veh-b: approval required; veh-r: revoked.
        a: VehicleKeys,
        b: VehicleKeys,
        r: VehicleKeys,
        owner_b: KeyPair,
        rng: StreamRng,
    }

    fn vid(s: &str) -> VehicleId {
        VehicleId::parse(s).expect("valid id")
    }

    fn world(settings: CloudSettings) -> World {
        let mut rng = StreamRng::new(7);
        let cloud_keys = KeyPair::generate(&mut rng);
        let cloud_public = *cloud_keys.public();
        let owner_b = KeyPair::generate(&mut rng);
        let mut registry = Registry::default();
        let mut vehicle = |id: &str, approval, revoked, rng: &mut StreamRng| {
            let own = KeyPair::generate(rng);
            registry.insert_vehicle(VehicleEntry {
                id: vid(id),
                hpke_public: *own.public(),
                owner_public: Some(*owner_b.public()),
                approval,
                revoked,
            });
            VehicleKeys {
                vehicle_id: vid(id),
                own,
                cloud: cloud_public,
            }
        };
        let a = vehicle("veh-a", ApprovalPolicy::None, false, &mut rng);
        let b = vehicle("veh-b", ApprovalPolicy::Required, false, &mut rng);
        let r = vehicle("veh-r", ApprovalPolicy::None, true, &mut rng);
        registry.insert_pile(PileEntry {
            charger_number: PILE,
            root: RootKey::from_bytes(ROOT),
            key_offset: 3,
        });
        World {
            cloud: CloudService::new(registry, cloud_keys, settings),
            cloud_public,
            a,
            b,
            r,
            owner_b,
            rng,
        }
    }

    fn params(charger_number: u32, want_vouchers: u16) -> ExchangeParams {
        ExchangeParams {
            charger_number,
            region_code: *b"310",
            want_vouchers,
        }
    }

    fn request(msg: &OutgoingRequest) -> Inbound<'_> {
        Inbound {
            topic: &msg.topic,
            correlation: Some(&msg.correlation),
            response_topic: Some(&msg.response_topic),
            payload: &msg.payload,
        }
    }

    /// One round: the vehicle asks at `now_ms`, the cloud answers.
    fn ask(
        w: &mut World,
        who: &VehicleKeys,
        p: ExchangeParams,
        now_ms: u64,
    ) -> (IdentityExchange, OutgoingRequest, Vec<Output>) {
        let (ex, out) = IdentityExchange::start(p, who, unix_s(now_ms), &mut w.rng);
        let replies = w.cloud.handle(request(&out), now_ms, &mut w.rng);
        (ex, out, replies)
    }

    /// Deliver the one reply in `outputs` to the exchange.
    fn deliver(
        ex: &mut IdentityExchange,
        outputs: &[Output],
        now: u32,
    ) -> Result<ExchangeEvent, ExchangeError> {
        let [
            Output::Reply {
                topic,
                correlation,
                payload,
                ..
            },
        ] = outputs
        else {
            panic!("expected one reply, got {outputs:?}");
        };
        ex.on_response(topic, correlation, payload, now)
    }

    fn kind(outputs: &[Output]) -> &ReplyKind {
        match outputs {
            [Output::Reply { kind, .. }] => kind,
            _ => panic!("expected one reply, got {outputs:?}"),
        }
    }

    fn rejection(outputs: &[Output]) -> &RejectReason {
        match outputs {
            [Output::Rejected { reason, .. }] => reason,
            _ => panic!("expected one rejection, got {outputs:?}"),
        }
    }

    fn approve(
        w: &mut World,
        owner: &KeyPair,
        request_id: Id16,
        approve: bool,
        now_ms: u64,
    ) -> Vec<Output> {
        let approval = OwnerApproval {
            vehicle_id: vid("veh-b"),
            request_id,
            approve,
            time: unix_s(now_ms),
        };
        let sealed = seal_approval(&approval, owner, &w.cloud_public, &mut w.rng).expect("sealed");
        w.cloud.handle(
            Inbound {
                topic: &sealed.topic,
                correlation: None,
                response_topic: None,
                payload: &sealed.payload,
            },
            now_ms,
            &mut w.rng,
        )
    }

    #[test]
    fn grant_opens_at_the_pile_with_the_same_session_key() {
        let settings = CloudSettings {
            vouchers_per_grant: 2,
            ..CloudSettings::default()
        };
        let mut w = world(settings);
        let a = w.a.clone();
        let (mut ex, _, out) = ask(&mut w, &a, params(PILE, 5), T0_MS);
        let ExchangeEvent::Granted(g) = deliver(&mut ex, &out, T0).expect("accepted") else {
            panic!("not granted");
        };
        // The reply names exactly the vouchers the vehicle received.
        assert_eq!(
            kind(&out),
            &ReplyKind::Granted {
                charger_number: PILE,
                not_after: T0 + 300,
                vouchers: g.vouchers.iter().map(|v| v.ticket_id()).collect(),
            }
        );
        assert_eq!(
            (g.credential.not_before, g.credential.not_after),
            (T0, T0 + 300)
        );
        assert_eq!(g.credential.key_offset(), 3);
        let pile = PileKeys {
            root: RootKey::from_bytes(ROOT),
            charger_number: PILE,
            current_offset: 3,
            previous_offset: None,
        };
        let opened =
            ticket::open(&pile, &g.credential.ticket, T0 + 1, 300).expect("the pile opens it");
        assert_eq!(
            opened.body.session_key.expose(),
            g.credential.session_key.expose()
        );
        assert!(!opened.body.voucher);
        // Vouchers: capped by vouchers_per_grant, valid 7 days, capped in energy.
        assert_eq!(g.vouchers.len(), 2);
        for v in &g.vouchers {
            let opened = ticket::open(&pile, &v.ticket, T0 + 86_400, 300).expect("opens");
            assert!(opened.body.voucher);
            assert_eq!(
                (opened.body.not_after, opened.body.energy_cap_wh),
                (T0 + 604_800, 30_000)
            );
        }
        assert_ne!(g.vouchers[0].ticket_id(), g.vouchers[1].ticket_id());
    }

    #[test]
    fn no_vouchers_unless_both_sides_want_them() {
        let mut w = world(CloudSettings::default());
        let a = w.a.clone();
        let (mut ex, _, out) = ask(&mut w, &a, params(PILE, 5), T0_MS);
        let ExchangeEvent::Granted(g) = deliver(&mut ex, &out, T0).expect("accepted") else {
            panic!("not granted");
        };
        assert!(g.vouchers.is_empty());
        let mut w = world(CloudSettings {
            vouchers_per_grant: 8,
            ..CloudSettings::default()
        });
        let (_, _, out) = ask(&mut w, &a, params(PILE, 0), T0_MS);
        assert!(matches!(kind(&out), ReplyKind::Granted { vouchers, .. } if vouchers.is_empty()));
    }

    #[test]
    fn revoked_vehicle_is_denied() {
        let mut w = world(CloudSettings::default());
        let r = w.r.clone();
        let (mut ex, _, out) = ask(&mut w, &r, params(PILE, 0), T0_MS);
        assert_eq!(kind(&out), &ReplyKind::Denied(DenyReason::Revoked));
        assert!(matches!(
            deliver(&mut ex, &out, T0),
            Ok(ExchangeEvent::Denied {
                reason: DenyReason::Revoked,
                ..
            })
        ));
        assert!(ex.is_finished());
    }

    #[test]
    fn unknown_pile_is_denied_even_when_approval_is_required() {
        let mut w = world(CloudSettings::default());
        for who in [w.a.clone(), w.b.clone()] {
            let (mut ex, _, out) = ask(&mut w, &who, params(99, 0), T0_MS);
            assert_eq!(kind(&out), &ReplyKind::Denied(DenyReason::UnknownPile));
            let Ok(ExchangeEvent::Denied { reason, detail }) = deliver(&mut ex, &out, T0) else {
                panic!("denied");
            };
            assert_eq!(reason, DenyReason::UnknownPile);
            assert!(detail.contains("99"), "{detail}");
        }
        assert_eq!(w.cloud.next_deadline(), None);
    }

    #[test]
    fn stale_requests_are_denied_both_ways() {
        let mut w = world(CloudSettings::default());
        let a = w.a.clone();
        for vehicle_clock_ms in [T0_MS - 301_000, T0_MS + 301_000] {
            let (ex, out) =
                IdentityExchange::start(params(PILE, 0), &a, unix_s(vehicle_clock_ms), &mut w.rng);
            let mut ex = ex;
            let replies = w.cloud.handle(request(&out), T0_MS, &mut w.rng);
            assert_eq!(kind(&replies), &ReplyKind::Denied(DenyReason::StaleRequest));
            assert!(matches!(
                deliver(&mut ex, &replies, T0),
                Ok(ExchangeEvent::Denied {
                    reason: DenyReason::StaleRequest,
                    ..
                })
            ));
        }
        // 300 s off is still fresh.
        let (ex, out) = IdentityExchange::start(params(PILE, 0), &a, T0 - 300, &mut w.rng);
        drop(ex);
        let replies = w.cloud.handle(request(&out), T0_MS, &mut w.rng);
        assert!(matches!(kind(&replies), ReplyKind::Granted { .. }));
    }

    #[test]
    fn unknown_vehicle_and_forged_requests_get_no_reply() {
        let mut w = world(CloudSettings::default());
        let stranger = VehicleKeys {
            vehicle_id: vid("veh-x"),
            own: KeyPair::generate(&mut w.rng),
            cloud: w.cloud_public,
        };
        let (_, _, out) = ask(&mut w, &stranger, params(PILE, 0), T0_MS);
        assert_eq!(rejection(&out), &RejectReason::UnknownVehicle);

        // Someone with broker access asking as veh-a with their own key.
        let impostor = VehicleKeys {
            own: KeyPair::generate(&mut w.rng),
            ..w.a.clone()
        };
        let (_, _, out) = ask(&mut w, &impostor, params(PILE, 0), T0_MS);
        assert_eq!(
            rejection(&out),
            &RejectReason::Envelope(EnvelopeError::AuthenticationFailed)
        );

        // A genuine request with its correlation data or response topic changed.
        let a = w.a.clone();
        let (_, msg) = IdentityExchange::start(params(PILE, 0), &a, T0, &mut w.rng);
        let changed = [9u8; 16];
        let mut inbound = request(&msg);
        inbound.correlation = Some(&changed);
        let out = w.cloud.handle(inbound, T0_MS, &mut w.rng);
        assert_eq!(
            rejection(&out),
            &RejectReason::Envelope(EnvelopeError::AuthenticationFailed)
        );
        let mut inbound = request(&msg);
        inbound.correlation = None;
        assert_eq!(
            rejection(&w.cloud.handle(inbound, T0_MS, &mut w.rng)),
            &RejectReason::MissingCorrelation
        );
        let mut inbound = request(&msg);
        inbound.response_topic = Some("bmsgw/v1/veh-b/identity/resp");
        assert!(matches!(
            rejection(&w.cloud.handle(inbound, T0_MS, &mut w.rng)),
            RejectReason::ResponseTopic { .. }
        ));
        // Not a topic the cloud takes.
        let mut inbound = request(&msg);
        inbound.topic = "bmsgw/v1/veh-a/vouchers";
        assert_eq!(
            rejection(&w.cloud.handle(inbound, T0_MS, &mut w.rng)),
            &RejectReason::NotForCloud(TopicKind::Vouchers)
        );
        let mut inbound = request(&msg);
        inbound.topic = "elsewhere/veh-a";
        assert!(matches!(
            rejection(&w.cloud.handle(inbound, T0_MS, &mut w.rng)),
            RejectReason::Topic(_)
        ));
    }

    #[test]
    fn a_repeated_request_gets_the_same_reply_not_a_second_ticket() {
        let mut w = world(CloudSettings::default());
        let a = w.a.clone();
        let (mut ex, msg, first) = ask(&mut w, &a, params(PILE, 0), T0_MS);
        let again = w.cloud.handle(request(&msg), T0_MS + 5_000, &mut w.rng);
        let payload = |o: &[Output]| match o {
            [Output::Reply { payload, .. }] => payload.clone(),
            _ => panic!("reply"),
        };
        assert_eq!(payload(&first), payload(&again));
        assert!(deliver(&mut ex, &first, T0).is_ok());
        assert!(matches!(
            deliver(&mut ex, &again, T0),
            Err(ExchangeError::AlreadyFinished)
        ));
    }

    #[test]
    fn approval_granted() {
        let mut w = world(CloudSettings::default());
        let b = w.b.clone();
        let (mut ex, msg, out) = ask(&mut w, &b, params(PILE, 0), T0_MS);
        let ReplyKind::Pending {
            request_id,
            deadline,
        } = kind(&out).clone()
        else {
            panic!("pending");
        };
        assert_eq!((request_id, deadline), (msg.correlation, T0 + 120));
        assert!(
            matches!(deliver(&mut ex, &out, T0), Ok(ExchangeEvent::PendingApproval { deadline }) if deadline == T0 + 120)
        );
        assert_eq!(w.cloud.next_deadline(), Some(T0_MS + 120_000));
        // The vehicle asks again meanwhile: still pending, still one hold.
        let again = w.cloud.handle(request(&msg), T0_MS + 1_000, &mut w.rng);
        assert!(matches!(kind(&again), ReplyKind::Pending { .. }));

        let owner = w.owner_b.clone();
        let out = approve(&mut w, &owner, request_id, true, T0_MS + 30_000);
        assert!(matches!(kind(&out), ReplyKind::Granted { .. }));
        let ExchangeEvent::Granted(g) = deliver(&mut ex, &out, T0 + 30).expect("accepted") else {
            panic!("granted");
        };
        // Valid from the approval, not from the request.
        assert_eq!(g.credential.not_before, T0 + 30);
        assert_eq!(w.cloud.next_deadline(), None);
        assert!(w.cloud.on_tick(T0_MS + 200_000, &mut w.rng).is_empty());
        // A second approval finds nothing held.
        let out = approve(&mut w, &owner, request_id, true, T0_MS + 31_000);
        assert_eq!(rejection(&out), &RejectReason::NotPending { request_id });
    }

    #[test]
    fn approval_denied_by_the_owner() {
        let mut w = world(CloudSettings::default());
        let b = w.b.clone();
        let (mut ex, msg, out) = ask(&mut w, &b, params(PILE, 0), T0_MS);
        deliver(&mut ex, &out, T0).expect("pending");
        let owner = w.owner_b.clone();
        let out = approve(&mut w, &owner, msg.correlation, false, T0_MS + 10_000);
        assert_eq!(kind(&out), &ReplyKind::Denied(DenyReason::ApprovalDenied));
        assert!(matches!(
            deliver(&mut ex, &out, T0 + 10),
            Ok(ExchangeEvent::Denied {
                reason: DenyReason::ApprovalDenied,
                ..
            })
        ));
    }

    #[test]
    fn approval_timeout() {
        let mut w = world(CloudSettings {
            approval_deadline_s: 30,
            ..CloudSettings::default()
        });
        let b = w.b.clone();
        let (mut ex, msg, out) = ask(&mut w, &b, params(PILE, 0), T0_MS);
        deliver(&mut ex, &out, T0).expect("pending");
        let deadline = w.cloud.next_deadline().expect("a deadline");
        assert_eq!(deadline, T0_MS + 30_000);
        assert!(w.cloud.on_tick(deadline - 1, &mut w.rng).is_empty());
        let out = w.cloud.on_tick(deadline, &mut w.rng);
        assert_eq!(kind(&out), &ReplyKind::Denied(DenyReason::ApprovalTimeout));
        assert!(matches!(
            deliver(&mut ex, &out, T0 + 30),
            Ok(ExchangeEvent::Denied {
                reason: DenyReason::ApprovalTimeout,
                ..
            })
        ));
        assert_eq!(w.cloud.next_deadline(), None);
        // A late approval changes nothing, and a repeat gets the timeout again.
        let owner = w.owner_b.clone();
        assert!(matches!(
            rejection(&approve(
                &mut w,
                &owner,
                msg.correlation,
                true,
                deadline + 1
            )),
            RejectReason::NotPending { .. }
        ));
        let again = w.cloud.handle(request(&msg), deadline + 2, &mut w.rng);
        assert_eq!(
            kind(&again),
            &ReplyKind::Denied(DenyReason::ApprovalTimeout)
        );
    }

    #[test]
    fn approval_by_a_forged_owner_key_is_ignored() {
        let mut w = world(CloudSettings::default());
        let b = w.b.clone();
        let (mut ex, msg, out) = ask(&mut w, &b, params(PILE, 0), T0_MS);
        deliver(&mut ex, &out, T0).expect("pending");
        // The vehicle's own key is not the owner's second factor either.
        for forger in [KeyPair::generate(&mut w.rng), b.own.clone()] {
            let out = approve(&mut w, &forger, msg.correlation, true, T0_MS + 1_000);
            assert_eq!(
                rejection(&out),
                &RejectReason::Envelope(EnvelopeError::AuthenticationFailed)
            );
        }
        // Still held; it times out as if nobody had answered.
        assert_eq!(w.cloud.next_deadline(), Some(T0_MS + 120_000));
        let out = w.cloud.on_tick(T0_MS + 120_000, &mut w.rng);
        assert_eq!(kind(&out), &ReplyKind::Denied(DenyReason::ApprovalTimeout));
    }

    #[test]
    fn revocation_while_waiting_for_approval_wins() {
        let mut w = world(CloudSettings::default());
        let b = w.b.clone();
        let (_, msg, _) = ask(&mut w, &b, params(PILE, 0), T0_MS);
        if let Some(v) = w.cloud.registry_mut().vehicle_mut(&vid("veh-b")) {
            v.revoked = true;
        }
        let owner = w.owner_b.clone();
        let out = approve(&mut w, &owner, msg.correlation, true, T0_MS + 1_000);
        assert_eq!(kind(&out), &ReplyKind::Denied(DenyReason::Revoked));
    }

    #[test]
    fn too_many_held_requests_per_vehicle_are_refused() {
        let mut w = world(CloudSettings::default());
        let b = w.b.clone();
        for _ in 0..HELD_PER_VEHICLE {
            let (_, _, out) = ask(&mut w, &b, params(PILE, 0), T0_MS);
            assert!(matches!(kind(&out), ReplyKind::Pending { .. }));
        }
        let (_, _, out) = ask(&mut w, &b, params(PILE, 0), T0_MS);
        assert_eq!(kind(&out), &ReplyKind::Denied(DenyReason::BadRequest));
        assert_eq!(
            w.cloud.on_tick(T0_MS + 120_000, &mut w.rng).len(),
            HELD_PER_VEHICLE
        );
    }

    #[test]
    fn session_records_are_recorded_once() {
        let mut w = world(CloudSettings::default());
        let a = w.a.clone();
        let record = crate::cloud::exchange::tests::record("veh-a");
        let ev = exchange::seal_record(&record, &a, &mut w.rng).expect("sealed");
        let inbound = Inbound {
            topic: &ev.topic,
            correlation: Some(&ev.correlation),
            response_topic: None,
            payload: &ev.payload,
        };
        match &w.cloud.handle(inbound, T0_MS, &mut w.rng)[..] {
            [Output::Recorded(r)] => assert_eq!(r, &record),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            rejection(&w.cloud.handle(inbound, T0_MS, &mut w.rng)),
            &RejectReason::DuplicateRecord {
                record_id: record.record_id
            }
        );
        // Someone else's key, as veh-a.
        let impostor = VehicleKeys {
            own: KeyPair::generate(&mut w.rng),
            ..a
        };
        let mut other = record.clone();
        other.record_id = [0xEE; 16];
        let ev = exchange::seal_record(&other, &impostor, &mut w.rng).expect("sealed");
        let inbound = Inbound {
            topic: &ev.topic,
            correlation: Some(&ev.correlation),
            response_topic: None,
            payload: &ev.payload,
        };
        assert!(matches!(
            rejection(&w.cloud.handle(inbound, T0_MS, &mut w.rng)),
            RejectReason::Envelope(_)
        ));
    }

    #[test]
    fn pushes_reach_the_vehicle() {
        let mut w = world(CloudSettings::default());
        let a = w.a.clone();
        let out = w
            .cloud
            .push_vouchers(&vid("veh-a"), PILE, 3, T0_MS, &mut w.rng)
            .expect("push");
        let Output::Push { topic, payload, .. } = &out else {
            panic!("push")
        };
        let Ok(PushEvent::Vouchers { vouchers, .. }) = exchange::open_push(&a, topic, payload)
        else {
            panic!("vouchers");
        };
        assert_eq!(vouchers.len(), 3);
        assert!(
            vouchers
                .iter()
                .all(|v| v.voucher && v.charger_number == PILE)
        );

        let out = w
            .cloud
            .revoke(
                &vid("veh-a"),
                9,
                vec![vouchers[0].ticket_id()],
                T0_MS,
                &mut w.rng,
            )
            .expect("push");
        let Output::Push { topic, payload, .. } = &out else {
            panic!("push")
        };
        let Ok(PushEvent::Revocation(r)) = exchange::open_push(&a, topic, payload) else {
            panic!("revocation");
        };
        assert_eq!(
            (r.seq, r.issued_at, r.ticket_ids),
            (9, T0, vec![vouchers[0].ticket_id()])
        );

        assert!(matches!(
            w.cloud.revoke(&vid("veh-x"), 1, vec![], T0_MS, &mut w.rng),
            Err(ServiceError::UnknownVehicle(_))
        ));
        assert!(matches!(
            w.cloud
                .push_vouchers(&vid("veh-a"), 99, 1, T0_MS, &mut w.rng),
            Err(ServiceError::UnknownPile(99))
        ));
    }

    #[test]
    fn bounded_cache_evicts_the_oldest() {
        let mut b: Bounded<u8, ()> = Bounded::new(2);
        for k in [1, 2, 2, 3] {
            b.insert(k, ());
        }
        assert!(b.get(&1).is_none());
        assert!(b.get(&2).is_some() && b.get(&3).is_some());
    }
}
