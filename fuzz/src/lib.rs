//! What the fuzz targets share: the byte formats that turn one fuzz input
//! into a sequence of events (frames, messages, time steps), their writers
//! for the seed generator, a deterministic RNG, and the fixed keys and
//! parties whose handshakes the seeds record.
//!
//! Each format is read by a [`Cursor`] that never fails: when the input runs
//! out the sequence ends. So every byte string is a valid input, and the
//! seeds written by `make-seeds` (through the writers below) replay exactly
//! what the project's own encoders and state machines produced.

use std::time::Duration;

use bmsgw::auth::handshake::{PileAuth, PileAuthConfig, VehicleAuth, VehicleAuthConfig};
use bmsgw::auth::keys::{PileKeys, RootKey};
use bmsgw::auth::{Credential, MemoryReplayStore, ReplayCache, Rng};
use bmsgw::can::{CanFrame, CanId, ExtendedId, StandardId};
use bmsgw::cloud::envelope::KeyPair;
use bmsgw::cloud::exchange::VehicleKeys;
use bmsgw::cloud::topics::VehicleId;
use bmsgw::time::Timestamp;

/// Reads a fuzz input front to back; past the end every read is `None`.
pub struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Cursor(data)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn u8(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    pub fn u16(&mut self) -> Option<u16> {
        let (b, rest) = self.0.split_first_chunk::<2>()?;
        self.0 = rest;
        Some(u16::from_le_bytes(*b))
    }

    pub fn u32(&mut self) -> Option<u32> {
        let (b, rest) = self.0.split_first_chunk::<4>()?;
        self.0 = rest;
        Some(u32::from_le_bytes(*b))
    }

    /// Up to `n` bytes: a short tail is still used rather than dropped.
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        head
    }

    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }
}

// --- CAN frame sequences (j1939_tp, bridge) ----------------------------------

/// One step of a frame sequence.
#[derive(Clone, Debug)]
pub enum FrameOp {
    /// A frame arrives `dt_ms` after the previous step; `side` is 0 or 1
    /// (which interface, for the bridge; the TP target ignores it).
    Frame {
        dt_ms: u8,
        side: u8,
        frame: CanFrame,
    },
    /// Time passes by `ms`, then the core's timers run.
    Advance { ms: u16 },
    /// The local node sends `len` bytes of PGN `pgn` to `destination`
    /// (TP target only), so the sender's half sees the fuzzed answers.
    Send { pgn: u32, destination: u8, len: u16 },
}

const OP_FRAME: u8 = 0;
const OP_ADVANCE: u8 = 1;
const OP_SEND: u8 = 2;

/// Wire: `[op]` then, by `op % 4`:
/// - 0, 3 frame: `[dt_ms][id u32 LE][len]` + `len % 9` data bytes; bit 2 of
///   `op` is the side, bit 3 makes the id standard (11 bits);
/// - 1 advance: `[ms u16 LE]`;
/// - 2 send: `[pgn u16 LE, shifted left 8][destination][len u16 LE]`.
pub fn read_frame_op(c: &mut Cursor<'_>) -> Option<FrameOp> {
    let op = c.u8()?;
    match op % 4 {
        OP_ADVANCE => Some(FrameOp::Advance { ms: c.u16()? }),
        OP_SEND => Some(FrameOp::Send {
            pgn: u32::from(c.u16()?) << 8,
            destination: c.u8()?,
            len: c.u16()?,
        }),
        _ => {
            let dt_ms = c.u8()?;
            let raw = c.u32()?;
            let len = usize::from(c.u8()? % 9);
            let data = c.bytes(len);
            let id = if op & 8 != 0 {
                CanId::Standard(StandardId::new((raw & 0x7FF) as u16).ok()?)
            } else {
                CanId::Extended(ExtendedId::new(raw & ExtendedId::MAX).ok()?)
            };
            let frame = CanFrame::new(id, data).ok()?;
            Some(FrameOp::Frame {
                dt_ms,
                side: (op >> 2) & 1,
                frame,
            })
        }
    }
}

/// The writer of [`read_frame_op`]'s format.
pub fn write_frame_op(out: &mut Vec<u8>, op: &FrameOp) {
    match op {
        FrameOp::Frame { dt_ms, side, frame } => {
            let standard = !frame.id().is_extended();
            out.push(OP_FRAME | (side & 1) << 2 | u8::from(standard) << 3);
            out.push(*dt_ms);
            out.extend_from_slice(&frame.id().raw().to_le_bytes());
            out.push(frame.len() as u8);
            out.extend_from_slice(frame.data());
        }
        FrameOp::Advance { ms } => {
            out.push(OP_ADVANCE);
            out.extend_from_slice(&ms.to_le_bytes());
        }
        FrameOp::Send {
            pgn,
            destination,
            len,
        } => {
            out.push(OP_SEND);
            out.extend_from_slice(&((pgn >> 8) as u16).to_le_bytes());
            out.push(*destination);
            out.extend_from_slice(&len.to_le_bytes());
        }
    }
}

/// A time step in milliseconds, for the seed writer: the smallest u8 that
/// covers `d`, saturating.
pub fn dt_ms(d: Duration) -> u8 {
    u8::try_from(d.as_millis()).unwrap_or(u8::MAX)
}

// --- auth message sequences (auth_handshake) ---------------------------------

/// One step of an auth message sequence.
#[derive(Clone, Debug)]
pub enum AuthOp<'a> {
    /// A reassembled message from the peer.
    Message(&'a [u8]),
    /// Time passes by `ms`, then the timers run.
    Advance { ms: u16 },
    /// A new GB/T session: the pile resets, the vehicle starts again.
    Restart,
}

