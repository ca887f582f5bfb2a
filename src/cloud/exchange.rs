//! The vehicle's side of the identity exchange (`docs/protocol.md` §6.5),
//! sans-IO: it builds the sealed request and judges every answer, and the
//! shell moves the bytes and reads the clock.
//!
//! An answer is believed only if it opens under the vehicle's key from the
//! cloud's key (so the broker can neither read nor forge it), on the right
//! topic with the request's correlation data, names this vehicle, echoes this
//! request's nonce (so an old grant replayed is refused), and, for a grant,
//! holds a ticket for the pile asked about that has not yet expired. A grant
//! or a denial ends the exchange; anything after it is
//! [`ExchangeError::AlreadyFinished`], so a duplicate answer is ignored.
//! A refused answer changes nothing: the genuine one can still arrive.

use super::envelope::{self, EnvelopeError, KeyPair, PublicKey};
use super::messages::{
    CredentialMismatch, DenyReason, Event, Id16, IdentityGrant, IdentityRequest, MessageError,
    Payload, Push, Request, Response, Revocation, SessionRecord,
};
use super::topics::{self, VehicleId};
use crate::auth::{Credential, Rng};

/// What the vehicle needs to talk to the cloud end to end.
#[derive(Clone, Debug)]
pub struct VehicleKeys {
    pub vehicle_id: VehicleId,
    /// The vehicle's own X25519 key pair: answers are sealed to it, and it
    /// authenticates requests and events.
    pub own: KeyPair,
    /// The cloud's public key, from the vehicle's configuration.
    pub cloud: PublicKey,
}

/// What to ask for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExchangeParams {
    /// From the pile's CRM(0x00), bytes 2–5.
    pub charger_number: u32,
    /// From the pile's CRM(0x00), bytes 6–8.
    pub region_code: [u8; 3],
    /// Vouchers wanted with the grant (the cloud may give fewer).
    pub want_vouchers: u16,
}

/// The request to publish: QoS 1 on `topic`, with MQTT 5 Response Topic
/// `response_topic` and Correlation Data `correlation`. Publishing it again
/// (after a reconnect) is safe: the first answer wins.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutgoingRequest {
    pub topic: String,
    pub response_topic: String,
    pub correlation: Id16,
    pub payload: Vec<u8>,
}

/// A sealed event to publish at QoS 1 on `topic` with Correlation Data
/// `correlation` (the record id, which the envelope binds).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutgoingEvent {
    pub topic: String,
    pub correlation: Id16,
    pub payload: Vec<u8>,
}

/// An accepted grant.
#[derive(Clone, Debug)]
pub struct Grant {
    /// The online credential for the pile asked about.
    pub credential: Credential,
    /// Vouchers that came with it, for the wallet.
    pub vouchers: Vec<Credential>,
}

/// What an accepted answer means.
#[derive(Clone, Debug)]
pub enum ExchangeEvent {
    /// Final.
    Granted(Box<Grant>),
    /// Not final: the owner must approve; the answer comes by `deadline`
    /// (Unix seconds).
    PendingApproval { deadline: u32 },
    /// Final.
    Denied { reason: DenyReason, detail: String },
}

