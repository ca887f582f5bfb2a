//! Vehicle against pile, pumped in memory.

use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::auth::credential::{Credential, MemoryWallet, VoucherWallet, from_hex, to_hex};
use crate::auth::keys::{PileKeys, RootKey, SessionKey, ticket_key};
use crate::auth::messages::{AuthMessage, MessageType, ResultCode};
use crate::auth::replay::{MemoryReplayStore, ReplayCache};
use crate::auth::rng::{ScriptedRng, StreamRng};
use crate::auth::ticket::{self, TicketBody};
use crate::time::Timestamp;

const CHARGER: u32 = 123_456;
const OFFSET: u16 = 7;
const NOW: u32 = 1_760_000_000;
const T0: Timestamp = Timestamp::from_millis(1_000);

fn root() -> RootKey {
    RootKey::from_bytes([0x42; 32])
}

fn pile_keys() -> PileKeys {
    PileKeys {
        root: root(),
        charger_number: CHARGER,
        current_offset: OFFSET,
        previous_offset: Some(OFFSET - 1),
    }
}

struct Issue {
    charger: u32,
    offset: u16,
    not_before: u32,
    not_after: u32,
    voucher: bool,
    seed: u64,
}

impl Default for Issue {
    fn default() -> Self {
        Issue {
            charger: CHARGER,
            offset: OFFSET,
            not_before: NOW - 60,
            not_after: NOW + 600,
            voucher: false,
            seed: 1,
        }
    }
}

impl Issue {
    fn credential(&self) -> Credential {
        Credential::issue(
            &root(),
            self.offset,
            self.charger,
            [0x5e; 16],
            self.not_before,
            self.not_after,
            22_000,
            self.voucher,
            &mut StreamRng::new(self.seed),
        )
    }
}

fn credential() -> Credential {
    Issue::default().credential()
}

fn vehicle(credential: Credential, seed: u64) -> VehicleAuth {
    VehicleAuth::new(
        credential,
        VehicleAuthConfig::default(),
        Box::new(StreamRng::new(1000 + seed)),
    )
}

fn pile_on(
    keys: PileKeys,
    config: PileAuthConfig,
    store: &MemoryReplayStore,
    seed: u64,
) -> PileAuth {
    let replay = ReplayCache::open(Box::new(store.clone()), config.replay_capacity)
        .expect("memory store opens");
    PileAuth::new(keys, config, replay, Box::new(StreamRng::new(2000 + seed)))
}

fn pile() -> PileAuth {
    pile_on(
        pile_keys(),
        PileAuthConfig::default(),
        &MemoryReplayStore::default(),
        0,
    )
}

/// Everything a pump moved, and the events.
#[derive(Default)]
struct Run {
    to_pile: Vec<Vec<u8>>,
    to_vehicle: Vec<Vec<u8>>,
    vehicle_events: Vec<VehicleAuthEvent>,
    pile_events: Vec<PileAuthEvent>,
}

/// Move messages both ways until both sides are quiet.
fn pump(v: &mut VehicleAuth, p: &mut PileAuth, now: Timestamp, unix_now: u32) -> Run {
    let mut run = Run::default();
    loop {
        let mut moved = false;
        while let Some(m) = v.poll_transmit() {
            p.handle_message(&m, now, unix_now);
            run.to_pile.push(m);
            moved = true;
        }
        while let Some(m) = p.poll_transmit() {
            v.handle_message(&m, now);
            run.to_vehicle.push(m);
            moved = true;
        }
        if !moved {
            break;
        }
    }
    run.vehicle_events
        .extend(std::iter::from_fn(|| v.poll_event()));
    run.pile_events
        .extend(std::iter::from_fn(|| p.poll_event()));
    run
}

fn authenticate(credential: Credential, p: &mut PileAuth, unix_now: u32) -> Run {
    let mut v = vehicle(credential, 0);
    v.start(T0);
    pump(&mut v, p, T0, unix_now)
}

/// The code of a refused attempt, checked on both sides: the pile's event,
/// the plain AuthResult on the wire and the vehicle's event.
fn refused(credential: Credential, p: &mut PileAuth, unix_now: u32) -> ResultCode {
    let run = authenticate(credential, p, unix_now);
    let [PileAuthEvent::Rejected(code)] = run.pile_events[..] else {
        panic!("pile events {:?}", run.pile_events);
    };
    assert_eq!(run.to_vehicle, vec![vec![0x04, code.as_u8()]]);
    assert_eq!(run.vehicle_events, vec![VehicleAuthEvent::Rejected(code)]);
    code
}

#[test]
fn vehicle_and_pile_authenticate_and_share_a_channel() {
    let mut p = pile();
    let mut v = vehicle(credential(), 0);
    v.start(T0);
    // The first retransmission is due before the deadline.
    assert_eq!(v.poll_timeout(), Some(T0 + Duration::from_millis(300)));
    let run = pump(&mut v, &mut p, T0, NOW);
    assert_eq!(run.vehicle_events, vec![VehicleAuthEvent::Accepted]);
    let expected = AcceptedTicket {
        pseudonym: [0x5e; 16],
        energy_cap_wh: 22_000,
        voucher: false,
        not_after: NOW + 600,
        ticket_id: credential().ticket_id(),
        key_offset: OFFSET,
    };
    assert_eq!(
        run.pile_events,
        vec![PileAuthEvent::Accepted(expected.clone())]
    );
    let sizes: Vec<usize> = run
        .to_pile
        .iter()
        .chain(&run.to_vehicle)
        .map(Vec::len)
        .collect();
    assert_eq!(sizes, vec![150, 46, 65, 19]);
    assert_eq!(p.accepted(), Some(&expected));
    assert!(v.is_finished());
    assert_eq!((v.poll_timeout(), p.poll_timeout()), (None, None));

    // The transport keys live on, both ways.
    let sealed = v
        .channel()
        .expect("channel")
        .seal(b"energy report")
        .expect("seals");
    assert_eq!(
        &p.channel().expect("channel").open(&sealed).expect("opens")[..],
        b"energy report"
    );
    let sealed = p.channel().expect("channel").seal(b"stop").expect("seals");
    assert_eq!(
        &v.channel().expect("channel").open(&sealed).expect("opens")[..],
        b"stop"
    );
    let mut forged = p.channel().expect("channel").seal(b"x").expect("seals");
    forged[0] ^= 1;
    assert!(v.channel().expect("channel").open(&forged).is_err());
}