/// Wire: `[op][len u16 LE]`, then by `op % 3`: 0, `len` message bytes;
/// 1, advance `len` milliseconds; 2, restart.
pub fn read_auth_op<'a>(c: &mut Cursor<'a>) -> Option<AuthOp<'a>> {
    let op = c.u8()?;
    let len = c.u16()?;
    Some(match op % 3 {
        0 => AuthOp::Message(c.bytes(usize::from(len))),
        1 => AuthOp::Advance { ms: len },
        _ => AuthOp::Restart,
    })
}

pub fn write_auth_op(out: &mut Vec<u8>, op: &AuthOp<'_>) {
    match op {
        AuthOp::Message(m) => {
            out.push(0);
            out.extend_from_slice(&(m.len() as u16).to_le_bytes());
            out.extend_from_slice(m);
        }
        AuthOp::Advance { ms } => {
            out.push(1);
            out.extend_from_slice(&ms.to_le_bytes());
        }
        AuthOp::Restart => out.extend_from_slice(&[2, 0, 0]),
    }
}

// --- determinism ----------------------------------------------------------------

/// SplitMix64: the same bytes for the same seed, so the fuzzed party's
/// challenges and ephemeral keys match what the seeds recorded. Not a
/// CSPRNG, and only ever used by these harnesses.
pub struct FixedRng(u64);

impl FixedRng {
    pub fn new(seed: u64) -> Self {
        FixedRng(seed)
    }
}

impl Rng for FixedRng {
    fn fill(&mut self, dest: &mut [u8]) {
        for chunk in dest.chunks_mut(8) {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            chunk.copy_from_slice(&z.to_le_bytes()[..chunk.len()]);
        }
    }
}

// --- the fixed world ------------------------------------------------------------

/// The pile the tickets are for.
pub const CHARGER: u32 = 123_456;
pub const OFFSET: u16 = 7;
/// The wall clock every harness runs at (Unix seconds).
pub const UNIX_NOW: u32 = 1_760_000_000;
pub const T0: Timestamp = Timestamp::from_millis(1_000);
pub const VEHICLE_ID: &str = "veh-fuzz-1";

pub fn root() -> RootKey {
    RootKey::from_bytes([0x42; 32])
}

pub fn pile_keys() -> PileKeys {
    PileKeys {
        root: root(),
        charger_number: CHARGER,
        current_offset: OFFSET,
        previous_offset: Some(OFFSET - 1),
    }
}

/// An online credential for [`CHARGER`], valid at [`UNIX_NOW`].
pub fn credential(voucher: bool) -> Credential {
    Credential::issue(
        &root(),
        OFFSET,
        CHARGER,
        [0x5e; 16],
        UNIX_NOW - 60,
        UNIX_NOW + 600,
        22_000,
        voucher,
        &mut FixedRng::new(1),
    )
}

/// The pile under test, with a fresh replay cache and a fixed RNG.
pub fn pile_auth() -> PileAuth {
    let config = PileAuthConfig::default();
    let replay = ReplayCache::open(
        Box::new(MemoryReplayStore::default()),
        config.replay_capacity,
    )
    // Invariant: the in-memory store cannot fail to load.
    .expect("an empty in-memory replay store opens");
    PileAuth::new(pile_keys(), config, replay, Box::new(FixedRng::new(2)))
}

/// The vehicle under test, holding [`credential`], with a fixed RNG.
pub fn vehicle_auth() -> VehicleAuth {
    VehicleAuth::new(
        credential(false),
        VehicleAuthConfig::default(),
        Box::new(FixedRng::new(3)),
    )
}

/// The vehicle's and the cloud's envelope keys.
pub struct CloudWorld {
    pub vehicle: VehicleKeys,
    pub cloud: KeyPair,
}

/// Built once per process: generating the two key pairs costs more than
/// most executions of the targets that use them.
pub fn cloud_world() -> &'static CloudWorld {
    static WORLD: std::sync::OnceLock<CloudWorld> = std::sync::OnceLock::new();
    WORLD.get_or_init(make_cloud_world)
}

fn make_cloud_world() -> CloudWorld {
    let mut rng = FixedRng::new(4);
    let cloud = KeyPair::generate(&mut rng);
    let own = KeyPair::generate(&mut rng);
    CloudWorld {
        vehicle: VehicleKeys {
            // Invariant: a constant that satisfies the id's rules.
            vehicle_id: VehicleId::parse(VEHICLE_ID).expect("VEHICLE_ID is a valid vehicle id"),
            own,
            cloud: *cloud.public(),
        },
        cloud,
    }
}

// --- time, as a shell drives it -----------------------------------------------

/// Guards the timer loops of the harnesses: a core whose deadline does not
/// move after its timers ran would make a real shell spin.
pub const MAX_TIMER_ROUNDS: usize = 10_000;

/// Run every deadline of a core that falls at or before `until`, each at its
/// own time, as the async shell does when it sleeps until `poll_timeout`.
pub fn run_timers<C>(
    core: &mut C,
    until: Timestamp,
    poll_timeout: impl Fn(&C) -> Option<Timestamp>,
    handle_timeout: impl Fn(&mut C, Timestamp),
) {
    for _ in 0..MAX_TIMER_ROUNDS {
        match poll_timeout(core) {
            Some(t) if t <= until => {
                handle_timeout(core, t);
                if let Some(next) = poll_timeout(core) {
                    assert!(
                        next > t,
                        "deadline {t} did not move after its timers ran (next {next})"
                    );
                }
            }
            _ => return,
        }
    }
    panic!("more than {MAX_TIMER_ROUNDS} timer rounds before {until}");
}