/// Why an answer (or push) was refused.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("the exchange already has its final answer; ignoring this one")]
    AlreadyFinished,
    #[error("answer on topic {found:?}, expected {expected:?}")]
    WrongTopic { expected: String, found: String },
    #[error("answer's correlation data does not match the request id")]
    WrongCorrelation,
    #[error("answer refused: {0}")]
    Envelope(#[from] EnvelopeError),
    #[error("answer refused: {0}")]
    Decode(#[from] MessageError),
    #[error("answer names vehicle {found}, not this vehicle ({expected})")]
    WrongVehicle {
        expected: VehicleId,
        found: VehicleId,
    },
    #[error("answer does not echo this request's nonce (a replayed old answer?)")]
    NonceMismatch,
    #[error("grant is for charger {found}, but the request was for charger {expected}")]
    WrongCharger { expected: u32, found: u32 },
    #[error("grant expired at {not_after}; it is {now} now")]
    Expired { not_after: u32, now: u32 },
    #[error("grant refused: {0}")]
    BadCredential(CredentialMismatch),
    #[error("voucher {index} refused: {source}")]
    BadVoucher {
        index: usize,
        #[source]
        source: CredentialMismatch,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Waiting,
    Pending { deadline: u32 },
    Finished,
}

/// One request for a grant and the checks on its answers.
#[derive(Debug)]
pub struct IdentityExchange {
    keys: VehicleKeys,
    params: ExchangeParams,
    request_id: Id16,
    nonce: Id16,
    response_topic: String,
    state: State,
}

/// Invariant for sealing what this module builds: topics from a
/// [`VehicleId`] are under 100 bytes, correlation data is 16 bytes, and the
/// request and a bounded record are far below the payload limit.
const SEALS: &str = "a request or bounded record always fits the envelope";

impl IdentityExchange {
    /// Build and seal the request. `now_unix` is the vehicle's clock; `rng`
    /// gives the request id, the nonce and the envelope's ephemeral key.
    pub fn start(
        params: ExchangeParams,
        keys: &VehicleKeys,
        now_unix: u32,
        rng: &mut dyn Rng,
    ) -> (IdentityExchange, OutgoingRequest) {
        let mut request_id = [0u8; 16];
        let mut nonce = [0u8; 16];
        rng.fill(&mut request_id);
        rng.fill(&mut nonce);
        let request = Request::Identity(IdentityRequest {
            vehicle_id: keys.vehicle_id.clone(),
            charger_number: params.charger_number,
            region_code: params.region_code,
            request_id,
            nonce,
            time: now_unix,
            want_vouchers: params.want_vouchers,
        });
        let topic = topics::identity_req(&keys.vehicle_id);
        let response_topic = topics::identity_resp(&keys.vehicle_id);
        let payload = envelope::seal(
            &keys.cloud,
            &keys.own,
            &topic,
            &request_id,
            &request.encode(),
            rng,
        )
        .expect(SEALS);
        let exchange = IdentityExchange {
            keys: keys.clone(),
            params,
            request_id,
            nonce,
            response_topic: response_topic.clone(),
            state: State::Waiting,
        };
        let out = OutgoingRequest {
            topic,
            response_topic,
            correlation: request_id,
            payload,
        };
        (exchange, out)
    }

    pub fn request_id(&self) -> &Id16 {
        &self.request_id
    }

    pub fn is_finished(&self) -> bool {
        self.state == State::Finished
    }

    /// The owner-approval deadline, once the cloud said it is waiting for it.
    pub fn approval_deadline(&self) -> Option<u32> {
        match self.state {
            State::Pending { deadline } => Some(deadline),
            _ => None,
        }
    }

    /// Judge an answer that arrived on `topic` with Correlation Data
    /// `correlation`. `now_unix` is the vehicle's clock.
    pub fn on_response(
        &mut self,
        topic: &str,
        correlation: &[u8],
        payload: &[u8],
        now_unix: u32,
    ) -> Result<ExchangeEvent, ExchangeError> {
        if self.state == State::Finished {
            return Err(ExchangeError::AlreadyFinished);
        }
        if topic != self.response_topic {
            return Err(ExchangeError::WrongTopic {
                expected: self.response_topic.clone(),
                found: topic.chars().take(100).collect(),
            });
        }
        if correlation != self.request_id {
            return Err(ExchangeError::WrongCorrelation);
        }
        let plain = envelope::open(
            self.keys.own.secret(),
            &self.keys.cloud,
            topic,
            correlation,
            payload,
        )?;
        let response = Response::decode(&plain)?;
        let (vehicle_id, request_nonce) = match &response {
            Response::Grant(g) => (&g.vehicle_id, &g.request_nonce),
            Response::Denied(d) => (&d.vehicle_id, &d.request_nonce),
            Response::Pending(p) => (&p.vehicle_id, &p.request_nonce),
        };
        self.check_vehicle(vehicle_id)?;
        if *request_nonce != self.nonce {
            return Err(ExchangeError::NonceMismatch);
        }
        let event = match response {
            Response::Grant(g) => ExchangeEvent::Granted(Box::new(self.check_grant(&g, now_unix)?)),
            Response::Denied(d) => ExchangeEvent::Denied {
                reason: d.reason,
                detail: d.detail,
            },
            Response::Pending(p) => {
                self.state = State::Pending {
                    deadline: p.deadline,
                };
                return Ok(ExchangeEvent::PendingApproval {
                    deadline: p.deadline,
                });
            }
        };
        self.state = State::Finished;
        Ok(event)
    }

    fn check_vehicle(&self, found: &VehicleId) -> Result<(), ExchangeError> {
        check_vehicle(&self.keys.vehicle_id, found)
    }

    fn check_grant(&self, g: &IdentityGrant, now_unix: u32) -> Result<Grant, ExchangeError> {
        if g.charger_number != self.params.charger_number {
            return Err(ExchangeError::WrongCharger {
                expected: self.params.charger_number,
                found: g.charger_number,
            });
        }
        let credential = g.credential().map_err(ExchangeError::BadCredential)?;
        if now_unix > credential.not_after {
            return Err(ExchangeError::Expired {
                not_after: credential.not_after,
                now: now_unix,
            });
        }
        let vouchers = match &g.vouchers {
            None => Vec::new(),
            Some(batch) => {
                self.check_vehicle(&batch.vehicle_id)?;
                batch
                    .credentials()
                    .map_err(|(index, source)| ExchangeError::BadVoucher { index, source })?
            }
        };
        Ok(Grant {
            credential,
            vouchers,
        })
    }
}

fn check_vehicle(expected: &VehicleId, found: &VehicleId) -> Result<(), ExchangeError> {
    if found != expected {
        return Err(ExchangeError::WrongVehicle {
            expected: expected.clone(),
            found: found.clone(),
        });
    }
    Ok(())
}

/// A checked push from the `vouchers` topic.
#[derive(Clone, Debug)]
pub enum PushEvent {
    /// Vouchers for the wallet.
    Vouchers {
        batch_id: Id16,
        issued_at: u32,
        vouchers: Vec<Credential>,
    },
    /// Tickets the vehicle must no longer use.
    Revocation(Revocation),
}

/// Open and check a push that arrived on `topic` (it must be this vehicle's
/// `vouchers` topic; pushes carry no correlation data).
pub fn open_push(
    keys: &VehicleKeys,
    topic: &str,
    payload: &[u8],
) -> Result<PushEvent, ExchangeError> {
    let expected = topics::vouchers(&keys.vehicle_id);
    if topic != expected {
        return Err(ExchangeError::WrongTopic {
            expected,
            found: topic.chars().take(100).collect(),
        });
    }
    let plain = envelope::open(keys.own.secret(), &keys.cloud, topic, &[], payload)?;
    match Push::decode(&plain)? {
        Push::Vouchers(batch) => {
            check_vehicle(&keys.vehicle_id, &batch.vehicle_id)?;
            let vouchers = batch
                .credentials()
                .map_err(|(index, source)| ExchangeError::BadVoucher { index, source })?;
            Ok(PushEvent::Vouchers {
                batch_id: batch.batch_id,
                issued_at: batch.issued_at,
                vouchers,
            })
        }
        Push::Revocation(r) => {
            check_vehicle(&keys.vehicle_id, &r.vehicle_id)?;
            Ok(PushEvent::Revocation(r))
        }
    }
}

/// Seal a session record for the `events` topic. The record must name this
/// vehicle; its `record_id` becomes the correlation data.
pub fn seal_record(
    record: &SessionRecord,
    keys: &VehicleKeys,
    rng: &mut dyn Rng,
) -> Result<OutgoingEvent, ExchangeError> {
    check_vehicle(&keys.vehicle_id, &record.vehicle_id)?;
    let event = Event::SessionRecord(record.clone());
    event.check()?;
    let topic = topics::events(&keys.vehicle_id);
    let payload = envelope::seal(
        &keys.cloud,
        &keys.own,
        &topic,
        &record.record_id,
        &event.encode(),
        rng,
    )?;
    Ok(OutgoingEvent {
        topic,
        correlation: record.record_id,
        payload,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::auth::RootKey;
    use crate::auth::rng::StreamRng;
    use crate::cloud::messages::{
        CredentialKind, Denied, PendingApproval, SessionResult, UsedCredential, Voucher,
        VoucherBatch,
    };

    const NOW: u32 = 1_760_000_000;
    const CHARGER: u32 = 123_456;

    struct World {
        cloud: KeyPair,
        vehicle: VehicleKeys,
        /// Has broker access and its own key pair, but not the cloud's key.
        intruder: KeyPair,
        rng: StreamRng,
    }

    fn vid(s: &str) -> VehicleId {
        VehicleId::parse(s).expect("valid id")
    }

    fn world() -> World {
        let mut rng = StreamRng::new(42);
        let cloud = KeyPair::generate(&mut rng);
        let vehicle = VehicleKeys {
            vehicle_id: vid("veh-a"),
            own: KeyPair::generate(&mut rng),
            cloud: *cloud.public(),
        };
        let intruder = KeyPair::generate(&mut rng);
        World {
            cloud,
            vehicle,
            intruder,
            rng,
        }
    }

    fn params() -> ExchangeParams {
        ExchangeParams {
            charger_number: CHARGER,
            region_code: [0x31, 0x32, 0x33],
            want_vouchers: 1,
        }
    }

    fn credential(w: &mut World, charger: u32, not_after: u32, voucher: bool) -> Credential {
        Credential::issue(
            &RootKey::from_bytes([9; 32]),
            1,
            charger,
            [1; 16],
            NOW - 10,
            not_after,
            0,
            voucher,
            &mut w.rng,
        )
    }

    /// What the cloud would see: the request, opened with its key.
    fn cloud_reads(w: &World, out: &OutgoingRequest) -> IdentityRequest {
        let plain = envelope::open(
            w.cloud.secret(),
            w.vehicle.own.public(),
            &out.topic,
            &out.correlation,
            &out.payload,
        )
        .expect("the cloud opens the request");
        let Request::Identity(r) = Request::decode(&plain).expect("decodes");
        r
    }

    fn seal_response(
        w: &mut World,
        sender: &KeyPair,
        topic: &str,
        corr: &[u8],
        r: &Response,
    ) -> Vec<u8> {
        envelope::seal(
            w.vehicle.own.public(),
            sender,
            topic,
            corr,
            &r.encode(),
            &mut w.rng,
        )
        .expect("sealed")
    }

    fn grant_for(
        w: &mut World,
        req: &IdentityRequest,
        vehicle: &str,
        charger: u32,
        not_after: u32,
    ) -> Response {
        let online = credential(w, charger, not_after, false);
        let voucher = credential(w, charger, NOW + 86_400, true);
        Response::Grant(IdentityGrant::new(
            vid(vehicle),
            req.nonce,
            &online,
            Some(VoucherBatch {
                vehicle_id: vid(vehicle),
                batch_id: [2; 16],
                issued_at: NOW,
                vouchers: vec![Voucher::from_credential(&voucher)],
            }),
        ))
    }

    fn started(w: &mut World) -> (IdentityExchange, OutgoingRequest, IdentityRequest) {
        let (ex, out) = IdentityExchange::start(params(), &w.vehicle.clone(), NOW, &mut w.rng);
        let req = cloud_reads(w, &out);
        (ex, out, req)
    }

    #[test]
    fn request_is_sealed_for_the_cloud_and_names_the_pile() {
        let mut w = world();
        let (ex, out, req) = started(&mut w);
        assert_eq!(out.topic, "bmsgw/v1/veh-a/identity/req");
        assert_eq!(out.response_topic, "bmsgw/v1/veh-a/identity/resp");
        assert_eq!(&out.correlation, ex.request_id());
        assert_eq!(req.request_id, out.correlation);
        assert_eq!(req.vehicle_id, vid("veh-a"));
        assert_eq!(
            (
                req.charger_number,
                req.region_code,
                req.time,
                req.want_vouchers
            ),
            (CHARGER, [0x31, 0x32, 0x33], NOW, 1)
        );
        assert_ne!(req.nonce, req.request_id);
        // The broker (or anyone without the cloud's key) cannot read it.
        assert!(
            envelope::open(
                w.intruder.secret(),
                w.vehicle.own.public(),
                &out.topic,
                &out.correlation,
                &out.payload
            )
            .is_err()
        );
    }

    #[test]
    fn grant_is_accepted_once_and_duplicates_are_ignored() {
        let mut w = world();
        let (mut ex, out, req) = started(&mut w);
        let grant = grant_for(&mut w, &req, "veh-a", CHARGER, NOW + 300);
        let Response::Grant(g) = &grant else {
            unreachable!()
        };
        let (ticket, key) = (g.ticket, *g.session_key.expose());
        let cloud = w.cloud.clone();
        let wire = seal_response(
            &mut w,
            &cloud,
            &out.response_topic,
            &out.correlation,
            &grant,
        );
        let ev = ex
            .on_response(&out.response_topic, &out.correlation, &wire, NOW)
            .expect("accepted");
        let ExchangeEvent::Granted(got) = ev else {
            panic!("{ev:?}")
        };
        assert_eq!(got.credential.ticket, ticket);
        assert_eq!(got.credential.session_key.expose(), &key);
        assert!(!got.credential.voucher);
        assert_eq!(got.vouchers.len(), 1);
        assert!(got.vouchers[0].voucher);
        assert!(ex.is_finished());
        assert!(matches!(
            ex.on_response(&out.response_topic, &out.correlation, &wire, NOW),
            Err(ExchangeError::AlreadyFinished)
        ));
    }

    #[test]
    fn pending_is_not_final_and_denied_is() {
        let mut w = world();
        let (mut ex, out, req) = started(&mut w);
        let cloud = w.cloud.clone();
        let pending = Response::Pending(PendingApproval {
            vehicle_id: vid("veh-a"),
            request_nonce: req.nonce,
            deadline: NOW + 120,
        });
        let wire = seal_response(
            &mut w,
            &cloud,
            &out.response_topic,
            &out.correlation,
            &pending,
        );
        let ev = ex
            .on_response(&out.response_topic, &out.correlation, &wire, NOW)
            .expect("accepted");
        assert!(matches!(ev, ExchangeEvent::PendingApproval { deadline } if deadline == NOW + 120));
        assert_eq!(ex.approval_deadline(), Some(NOW + 120));
        assert!(!ex.is_finished());
        let denied = Response::Denied(Denied {
            vehicle_id: vid("veh-a"),
            request_nonce: req.nonce,
            reason: DenyReason::ApprovalDenied,
            detail: "owner said no".into(),
        });
        let wire = seal_response(
            &mut w,
            &cloud,
            &out.response_topic,
            &out.correlation,
            &denied,
        );
        let ev = ex
            .on_response(&out.response_topic, &out.correlation, &wire, NOW + 5)
            .expect("accepted");
        assert!(
            matches!(ev, ExchangeEvent::Denied { reason: DenyReason::ApprovalDenied, ref detail } if detail == "owner said no")
        );
        assert!(ex.is_finished());
        let grant = grant_for(&mut w, &req, "veh-a", CHARGER, NOW + 300);
        let wire = seal_response(
            &mut w,
            &cloud,
            &out.response_topic,
            &out.correlation,
            &grant,
        );
        assert!(matches!(
            ex.on_response(&out.response_topic, &out.correlation, &wire, NOW),
            Err(ExchangeError::AlreadyFinished)
        ));
    }

    #[test]
    fn a_grant_forged_without_the_cloud_key_is_refused() {
        let mut w = world();
        let (mut ex, out, req) = started(&mut w);
        // The intruder saw the request's topic and correlation data on the
        // broker and knows the vehicle's public key, but not the cloud's
        // secret key. (It cannot read the nonce either; here it even has it.)
        let forged = grant_for(&mut w, &req, "veh-a", CHARGER, NOW + 300);
        let intruder = w.intruder.clone();
        let wire = seal_response(
            &mut w,
            &intruder,
            &out.response_topic,
            &out.correlation,
            &forged,
        );
        assert!(matches!(
            ex.on_response(&out.response_topic, &out.correlation, &wire, NOW),
            Err(ExchangeError::Envelope(EnvelopeError::AuthenticationFailed))
        ));
        // Refusing it changed nothing: the genuine grant is still accepted.
        let cloud = w.cloud.clone();
        let genuine = grant_for(&mut w, &req, "veh-a", CHARGER, NOW + 300);
        let wire = seal_response(
            &mut w,
            &cloud,
            &out.response_topic,
            &out.correlation,
            &genuine,
        );
        assert!(matches!(
            ex.on_response(&out.response_topic, &out.correlation, &wire, NOW),
            Ok(ExchangeEvent::Granted(_))
        ));
    }

    #[test]
    fn a_grant_for_another_vehicle_is_refused() {
        let mut w = world();
        let (mut ex, out, req) = started(&mut w);
        let cloud = w.cloud.clone();
        // B's genuine grant, moved by the broker onto A's topic: sealed to
        // B's key and bound to B's topic, it does not open for A.
        let b = KeyPair::generate(&mut w.rng);
        let for_b = grant_for(&mut w, &req, "veh-b", CHARGER, NOW + 300);
        let wire = envelope::seal(
            b.public(),
            &cloud,
            "bmsgw/v1/veh-b/identity/resp",
            &out.correlation,
            &for_b.encode(),
            &mut w.rng,
        )
        .expect("sealed");
        assert!(matches!(
            ex.on_response(&out.response_topic, &out.correlation, &wire, NOW),
            Err(ExchangeError::Envelope(EnvelopeError::AuthenticationFailed))
        ));
        // Sealed to A but naming B (a cloud mix-up): refused too.
        let wire = seal_response(
            &mut w,
            &cloud,
            &out.response_topic,
            &out.correlation,
            &for_b,
        );
        let err = ex
            .on_response(&out.response_topic, &out.correlation, &wire, NOW)
            .expect_err("wrong vehicle");
        assert!(
            matches!(err, ExchangeError::WrongVehicle { ref found, .. } if found.as_str() == "veh-b"),
            "{err}"
        );
        // A grant whose voucher batch names B.
        let Response::Grant(mut g) = grant_for(&mut w, &req, "veh-a", CHARGER, NOW + 300) else {
            unreachable!()
        };
        if let Some(batch) = g.vouchers.as_mut() {
            batch.vehicle_id = vid("veh-b");
        }
        let wire = seal_response(
            &mut w,
            &cloud,
            &out.response_topic,
            &out.correlation,
            &Response::Grant(g),
        );
        assert!(matches!(
            ex.on_response(&out.response_topic, &out.correlation, &wire, NOW),
            Err(ExchangeError::WrongVehicle { .. })
        ));
        assert!(!ex.is_finished());
    }

    #[test]
    fn a_replayed_old_grant_is_refused() {
        let mut w = world();
        let cloud = w.cloud.clone();
        // An earlier exchange and its genuine grant, recorded by the broker.
        let (mut old, old_out, old_req) = started(&mut w);
        let old_grant = grant_for(&mut w, &old_req, "veh-a", CHARGER, NOW + 300);
        let old_wire = seal_response(
            &mut w,
            &cloud,
            &old_out.response_topic,
            &old_out.correlation,
            &old_grant,
        );
        assert!(
            old.on_response(
                &old_out.response_topic,
                &old_out.correlation,
                &old_wire,
                NOW
            )
            .is_ok()
        );

        let (mut ex, out, _req) = started(&mut w);
        // Replayed as it was: wrong correlation data.
        assert!(matches!(
            ex.on_response(
                &out.response_topic,
                &old_out.correlation,
                &old_wire,
                NOW + 60
            ),
            Err(ExchangeError::WrongCorrelation)
        ));
        // With the new correlation data swapped in: the envelope binds it.
        assert!(matches!(
            ex.on_response(&out.response_topic, &out.correlation, &old_wire, NOW + 60),
            Err(ExchangeError::Envelope(EnvelopeError::AuthenticationFailed))
        ));
        // Even resealed by the cloud for the new request (say, a cloud bug
        // answering from a cache), the old nonce gives it away.
        let wire = seal_response(
            &mut w,
            &cloud,
            &out.response_topic,
            &out.correlation,
            &old_grant,
        );
        assert!(matches!(
            ex.on_response(&out.response_topic, &out.correlation, &wire, NOW + 60),
            Err(ExchangeError::NonceMismatch)
        ));
        assert!(!ex.is_finished());
    }

    #[test]
    fn grant_checks_topic_correlation_charger_and_expiry() {
        let mut w = world();
        let cloud = w.cloud.clone();
        let (mut ex, out, req) = started(&mut w);
        let grant = grant_for(&mut w, &req, "veh-a", CHARGER, NOW + 300);
        let wire = seal_response(
            &mut w,
            &cloud,
            &out.response_topic,
            &out.correlation,
            &grant,
        );
        assert!(matches!(
            ex.on_response("bmsgw/v1/veh-a/vouchers", &out.correlation, &wire, NOW),
            Err(ExchangeError::WrongTopic { .. })
        ));
        assert!(matches!(
            ex.on_response(&out.response_topic, &[0; 16], &wire, NOW),
            Err(ExchangeError::WrongCorrelation)
        ));
        assert!(matches!(
            ex.on_response(&out.response_topic, &[], &wire, NOW),
            Err(ExchangeError::WrongCorrelation)
        ));

        let other_pile = grant_for(&mut w, &req, "veh-a", CHARGER + 1, NOW + 300);
        let wire_other = seal_response(
            &mut w,
            &cloud,
            &out.response_topic,
            &out.correlation,
            &other_pile,
        );
        assert!(matches!(
            ex.on_response(&out.response_topic, &out.correlation, &wire_other, NOW),
            Err(ExchangeError::WrongCharger { expected: CHARGER, found }) if found == CHARGER + 1
        ));

        let expired = grant_for(&mut w, &req, "veh-a", CHARGER, NOW - 1);
        let wire_expired = seal_response(
            &mut w,
            &cloud,
            &out.response_topic,
            &out.correlation,
            &expired,
        );
        assert!(matches!(
            ex.on_response(&out.response_topic, &out.correlation, &wire_expired, NOW),
            Err(ExchangeError::Expired { not_after, now: NOW }) if not_after == NOW - 1
        ));

        // The grant's fields must agree with its ticket's header.
        let Response::Grant(mut lying) = grant_for(&mut w, &req, "veh-a", CHARGER, NOW + 300)
        else {
            unreachable!()
        };
        lying.ticket[4] ^= 1;
        let wire_lying = seal_response(
            &mut w,
            &cloud,
            &out.response_topic,
            &out.correlation,
            &Response::Grant(lying),
        );
        assert!(matches!(
            ex.on_response(&out.response_topic, &out.correlation, &wire_lying, NOW),
            Err(ExchangeError::BadCredential(
                CredentialMismatch::Charger { .. }
            ))
        ));

        // Garbage inside a genuine envelope.
        let junk = envelope::seal(
            w.vehicle.own.public(),
            &cloud,
            &out.response_topic,
            &out.correlation,
            b"\xa0",
            &mut w.rng,
        )
        .expect("sealed");
        assert!(matches!(
            ex.on_response(&out.response_topic, &out.correlation, &junk, NOW),
            Err(ExchangeError::Decode(_))
        ));

        // None of that ended the exchange.
        assert!(matches!(
            ex.on_response(&out.response_topic, &out.correlation, &wire, NOW + 299),
            Ok(ExchangeEvent::Granted(_))
        ));
    }

    #[test]
    fn pushes_are_opened_and_checked() {
        let mut w = world();
        let cloud = w.cloud.clone();
        let topic = topics::vouchers(&w.vehicle.vehicle_id);
        let v = credential(&mut w, CHARGER, NOW + 86_400, true);
        let batch = Push::Vouchers(VoucherBatch {
            vehicle_id: vid("veh-a"),
            batch_id: [3; 16],
            issued_at: NOW,
            vouchers: vec![Voucher::from_credential(&v)],
        });
        let wire = envelope::seal(
            w.vehicle.own.public(),
            &cloud,
            &topic,
            &[],
            &batch.encode(),
            &mut w.rng,
        )
        .expect("sealed");
        let Ok(PushEvent::Vouchers {
            batch_id, vouchers, ..
        }) = open_push(&w.vehicle, &topic, &wire)
        else {
            panic!("vouchers");
        };
        assert_eq!(batch_id, [3; 16]);
        assert_eq!(vouchers[0].ticket_id(), v.ticket_id());
        assert!(matches!(
            open_push(&w.vehicle, "bmsgw/v1/veh-b/vouchers", &wire),
            Err(ExchangeError::WrongTopic { .. })
        ));

        let rev = Push::Revocation(Revocation {
            vehicle_id: vid("veh-a"),
            seq: 4,
            issued_at: NOW,
            ticket_ids: vec![v.ticket_id()],
        });
        let wire = envelope::seal(
            w.vehicle.own.public(),
            &cloud,
            &topic,
            &[],
            &rev.encode(),
            &mut w.rng,
        )
        .expect("sealed");
        let Ok(PushEvent::Revocation(r)) = open_push(&w.vehicle, &topic, &wire) else {
            panic!("revocation");
        };
        assert_eq!((r.seq, r.ticket_ids), (4, vec![v.ticket_id()]));

        let intruder = w.intruder.clone();
        let forged = envelope::seal(
            w.vehicle.own.public(),
            &intruder,
            &topic,
            &[],
            &rev.encode(),
            &mut w.rng,
        )
        .expect("sealed");
        assert!(matches!(
            open_push(&w.vehicle, &topic, &forged),
            Err(ExchangeError::Envelope(_))
        ));
        let Push::Revocation(mut other) = rev else {
            unreachable!()
        };
        other.vehicle_id = vid("veh-b");
        let wire = envelope::seal(
            w.vehicle.own.public(),
            &cloud,
            &topic,
            &[],
            &Push::Revocation(other).encode(),
            &mut w.rng,
        )
        .expect("sealed");
        assert!(matches!(
            open_push(&w.vehicle, &topic, &wire),
            Err(ExchangeError::WrongVehicle { .. })
        ));
    }

    pub(crate) fn record(vehicle: &str) -> SessionRecord {
        SessionRecord {
            record_id: [5; 16],
            vehicle_id: vid(vehicle),
            charger_number: CHARGER,
            credential: UsedCredential {
                kind: CredentialKind::Online,
                ticket_id: [6; 12],
            },
            energy_wh: 12_000,
            started_at: NOW,
            stopped_at: NOW + 1800,
            result: SessionResult::Completed,
            deviations: Default::default(),
        }
    }

    #[test]
    fn records_are_sealed_for_the_cloud() {
        let mut w = world();
        let out = seal_record(&record("veh-a"), &w.vehicle, &mut w.rng).expect("sealed");
        assert_eq!(out.topic, "bmsgw/v1/veh-a/events");
        assert_eq!(out.correlation, [5; 16]);
        let plain = envelope::open(
            w.cloud.secret(),
            w.vehicle.own.public(),
            &out.topic,
            &out.correlation,
            &out.payload,
        )
        .expect("the cloud opens it");
        let Event::SessionRecord(r) = Event::decode(&plain).expect("decodes");
        assert_eq!(r, record("veh-a"));
        assert!(matches!(
            seal_record(&record("veh-b"), &w.vehicle, &mut w.rng),
            Err(ExchangeError::WrongVehicle { .. })
        ));
        let mut long = record("veh-a");
        long.result = SessionResult::Failed {
            reason: "x".repeat(10_000),
        };
        assert!(matches!(
            seal_record(&long, &w.vehicle, &mut w.rng),
            Err(ExchangeError::Decode(MessageError::TextTooLong { .. }))
        ));
    }

    /// The inputs of the §6.7 vectors: `xx..yy` byte runs.
    fn seq(start: u8, len: u8) -> Vec<u8> {
        (0..len).map(|i| start.wrapping_add(i)).collect()
    }

    fn key32(start: u8) -> [u8; 32] {
        seq(start, 32).try_into().expect("32 bytes")
    }

    /// docs/protocol.md §6.7, in its order: the two public keys, the request
    /// (CBOR, envelope) and the grant (CBOR, envelope).
    fn vector_run() -> [String; 6] {
        use crate::auth::rng::ScriptedRng;
        use crate::cloud::envelope::SecretKey;
        use zeroize::Zeroizing;

        let vehicle = KeyPair::from_secret(SecretKey::from_bytes(Zeroizing::new(key32(0xc0))));
        let cloud = KeyPair::from_secret(SecretKey::from_bytes(Zeroizing::new(key32(0xe0))));
        let keys = VehicleKeys {
            vehicle_id: vid("veh-a"),
            own: vehicle.clone(),
            cloud: *cloud.public(),
        };
        // request_id, nonce, then the envelope's ephemeral key seed.
        let mut rng = ScriptedRng::new(&[&seq(0x00, 16), &seq(0x10, 16), &seq(0x20, 32)]);
        let params = ExchangeParams {
            charger_number: 123_456,
            region_code: *b"110",
            want_vouchers: 0,
        };
        let (mut ex, req) = IdentityExchange::start(params, &keys, 1_760_000_000, &mut rng);
        let request_cbor = envelope::open(
            cloud.secret(),
            vehicle.public(),
            &req.topic,
            &req.correlation,
            &req.payload,
        )
        .expect("the cloud opens the request");

        // The §4.7 ticket: its session key, then its ticket id.
        let mut rng = ScriptedRng::new(&[&seq(0x20, 32), &seq(0xa0, 12)]);
        let credential = Credential::issue(
            &RootKey::from_bytes(key32(0x00)),
            7,
            123_456,
            seq(0xc0, 16).try_into().expect("16 bytes"),
            1_760_000_000,
            1_760_003_600,
            30_000,
            false,
            &mut rng,
        );
        let grant = Response::Grant(IdentityGrant::new(
            vid("veh-a"),
            req_nonce(),
            &credential,
            None,
        ));
        let grant_cbor = grant.encode();
        let mut rng = ScriptedRng::new(&[&seq(0x80, 32)]);
        let grant_wire = envelope::seal(
            vehicle.public(),
            &cloud,
            &req.response_topic,
            &req.correlation,
            &grant_cbor,
            &mut rng,
        )
        .expect("sealed");
        // The vectors are a valid exchange.
        let Ok(ExchangeEvent::Granted(g)) = ex.on_response(
            &req.response_topic,
            &req.correlation,
            &grant_wire,
            1_760_000_100,
        ) else {
            panic!("the vector grant is accepted");
        };
        assert_eq!(g.credential.session_key.expose(), &key32(0x20));
        [
            vehicle.public().to_hex(),
            cloud.public().to_hex(),
            hex::encode(&request_cbor[..]),
            hex::encode(&req.payload),
            hex::encode(&grant_cbor[..]),
            hex::encode(&grant_wire),
        ]
    }

    fn req_nonce() -> Id16 {
        seq(0x10, 16).try_into().expect("16 bytes")
    }

    /// §6.7: vehicle and cloud public keys, the request (CBOR, sealed), the
    /// grant (CBOR, sealed).
    const VECTORS: [&str; 6] = [
        "dc2cca31e8e43bbd91dff7e475cca3347eb478107d5bd765aba4ae4a30c35d44",
        "736845d54e87de09d6bb114aa7042c50a4a015bd9901d1a0026f5956533a1519",
        concat!(
            "a86474797065706964656e746974795f726571756573746a76656869636c655f",
            "6964657665682d616e636861726765725f6e756d6265721a0001e2406b726567",
            "696f6e5f636f6465433131306a726571756573745f6964500001020304050607",
            "08090a0b0c0d0e0f656e6f6e636550101112131415161718191a1b1c1d1e1f64",
            "74696d651a68e778006d77616e745f766f75636865727300",
        ),
        concat!(
            "01693658254630f73ad8da78fb331bf976cd42f90e0e9c9e83f40c51072a6f74",
            "172d923b03917a585047d3fe04d519f80af78d466ae4b5730d55358c5feb1b07",
            "4d6f23b239ae43113aabee9d80d97cbf82727a873721fa10bf22e2d07e7cd70e",
            "64b1343e3cd8231101e543413d3fb16c3d678e747b59e4fe11ecd5e47f514feb",
            "4a247086d87e656a82be61d27f9bbe772614b6eab460bed0f724b82c64465ceb",
            "f7ead6772daf8241a46f583c2b47669d1e916cd71d9b8df485dfe7b24c20c3c4",
            "86fdb263563b13dca0",
        ),
        concat!(
            "a96474797065656772616e746a76656869636c655f6964657665682d616d7265",
            "71756573745f6e6f6e636550101112131415161718191a1b1c1d1e1f66746963",
            "6b657458650100070040e20100a0a1a2a3a4a5a6a7a8a9aaabc48ebde2448070",
            "e257c7f20caa0fc7c93f68b21e3d6d02c7799dc368308d1f8e73df03cb9b7cd1",
            "01f6b342adea3a39b859f5a85c61cdd490c9c48b7f5386ea73fd0c5b38caf560",
            "1381cfbe1b69e460ef7d6b73657373696f6e5f6b657958202021222324252627",
            "28292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f6e63686172676572",
            "5f6e756d6265721a0001e2406a6e6f745f6265666f72651a68e77800696e6f74",
            "5f61667465721a68e786106d656e657267795f6361705f7768197530",
        ),
        concat!(
            "017af03df159e2d75751c1a88eb5a9e87988f138dce7596ebda3ad7f0bb04a87",
            "346371677c2508fee323b8f9a27ec683d6d26572a14c87440b15fd6521dd8052",
            "8127fa406b0c447d353cb0502f3391ad1bf1c415050df0801f46f733609172f0",
            "43e9a54be7b3a374296704981f0e1c617d6eec785fa22cc1902e37d3f0476cf7",
            "ba4243fa910ff9d8fbe71ecc986d6065bce0921d9a2b66efabf334d09e2952ee",
            "67a38f0248f2db82629b05659e250c359df1032977aacd8ab3e6b3bda9244858",
            "c936e5657f6b9fedc2e8f5f3959708887173d0834ea84e12f7fca90499f5987a",
            "e508fb841abcbcb40c09a469e6d02f292d6c059dc6b209aa9697b53ccf5d3e3f",
            "d4d640565971246ae386ffdbb88e6d7a6ce1bb963adf7f981f3b1c819737a6b9",
            "da8f2acae5a95ceb1ac1905cd5163ab7e5da100e86c51598caeaa72367c2e6b5",
            "aa401d65c59bfe05bf2e7415b9",
        ),
    ];

    #[test]
    fn golden_vectors() {
        assert_eq!(vector_run(), VECTORS.map(String::from));
        // The grant carries exactly the ticket of §4.7.
        assert!(VECTORS[4].contains(concat!(
            "0100070040e20100a0a1a2a3a4a5a6a7a8a9aaabc48ebde2448070e257c7f20c",
            "aa0fc7c93f68b21e3d6d02c7799dc368308d1f8e73df03cb9b7cd101f6b342ad",
        )));
    }

    /// docs/protocol.md §6.7 prints the same vectors.
    #[test]
    fn golden_vectors_are_the_ones_in_the_spec() {
        let spec = include_str!("../../docs/protocol.md");
        let section = spec
            .split_once("### 6.7 Test vectors")
            .expect("protocol.md has section 6.7")
            .1;
        // Code blocks, their lines joined.
        let blocks: Vec<String> = section
            .split("```")
            .skip(1)
            .step_by(2)
            .map(|b| b.lines().map(str::trim).collect())
            .collect();
        for vector in VECTORS {
            assert!(
                blocks.iter().any(|b| b == vector),
                "{vector} is not in §6.7"
            );
        }
    }
}