#[test]
fn replayed_request_is_refused_also_after_a_pile_restart() {
    let store = MemoryReplayStore::default();
    let mut p = pile_on(pile_keys(), PileAuthConfig::default(), &store, 0);
    let run = authenticate(credential(), &mut p, NOW);
    assert_eq!(run.vehicle_events, vec![VehicleAuthEvent::Accepted]);
    let captured = run.to_pile[0].clone();

    // Same pile, next GB/T session.
    p.reset();
    p.handle_message(&captured, T0, NOW + 1);
    assert_eq!(
        p.poll_event(),
        Some(PileAuthEvent::Rejected(ResultCode::Replayed))
    );
    assert_eq!(p.poll_transmit(), Some(vec![0x04, 0x08]));

    // A restarted pile on the same store, the ticket still valid.
    let mut restarted = pile_on(pile_keys(), PileAuthConfig::default(), &store, 1);
    restarted.handle_message(&captured, T0, NOW + 2);
    assert_eq!(
        restarted.poll_event(),
        Some(PileAuthEvent::Rejected(ResultCode::Replayed))
    );
    assert!(matches!(
        restarted.last_error(),
        Some(PileAuthError::Replay(_))
    ));
    // And a genuine vehicle re-using the credential fares no better.
    restarted.reset();
    assert_eq!(
        refused(credential(), &mut restarted, NOW + 3),
        ResultCode::Replayed
    );
}

#[test]
fn ticket_checks_have_their_own_codes() {
    let window = |nb: u32, na: u32| {
        Issue {
            not_before: nb,
            not_after: na,
            ..Issue::default()
        }
        .credential()
    };
    let skew = PileAuthConfig::default().skew;
    assert_eq!(
        refused(window(NOW - 7200, NOW - 3600), &mut pile(), NOW),
        ResultCode::Expired
    );
    assert_eq!(
        refused(window(NOW + 3600, NOW + 7200), &mut pile(), NOW),
        ResultCode::NotYetValid
    );
    assert_eq!(
        refused(window(NOW + skew + 1, NOW + 7200), &mut pile(), NOW),
        ResultCode::NotYetValid
    );
    assert_eq!(
        refused(window(NOW - 7200, NOW - skew - 1), &mut pile(), NOW),
        ResultCode::Expired
    );
    // Within the skew tolerance, on both ends.
    for credential in [
        window(NOW + skew, NOW + 7200),
        window(NOW - 7200, NOW - skew),
    ] {
        let run = authenticate(credential, &mut pile(), NOW);
        assert_eq!(run.vehicle_events, vec![VehicleAuthEvent::Accepted]);
    }
    let other_pile = Issue {
        charger: CHARGER + 1,
        ..Issue::default()
    };
    assert_eq!(
        refused(other_pile.credential(), &mut pile(), NOW),
        ResultCode::WrongCharger
    );
    let unknown_epoch = Issue {
        offset: OFFSET + 1,
        ..Issue::default()
    };
    assert_eq!(
        refused(unknown_epoch.credential(), &mut pile(), NOW),
        ResultCode::UnknownKeyOffset
    );
}

#[test]
fn previous_epoch_is_accepted_only_when_configured() {
    let previous = Issue {
        offset: OFFSET - 1,
        ..Issue::default()
    };
    let run = authenticate(previous.credential(), &mut pile(), NOW);
    assert_eq!(run.vehicle_events, vec![VehicleAuthEvent::Accepted]);
    let mut keys = pile_keys();
    keys.previous_offset = None;
    let mut strict = pile_on(
        keys,
        PileAuthConfig::default(),
        &MemoryReplayStore::default(),
        0,
    );
    assert_eq!(
        refused(previous.credential(), &mut strict, NOW),
        ResultCode::UnknownKeyOffset
    );
}

/// What a pile without the root key can do: answer with a handshake of its
/// own, keyed with a guessed session key, over the right prologue.
fn fake_challenge(ticket: &[u8; crate::auth::ticket::TICKET_LEN]) -> Vec<u8> {
    let guess = SessionKey::from_bytes([0xee; 32]);
    let mut rng = StreamRng::new(77);
    let mut initiator = build(true, &guess, ticket, &mut rng);
    let mut responder = build(false, &guess, ticket, &mut rng);
    let (mut m1, mut m2, mut p) = ([0u8; 48], [0u8; 64], [0u8; 64]);
    initiator.write_message(&[], &mut m1).expect("msg1");
    responder.read_message(&m1, &mut p).expect("msg1 reads");
    responder.write_message(&[7u8; 16], &mut m2).expect("msg2");
    AuthMessage::Challenge { noise: m2 }.encode()
}

