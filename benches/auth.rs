//! Cost of vehicle authentication on each side.
//!
//! Both sides draw their randomness from a fixed stream, so every iteration
//! replays the same transcript: the pile's side can be fed a recorded
//! AuthRequest and AuthConfirm, the vehicle's side a recorded AuthChallenge
//! and AuthResult, and each benchmark measures one side only.

use std::hint::black_box;

use bmsgw::auth::{
    Credential, MemoryReplayStore, PileAuth, PileAuthConfig, PileAuthEvent, PileKeys, ReplayCache,
    Rng, RootKey, SystemRng, TicketBody, VehicleAuth, VehicleAuthConfig, VehicleAuthEvent, ticket,
};
use bmsgw::auth::{SessionKey, keys::ticket_key};
use bmsgw::time::Timestamp;
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};

const CHARGER: u32 = 123_456;
const NOW: u32 = 1_760_000_000;

/// A fixed byte stream (xorshift64*): the same transcript every iteration.
struct FixedRng(u64);

impl Rng for FixedRng {
    fn fill(&mut self, dest: &mut [u8]) {
        for b in dest {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            *b = (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8;
        }
    }
}

fn keys() -> PileKeys {
    PileKeys {
        root: RootKey::from_bytes([0x42; 32]),
        charger_number: CHARGER,
        current_offset: 1,
        previous_offset: None,
    }
}

fn credential() -> Credential {
    Credential::issue(
        &keys().root,
        1,
        CHARGER,
        [7; 16],
        NOW - 60,
        NOW + 600,
        0,
        false,
        &mut FixedRng(1),
    )
}

fn pile() -> PileAuth {
    let replay =
        ReplayCache::open(Box::new(MemoryReplayStore::default()), 64).expect("memory store opens");
    PileAuth::new(
        keys(),
        PileAuthConfig::default(),
        replay,
        Box::new(FixedRng(2)),
    )
}

fn vehicle() -> VehicleAuth {
    VehicleAuth::new(
        credential(),
        VehicleAuthConfig::default(),
        Box::new(FixedRng(3)),
    )
}

/// request, challenge, confirm, result of one run.
fn transcript() -> [Vec<u8>; 4] {
    let (mut v, mut p) = (vehicle(), pile());
    v.start(Timestamp::ZERO);
    let request = v.poll_transmit().expect("request");
    p.handle_message(&request, Timestamp::ZERO, NOW);
    let challenge = p.poll_transmit().expect("challenge");
    v.handle_message(&challenge, Timestamp::ZERO);
    let confirm = v.poll_transmit().expect("confirm");
    p.handle_message(&confirm, Timestamp::ZERO, NOW);
    let result = p.poll_transmit().expect("result");
    v.handle_message(&result, Timestamp::ZERO);
    assert_eq!(v.poll_event(), Some(VehicleAuthEvent::Accepted));
    [request, challenge, confirm, result]
}

fn bench(c: &mut Criterion) {
    let [request, challenge, confirm, result] = transcript();

    c.bench_function("pile: open ticket + responder handshake", |b| {
        b.iter_batched(
            pile,
            |mut p| {
                p.handle_message(black_box(&request), Timestamp::ZERO, NOW);
                let challenge = p.poll_transmit();
                p.handle_message(black_box(&confirm), Timestamp::ZERO, NOW);
                let result = p.poll_transmit();
                assert!(matches!(p.poll_event(), Some(PileAuthEvent::Accepted(_))));
                (challenge, result)
            },
            BatchSize::SmallInput,
        )
    });

    c.bench_function("vehicle: initiator handshake", |b| {
        b.iter_batched(
            vehicle,
            |mut v| {
                v.start(Timestamp::ZERO);
                let request = v.poll_transmit();
                v.handle_message(black_box(&challenge), Timestamp::ZERO);
                let confirm = v.poll_transmit();
                v.handle_message(black_box(&result), Timestamp::ZERO);
                assert_eq!(v.poll_event(), Some(VehicleAuthEvent::Accepted));
                (request, confirm)
            },
            BatchSize::SmallInput,
        )
    });

    let root = keys().root;
    let body = TicketBody {
        pseudonym: [7; 16],
        charger_number: CHARGER,
        not_before: NOW - 60,
        not_after: NOW + 600,
        session_key: SessionKey::from_bytes([9; 32]),
        energy_cap_wh: 0,
        voucher: false,
    };
    c.bench_function("ticket seal (key derivation included)", |b| {
        b.iter(|| ticket::seal(&root, 1, black_box(&body), &mut SystemRng))
    });

    let sealed = ticket::seal(&root, 1, &body, &mut SystemRng);
    let pile_keys = keys();
    c.bench_function("ticket open (key derivation included)", |b| {
        b.iter(|| ticket::open(&pile_keys, black_box(&sealed), NOW, 300).expect("opens"))
    });

    c.bench_function("ticket key derivation", |b| {
        b.iter(|| ticket_key(&root, 1, black_box(CHARGER)))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