#[test]
fn fake_pile_is_caught_at_the_challenge_well_before_the_deadline() {
    let c = credential();
    let mut v = vehicle(c.clone(), 0);
    v.start(T0);
    assert!(v.poll_transmit().is_some());
    let t = T0 + Duration::from_millis(20);
    v.handle_message(&fake_challenge(&c.ticket), t);
    assert_eq!(v.poll_event(), Some(VehicleAuthEvent::FakePile));
    assert!(matches!(
        v.last_error(),
        Some(VehicleAuthError::ChallengeDoesNotVerify)
    ));
    assert_eq!((v.poll_transmit(), v.poll_timeout()), (None, None));

    // A pile with the wrong root key cannot even open the ticket.
    let mut keys = pile_keys();
    keys.root = RootKey::from_bytes([0x43; 32]);
    let mut wrong = pile_on(
        keys,
        PileAuthConfig::default(),
        &MemoryReplayStore::default(),
        0,
    );
    assert_eq!(
        refused(credential(), &mut wrong, NOW),
        ResultCode::BadTicket
    );
}

#[test]
fn unauthenticated_accept_is_a_fake_pile_in_either_wait() {
    // Before the challenge.
    let mut v = vehicle(credential(), 0);
    v.start(T0);
    v.handle_message(&[0x04, 0x00], T0);
    assert_eq!(v.poll_event(), Some(VehicleAuthEvent::FakePile));
    assert!(matches!(
        v.last_error(),
        Some(VehicleAuthError::UnauthenticatedAccept)
    ));

    // After the confirm: the genuine result is dropped, a plain one injected.
    let mut v = vehicle(credential(), 0);
    let mut p = pile();
    v.start(T0);
    p.handle_message(&v.poll_transmit().expect("request"), T0, NOW);
    v.handle_message(&p.poll_transmit().expect("challenge"), T0);
    p.handle_message(&v.poll_transmit().expect("confirm"), T0, NOW);
    assert!(matches!(p.poll_event(), Some(PileAuthEvent::Accepted(_))));
    v.handle_message(&[0x04, 0x00], T0);
    assert_eq!(v.poll_event(), Some(VehicleAuthEvent::FakePile));

    // An authenticated-looking accept made on other keys.
    let mut v = vehicle(credential(), 0);
    let mut p = pile();
    v.start(T0);
    p.handle_message(&v.poll_transmit().expect("request"), T0, NOW);
    v.handle_message(&p.poll_transmit().expect("challenge"), T0);
    let mut forged = vec![0x04, 0x00];
    forged.extend_from_slice(&[0xab; 17]);
    v.handle_message(&forged, T0);
    assert_eq!(v.poll_event(), Some(VehicleAuthEvent::FakePile));
    assert!(matches!(
        v.last_error(),
        Some(VehicleAuthError::ResultDoesNotVerify {
            code: ResultCode::Accepted
        })
    ));
}

fn vehicle_without_retransmission(credential: Credential) -> VehicleAuth {
    VehicleAuth::new(
        credential,
        VehicleAuthConfig {
            retransmit_after: Duration::ZERO,
            ..VehicleAuthConfig::default()
        },
        Box::new(StreamRng::new(1000)),
    )
}

#[test]
fn silent_pile_times_out_the_vehicle_at_each_deadline() {
    let mut v = vehicle_without_retransmission(credential());
    v.start(T0);
    let deadline = T0 + Duration::from_secs(1);
    assert_eq!(v.poll_timeout(), Some(deadline));
    v.handle_timeout(just_before(deadline));
    assert_eq!(v.poll_event(), None);
    v.handle_timeout(deadline);
    assert_eq!(
        v.poll_event(),
        Some(VehicleAuthEvent::Timeout {
            waiting_for: "AuthChallenge"
        })
    );
    assert_eq!(v.poll_timeout(), None);

    // The pile answers the request and then falls silent.
    let mut v = vehicle_without_retransmission(credential());
    let mut p = pile();
    v.start(T0);
    p.handle_message(&v.poll_transmit().expect("request"), T0, NOW);
    let t1 = T0 + Duration::from_millis(300);
    v.handle_message(&p.poll_transmit().expect("challenge"), t1);
    assert_eq!(v.poll_timeout(), Some(t1 + Duration::from_secs(1)));
    v.handle_timeout(t1 + Duration::from_secs(1));
    assert_eq!(
        v.poll_event(),
        Some(VehicleAuthEvent::Timeout {
            waiting_for: "AuthResult"
        })
    );
}

/// One microsecond before `t`.
fn just_before(t: Timestamp) -> Timestamp {
    Timestamp::from_micros(t.as_micros() - 1)
}

#[test]
fn vehicle_that_never_confirms_times_out_at_the_pile() {
    let mut v = vehicle(credential(), 0);
    let mut p = pile();
    v.start(T0);
    p.handle_message(&v.poll_transmit().expect("request"), T0, NOW);
    let challenge = p.poll_transmit().expect("challenge");
    let deadline = T0 + Duration::from_secs(1);
    assert_eq!(p.poll_timeout(), Some(deadline));
    p.handle_timeout(just_before(deadline));
    assert_eq!(p.poll_event(), None);
    p.handle_timeout(deadline);
    assert_eq!(
        p.poll_event(),
        Some(PileAuthEvent::Rejected(ResultCode::Timeout))
    );
    assert_eq!(p.poll_timeout(), None);
    // The result is authenticated: a vehicle whose confirm was lost learns
    // the real reason.
    let result = p.poll_transmit().expect("result");
    assert_eq!((result.len(), result[1]), (19, 0x0C));
    v.handle_message(&challenge, T0);
    let _lost_confirm = v.poll_transmit();
    v.handle_message(&result, deadline);
    assert_eq!(
        v.poll_event(),
        Some(VehicleAuthEvent::Rejected(ResultCode::Timeout))
    );
    // A confirm arriving after the timeout is ignored.
    p.handle_message(&_lost_confirm.expect("confirm"), deadline, NOW);
    assert_eq!((p.poll_event(), p.poll_transmit()), (None, None));
    assert!(matches!(
        p.last_error(),
        Some(PileAuthError::Unexpected {
            state: "Idle",
            message: MessageType::Confirm
        })
    ));
}

#[test]
fn attempts_are_limited_per_session() {
    let mut p = pile();
    let expired = |seed| {
        Issue {
            not_before: NOW - 7200,
            not_after: NOW - 3600,
            seed,
            ..Issue::default()
        }
        .credential()
    };
    for seed in 0..3 {
        assert_eq!(refused(expired(seed), &mut p, NOW), ResultCode::Expired);
    }
    assert_eq!(p.attempts(), 3);
    assert_eq!(
        refused(credential(), &mut p, NOW),
        ResultCode::TooManyAttempts
    );
    // Garbage gets the same answer once the attempts are used up.
    p.handle_message(&[0x09], T0, NOW);
    assert_eq!(p.poll_transmit(), Some(vec![0x04, 0x0D]));
    assert_eq!(
        p.poll_event(),
        Some(PileAuthEvent::Rejected(ResultCode::TooManyAttempts))
    );
    // The refused valid ticket was never opened, so it is not spent.
    p.reset();
    let run = authenticate(credential(), &mut p, NOW);
    assert_eq!(run.vehicle_events, vec![VehicleAuthEvent::Accepted]);
}

#[test]
fn malformed_messages_are_refused_with_a_code_and_count() {
    let mut p = pile();
    p.handle_message(&[0x01, 0x01, 0x02], T0, NOW);
    assert_eq!(p.poll_transmit(), Some(vec![0x04, 0x01]));
    p.handle_message(&[0x01, 0x02, 0x00], T0, NOW);
    assert_eq!(p.poll_transmit(), Some(vec![0x04, 0x02]));
    assert_eq!(p.attempts(), 2);
    assert!(matches!(
        p.last_error(),
        Some(PileAuthError::Malformed { .. })
    ));
}

#[test]
fn full_replay_cache_refuses_and_purges_expired_entries_first() {
    let config = PileAuthConfig {
        replay_capacity: 1,
        ..PileAuthConfig::default()
    };
    let store = MemoryReplayStore::default();
    let mut p = pile_on(pile_keys(), config, &store, 0);
    let first = Issue {
        not_after: NOW + 60,
        seed: 1,
        ..Issue::default()
    };
    assert_eq!(
        authenticate(first.credential(), &mut p, NOW).vehicle_events,
        vec![VehicleAuthEvent::Accepted]
    );
    p.reset();
    let second = Issue {
        not_after: NOW + 7200,
        seed: 2,
        ..Issue::default()
    };
    assert_eq!(
        refused(second.credential(), &mut p, NOW + 30),
        ResultCode::ReplayCacheFull
    );
    // The first ticket's id is still live at not_after + skew.
    p.reset();
    let edge = NOW + 60 + config.skew;
    assert_eq!(
        refused(second.credential(), &mut p, edge),
        ResultCode::ReplayCacheFull
    );
    // One second later it is purged and the second ticket goes through.
    p.reset();
    let run = authenticate(second.credential(), &mut p, edge + 1);
    assert_eq!(run.vehicle_events, vec![VehicleAuthEvent::Accepted]);
    assert_eq!(p.replay_cache().len(), 1);
    assert!(p.replay_cache().contains(&second.credential().ticket_id()));
}

#[test]
fn voucher_is_single_use_at_the_pile_and_in_the_wallet() {
    let voucher = |charger, seed| {
        Issue {
            charger,
            voucher: true,
            not_after: NOW + 86_400,
            seed,
            ..Issue::default()
        }
        .credential()
    };
    let mut wallet = MemoryWallet::new();
    wallet.add(voucher(CHARGER, 1)).expect("added");
    wallet.add(voucher(CHARGER + 1, 2)).expect("added");
    assert_eq!(wallet.remaining_for(CHARGER, NOW), 1);

    let taken = wallet
        .take_for(CHARGER, NOW)
        .expect("ok")
        .expect("voucher for this pile");
    // Spent before it was returned: gone even though the session has not run.
    assert_eq!(wallet.remaining_for(CHARGER, NOW), 0);
    assert!(
        wallet.take_for(CHARGER, NOW).expect("ok").is_none(),
        "no other pile's voucher"
    );

    let mut p = pile();
    let run = authenticate(taken.clone(), &mut p, NOW);
    assert_eq!(run.vehicle_events, vec![VehicleAuthEvent::Accepted]);
    let [PileAuthEvent::Accepted(ticket)] = &run.pile_events[..] else {
        panic!("{:?}", run.pile_events);
    };
    assert!(ticket.voucher);
    // Spending the same voucher twice fails at the pile.
    p.reset();
    assert_eq!(refused(taken, &mut p, NOW + 10), ResultCode::Replayed);
    // Another pile's voucher is refused by this pile.
    p.reset();
    assert_eq!(
        refused(voucher(CHARGER + 1, 2), &mut p, NOW),
        ResultCode::WrongCharger
    );
}

#[test]
fn out_of_order_messages_are_ignored_with_a_typed_error() {
    let mut v = vehicle(credential(), 0);
    v.handle_message(&[0x04, 0x00], T0);
    assert!(matches!(
        v.last_error(),
        Some(VehicleAuthError::Unexpected {
            state: "Idle",
            message: MessageType::Result
        })
    ));
    v.start(T0);
    v.start(T0);
    assert!(matches!(
        v.last_error(),
        Some(VehicleAuthError::AlreadyStarted { .. })
    ));
    assert_eq!(v.poll_transmit().map(|m| m.len()), Some(150));
    assert_eq!(v.poll_transmit(), None);
    v.handle_message(&[0x03; 46], T0);
    assert!(matches!(
        v.last_error(),
        Some(VehicleAuthError::Unexpected {
            state: "AwaitChallenge",
            message: MessageType::Confirm
        })
    ));
    v.handle_message(&[0x02; 3], T0);
    assert!(matches!(
        v.last_error(),
        Some(VehicleAuthError::Malformed { .. })
    ));
    assert_eq!(v.poll_event(), None);

    // The pile ignores pile-to-vehicle messages, and anything once accepted.
    let mut p = pile();
    p.handle_message(&[0x04, 0x00], T0, NOW);
    assert!(matches!(
        p.last_error(),
        Some(PileAuthError::Unexpected { .. })
    ));
    let run = authenticate(credential(), &mut p, NOW);
    p.handle_message(&run.to_pile[0], T0, NOW);
    p.handle_message(&[0xff], T0, NOW);
    assert_eq!((p.poll_transmit(), p.poll_event()), (None, None));
    assert!(p.accepted().is_some());
    assert_eq!(p.attempts(), 1);
}

#[test]
fn a_new_request_abandons_the_attempt_waiting_for_confirm() {
    let mut p = pile();
    let mut stale = vehicle(credential(), 0);
    stale.start(T0);
    p.handle_message(&stale.poll_transmit().expect("request"), T0, NOW);
    assert!(p.poll_transmit().is_some());
    let run = authenticate(
        Issue {
            seed: 9,
            ..Issue::default()
        }
        .credential(),
        &mut p,
        NOW,
    );
    assert_eq!(run.vehicle_events, vec![VehicleAuthEvent::Accepted]);
    assert_eq!(p.attempts(), 2);
}

/// One genuine run with fixed RNGs: every side can be rebuilt into any
/// state by replaying its prefix.
struct Recorded {
    credential: Credential,
    request: Vec<u8>,
    challenge: Vec<u8>,
    confirm: Vec<u8>,
    result: Vec<u8>,
}

fn recorded() -> Recorded {
    let credential = credential();
    let mut p = pile();
    let run = authenticate(credential.clone(), &mut p, NOW);
    assert_eq!(run.vehicle_events, vec![VehicleAuthEvent::Accepted]);
    let [request, confirm] =
        <[Vec<u8>; 2]>::try_from(run.to_pile).expect("two messages to the pile");
    let [challenge, result] =
        <[Vec<u8>; 2]>::try_from(run.to_vehicle).expect("two messages to the vehicle");
    Recorded {
        credential,
        request,
        challenge,
        confirm,
        result,
    }
}

fn flips(msg: &[u8]) -> impl Iterator<Item = (usize, Vec<u8>)> + '_ {
    (0..msg.len() * 8).map(move |bit| {
        let mut m = msg.to_vec();
        m[bit / 8] ^= 1 << (bit % 8);
        (bit, m)
    })
}

#[test]
fn every_bit_flip_of_auth_request_is_refused() {
    let r = recorded();
    for (bit, flipped) in flips(&r.request) {
        let mut p = pile();
        p.handle_message(&flipped, T0, NOW);
        let Some(PileAuthEvent::Rejected(code)) = p.poll_event() else {
            panic!("bit {bit}: not refused");
        };
        assert_eq!(
            p.poll_transmit(),
            Some(vec![0x04, code.as_u8()]),
            "bit {bit}"
        );
        let expected: &[ResultCode] = match bit / 8 {
            0 => &[ResultCode::Malformed],
            1 => &[ResultCode::UnsupportedVersion],
            3..=4 => &[ResultCode::UnknownKeyOffset, ResultCode::BadTicket],
            5..=8 => &[ResultCode::WrongCharger],
            2 | 9..=101 => &[ResultCode::BadTicket],
            102.. => &[ResultCode::HandshakeFailed],
        };
        assert!(expected.contains(&code), "bit {bit}: {code}");
    }
}

#[test]
fn every_bit_flip_of_auth_challenge_is_caught_by_the_vehicle() {
    let r = recorded();
    for (bit, flipped) in flips(&r.challenge) {
        let mut v = vehicle(r.credential.clone(), 0);
        v.start(T0);
        assert_eq!(
            v.poll_transmit().as_ref(),
            Some(&r.request),
            "deterministic replay"
        );
        v.handle_message(&flipped, T0);
        match v.poll_event() {
            Some(VehicleAuthEvent::FakePile) => {}
            // The type byte: no longer an AuthChallenge, ignored.
            None if bit < 8 => assert!(matches!(
                v.last_error(),
                Some(VehicleAuthError::Malformed { .. })
            )),
            other => panic!("bit {bit}: {other:?}"),
        }
        assert_eq!(v.poll_transmit(), None, "bit {bit}: no confirm");
    }
}

#[test]
fn every_bit_flip_of_auth_confirm_is_refused() {
    let r = recorded();
    for (bit, flipped) in flips(&r.confirm) {
        let mut p = pile();
        p.handle_message(&r.request, T0, NOW);
        assert_eq!(
            p.poll_transmit().as_ref(),
            Some(&r.challenge),
            "deterministic replay"
        );
        p.handle_message(&flipped, T0, NOW);
        let code = match p.poll_event() {
            Some(PileAuthEvent::Rejected(code)) => code,
            other => panic!("bit {bit}: {other:?}"),
        };
        let expected: &[ResultCode] = if bit < 8 {
            // 0x03 → 0x01 reads as an AuthRequest of another ticket version.
            &[ResultCode::Malformed, ResultCode::UnsupportedVersion]
        } else {
            &[ResultCode::ConfirmFailed]
        };
        assert!(expected.contains(&code), "bit {bit}: {code}");
        assert!(p.accepted().is_none());
    }
}

#[test]
fn every_bit_flip_of_auth_result_is_never_accepted() {
    let r = recorded();
    for (bit, flipped) in flips(&r.result) {
        let mut v = vehicle(r.credential.clone(), 0);
        v.start(T0);
        v.handle_message(&r.challenge, T0);
        assert_eq!(v.poll_transmit().as_ref(), Some(&r.request));
        assert_eq!(
            v.poll_transmit().as_ref(),
            Some(&r.confirm),
            "deterministic replay"
        );
        v.handle_message(&flipped, T0);
        match v.poll_event() {
            Some(VehicleAuthEvent::FakePile) => {}
            // The type byte, or a code byte that is no code: ignored.
            None if bit < 16 => assert!(matches!(
                v.last_error(),
                Some(VehicleAuthError::Malformed { .. })
            )),
            other => panic!("bit {bit}: {other:?}"),
        }
        assert!(v.channel().is_none());
    }
}

// Test vectors of docs/protocol.md §4.7.

fn seq(start: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| start.wrapping_add(i as u8)).collect()
}

struct Vectors {
    ticket_key: String,
    ticket: String,
    request: String,
    challenge: String,
    confirm: String,
    result: String,
}

const V_ROOT: u8 = 0x00; // root key 00 01 .. 1f
const V_SESSION: u8 = 0x20; // session key 20 .. 3f
const V_VEHICLE_E: u8 = 0x40; // vehicle ephemeral private key 40 .. 5f
const V_PILE_E: u8 = 0x60; // pile ephemeral private key 60 .. 7f
const V_CHALLENGE: u8 = 0x80; // challenge 80 .. 8f
const V_TICKET_ID: u8 = 0xa0; // ticket id a0 .. ab
const V_PSEUDONYM: u8 = 0xc0; // pseudonym c0 .. cf
const V_OFFSET: u16 = 0x0007;
const V_CHARGER: u32 = 123_456;
const V_NOT_BEFORE: u32 = 1_760_000_000;
const V_NOT_AFTER: u32 = 1_760_003_600;
const V_CAP: u32 = 30_000;
const V_UNIX_NOW: u32 = 1_760_000_100;

fn vector_run() -> Vectors {
    let root = RootKey::from_bytes(from_hex::<32>(&to_hex(&seq(V_ROOT, 32))).expect("32 bytes"));
    let body = TicketBody {
        pseudonym: seq(V_PSEUDONYM, 16).try_into().expect("16 bytes"),
        charger_number: V_CHARGER,
        not_before: V_NOT_BEFORE,
        not_after: V_NOT_AFTER,
        session_key: SessionKey::from_bytes(seq(V_SESSION, 32).try_into().expect("32 bytes")),
        energy_cap_wh: V_CAP,
        voucher: false,
    };
    let ticket = ticket::seal(
        &root,
        V_OFFSET,
        &body,
        &mut ScriptedRng::new(&[&seq(V_TICKET_ID, 12)]),
    );
    let credential = Credential {
        ticket,
        session_key: body.session_key.clone(),
        charger_number: V_CHARGER,
        not_before: V_NOT_BEFORE,
        not_after: V_NOT_AFTER,
        energy_cap_wh: V_CAP,
        voucher: false,
    };
    let mut v = VehicleAuth::new(
        credential,
        VehicleAuthConfig::default(),
        Box::new(ScriptedRng::new(&[&seq(V_VEHICLE_E, 32)])),
    );
    let keys = PileKeys {
        root: root.clone(),
        charger_number: V_CHARGER,
        current_offset: V_OFFSET,
        previous_offset: None,
    };
    let replay = ReplayCache::open(Box::new(MemoryReplayStore::default()), 16).expect("opens");
    let mut p = PileAuth::new(
        keys,
        PileAuthConfig::default(),
        replay,
        // Drawn in this order: the ephemeral key, then the challenge.
        Box::new(ScriptedRng::new(&[
            &seq(V_PILE_E, 32),
            &seq(V_CHALLENGE, 16),
        ])),
    );
    v.start(T0);
    let run = pump(&mut v, &mut p, T0, V_UNIX_NOW);
    assert_eq!(run.vehicle_events, vec![VehicleAuthEvent::Accepted]);
    Vectors {
        ticket_key: to_hex(ticket_key(&root, V_OFFSET, V_CHARGER).expose()),
        ticket: to_hex(&ticket),
        request: to_hex(&run.to_pile[0]),
        challenge: to_hex(&run.to_vehicle[0]),
        confirm: to_hex(&run.to_pile[1]),
        result: to_hex(&run.to_vehicle[1]),
    }
}

/// ticket_key, ticket, AuthRequest, AuthChallenge, AuthConfirm, AuthResult;
/// also recomputed independently with Python's `cryptography` when written.
const VECTORS: [&str; 6] = [
    "997f1a603421d7273cc461b691114c98347414d9cf40b8411e5040143a48ec37",
    concat!(
        "0100070040e20100a0a1a2a3a4a5a6a7a8a9aaabc48ebde2448070e257c7f20c",
        "aa0fc7c93f68b21e3d6d02c7799dc368308d1f8e73df03cb9b7cd101f6b342ad",
        "ea3a39b859f5a85c61cdd490c9c48b7f5386ea73fd0c5b38caf5601381cfbe1b",
        "69e460ef7d",
    ),
    concat!(
        "010100070040e20100a0a1a2a3a4a5a6a7a8a9aaabc48ebde2448070e257c7f2",
        "0caa0fc7c93f68b21e3d6d02c7799dc368308d1f8e73df03cb9b7cd101f6b342",
        "adea3a39b859f5a85c61cdd490c9c48b7f5386ea73fd0c5b38caf5601381cfbe",
        "1b69e460ef7d79a631eede1bf9c98f12032cdeadd0e7a079398fc786b88cc846",
        "ec89af85a51a1aa39946728a3a6347e0499c9eb65e7b",
    ),
    concat!(
        "02675dd574ed7789310b3d2e7681f3790b466c773b1521fecf36577958371ea5",
        "2fa3f01f5d738e1ea9bcce2f30d0b549da5b78dc97b18fa85c529a563a8ac2e0",
        "36",
    ),
    concat!(
        "036d06fea0638e49111b569bcb1356e7d5197db9cdc0477f7f5ae01ed2416f94",
        "4d60da758117fdcad2ea57801764",
    ),
    "0400a090a06e082b7d54f1496cf5d7b0b747a8",
];

#[test]
fn golden_vectors() {
    let v = vector_run();
    let got = [
        v.ticket_key,
        v.ticket,
        v.request,
        v.challenge,
        v.confirm,
        v.result,
    ];
    assert_eq!(got, VECTORS.map(String::from));
}

/// docs/protocol.md §4.7 prints the same vectors.
#[test]
fn golden_vectors_are_the_ones_in_the_spec() {
    let spec = include_str!("../../../docs/protocol.md");
    let section = spec
        .split_once("### 4.7 Test vectors")
        .expect("protocol.md has section 4.7")
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
            "{vector} is not in §4.7"
        );
    }
}

/// The Noise messages of the vectors are plain Noise: snow's own default
/// resolver, given the same ephemeral keys, writes the same bytes.
#[test]
fn golden_vectors_match_snows_default_resolver() {
    use snow::resolvers::DefaultResolver;
    let bytes = |s: &str| -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    };
    let ticket = bytes(VECTORS[1]);
    let mut prologue = PROLOGUE_LABEL.to_vec();
    prologue.extend_from_slice(&ticket);
    let psk: [u8; 32] = seq(V_SESSION, 32).try_into().expect("32 bytes");
    let (ve, pe) = (seq(V_VEHICLE_E, 32), seq(V_PILE_E, 32));
    fn side<'a>(psk: &'a [u8; 32], prologue: &'a [u8], e: &'a [u8]) -> snow::Builder<'a> {
        let params = NOISE_PARAMS.parse().expect("valid");
        snow::Builder::with_resolver(params, Box::new(DefaultResolver))
            .psk(0, psk)
            .expect("psk")
            .prologue(prologue)
            .expect("prologue")
            .fixed_ephemeral_key_for_testing_only(e)
    }
    let mut i = side(&psk, &prologue, &ve)
        .build_initiator()
        .expect("initiator");
    let mut r = side(&psk, &prologue, &pe)
        .build_responder()
        .expect("responder");
    let (mut m1, mut m2, mut c, mut res, mut buf) =
        ([0u8; 48], [0u8; 64], [0u8; 45], [0u8; 17], [0u8; 64]);
    i.write_message(&[], &mut m1).expect("msg1");
    r.read_message(&m1, &mut buf).expect("read msg1");
    r.write_message(&seq(V_CHALLENGE, 16), &mut m2)
        .expect("msg2");
    i.read_message(&m2, &mut buf).expect("read msg2");
    let mut ti = i.into_transport_mode().expect("transport");
    let mut tr = r.into_transport_mode().expect("transport");
    let mut payload = CONFIRM_LABEL.to_vec();
    payload.extend(seq(V_CHALLENGE, 16));
    ti.write_message(&payload, &mut c).expect("confirm");
    tr.write_message(&[0x00], &mut res).expect("result");
    let framed = |t: &[u8], parts: &[&[u8]]| {
        let mut v = t.to_vec();
        parts.iter().for_each(|p| v.extend_from_slice(p));
        to_hex(&v)
    };
    assert_eq!(framed(&[0x01], &[&ticket, &m1]), VECTORS[2]);
    assert_eq!(framed(&[0x02], &[&m2]), VECTORS[3]);
    assert_eq!(framed(&[0x03], &[&c]), VECTORS[4]);
    assert_eq!(framed(&[0x04, 0x00], &[&res]), VECTORS[5]);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn state_machines_never_panic_on_arbitrary_bytes(
        msgs in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 1..6),
        unix_now: u32,
        ms in 0u64..3000,
    ) {
        let r = recorded();
        let now = T0 + Duration::from_millis(ms);
        // Pile: idle, and waiting for the confirm.
        let mut idle = pile();
        let mut waiting = pile();
        waiting.handle_message(&r.request, T0, NOW);
        // Vehicle: waiting for the challenge, and for the result.
        let mut v1 = vehicle(r.credential.clone(), 0);
        v1.start(T0);
        let mut v2 = vehicle(r.credential.clone(), 0);
        v2.start(T0);
        v2.handle_message(&r.challenge, T0);
        for m in &msgs {
            idle.handle_message(m, now, unix_now);
            waiting.handle_message(m, now, unix_now);
            v1.handle_message(m, now);
            v2.handle_message(m, now);
            for side in [&mut idle, &mut waiting] {
                side.handle_timeout(now);
                while side.poll_transmit().is_some() {}
                prop_assert!(!matches!(side.poll_event(), Some(PileAuthEvent::Accepted(_))));
            }
            for side in [&mut v1, &mut v2] {
                side.handle_timeout(now);
                prop_assert_ne!(side.poll_event(), Some(VehicleAuthEvent::Accepted));
            }
        }
    }

    #[test]
    fn state_machines_never_panic_on_mutated_genuine_messages(
        which in 0usize..4, pos: prop::sample::Index, byte: u8, cut: prop::sample::Index, extend in 0usize..3,
    ) {
        let r = recorded();
        let genuine = [&r.request, &r.challenge, &r.confirm, &r.result][which];
        let mut m = genuine.clone();
        let i = pos.index(m.len());
        m[i] = byte;
        m.truncate(cut.index(m.len() + 1).max(1));
        m.extend(std::iter::repeat_n(0xa5, extend));
        let mut p = pile();
        p.handle_message(&m, T0, NOW);
        let mut v = vehicle(r.credential.clone(), 0);
        v.start(T0);
        v.handle_message(&m, T0);
        let accepted_by_pile = matches!(p.poll_event(), Some(PileAuthEvent::Accepted(_)));
        prop_assert!(!accepted_by_pile);
        prop_assert_ne!(v.poll_event(), Some(VehicleAuthEvent::Accepted));
    }
}

/// Drain the vehicle's queue: what it would put on the bus now.
fn sent(v: &mut VehicleAuth) -> Vec<Vec<u8>> {
    std::iter::from_fn(|| v.poll_transmit()).collect()
}

#[test]
fn a_silent_pile_gets_the_same_bytes_again_until_the_deadline() {
    let mut v = vehicle(credential(), 0);
    v.start(T0);
    let request = sent(&mut v);
    assert_eq!(request.len(), 1);
    let mut copies = 0;
    let deadline = T0 + Duration::from_secs(1);
    while let Some(at) = v.poll_timeout() {
        v.handle_timeout(at);
        let again = sent(&mut v);
        if at < deadline {
            assert_eq!(again, request, "at {at:?}: the same request, byte for byte");
            copies += 1;
        } else {
            assert!(again.is_empty());
        }
    }
    // At 300, 600 and 900 ms; then the deadline ends the attempt.
    assert_eq!(copies, 3);
    assert_eq!(v.retransmissions(), 3);
    assert_eq!(
        v.poll_event(),
        Some(VehicleAuthEvent::Timeout {
            waiting_for: "AuthChallenge"
        })
    );
}

#[test]
fn a_lost_challenge_or_result_is_recovered_by_retransmission() {
    let store = MemoryReplayStore::default();
    let mut p = pile_on(pile_keys(), PileAuthConfig::default(), &store, 0);
    let mut v = vehicle(credential(), 0);
    v.start(T0);
    let request = sent(&mut v).remove(0);

    // The pile answers; the challenge is lost on the way.
    p.handle_message(&request, T0, NOW);
    let challenge = p.poll_transmit().expect("challenge");
    // The vehicle sends its request again; the pile answers with the same
    // challenge, spends nothing more and counts no new attempt.
    let t1 = T0 + Duration::from_millis(300);
    v.handle_timeout(t1);
    let again = sent(&mut v).remove(0);
    assert_eq!(again, request);
    p.handle_message(&again, t1, NOW);
    assert_eq!(p.poll_transmit(), Some(challenge.clone()));
    assert_eq!((p.attempts(), p.retransmissions()), (1, 1));
    assert_eq!(p.poll_event(), None);
    assert!(p.last_error().is_none(), "{:?}", p.last_error());

    // The confirm gets through; the result is lost on the way.
    v.handle_message(&challenge, t1);
    let confirm = sent(&mut v).remove(0);
    p.handle_message(&confirm, t1, NOW);
    let result = p.poll_transmit().expect("result");
    assert!(matches!(p.poll_event(), Some(PileAuthEvent::Accepted(_))));
    let t2 = t1 + Duration::from_millis(300);
    v.handle_timeout(t2);
    let again = sent(&mut v).remove(0);
    assert_eq!(again, confirm);
    p.handle_message(&again, t2, NOW);
    // The same sealed result, not a second Accepted.
    assert_eq!(p.poll_transmit(), Some(result.clone()));
    assert_eq!(p.poll_event(), None);
    v.handle_message(&result, t2);
    assert_eq!(v.poll_event(), Some(VehicleAuthEvent::Accepted));
    // The ticket went into the replay cache once.
    assert_eq!(p.replay_cache().len(), 1);
}

#[test]
fn a_replayed_request_after_acceptance_or_a_different_one_is_not_a_retransmission() {
    let mut p = pile();
    let mut v = vehicle(credential(), 0);
    v.start(T0);
    let request = sent(&mut v).remove(0);
    let run = {
        p.handle_message(&request, T0, NOW);
        let challenge = p.poll_transmit().expect("challenge");
        v.handle_message(&challenge, T0);
        let confirm = sent(&mut v).remove(0);
        p.handle_message(&confirm, T0, NOW);
        p.poll_transmit().expect("result")
    };
    v.handle_message(&run, T0);
    assert_eq!(v.poll_event(), Some(VehicleAuthEvent::Accepted));
    assert!(matches!(p.poll_event(), Some(PileAuthEvent::Accepted(_))));
    // Once accepted, the old request is not answered at all.
    p.handle_message(&request, T0, NOW);
    assert_eq!(p.poll_transmit(), None);
    assert_eq!(p.retransmissions(), 0);

    // A request that differs in one byte from the one being answered is a
    // new attempt: the same ticket is then refused as replayed.
    let mut p = pile();
    let mut v = vehicle(credential(), 0);
    v.start(T0);
    let request = sent(&mut v).remove(0);
    p.handle_message(&request, T0, NOW);
    let _challenge = p.poll_transmit().expect("challenge");
    let mut other = request.clone();
    let last = other.len() - 1;
    other[last] ^= 1;
    p.handle_message(&other, T0, NOW);
    assert_eq!(p.retransmissions(), 0);
    assert_eq!(p.attempts(), 2);
    assert_eq!(
        p.poll_transmit(),
        Some(vec![0x04, ResultCode::Replayed.as_u8()])
    );
}
