//! A sealed cloud push carried by something other than MQTT: the owner's
//! phone, the head unit, a USB stick. `bmsgw ticket import FILE` hands it to
//! the daemon, which opens it exactly as if it had arrived on the vehicle's
//! `vouchers` topic ([`open_push`]): the envelope must come from the cloud's
//! key, be sealed to this vehicle's key and bind this vehicle's topic. The
//! carrier can read nothing and forge nothing; the file needs no protection.
//!
//! ```json
//! {"format":"bmsgw-sealed-push/1","vehicle_id":"veh-a",
//!  "topic":"bmsgw/v1/veh-a/vouchers","payload":"01…(hex)"}
//! ```
//!
//! Parsing is strict and bounded (at most [`MAX_FILE_LEN`] bytes, exactly
//! these four fields, `topic` the `vouchers` topic of `vehicle_id`, payload
//! hex of an envelope's length), and every error names the field, so a
//! damaged file is refused before anyone tries the cryptography.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::envelope::{MAX_WIRE_LEN, OVERHEAD};
use super::exchange::{ExchangeError, PushEvent, VehicleKeys, open_push};
use super::topics::{self, VehicleId};

/// The value of `format` this build reads and writes.
pub const FORMAT: &str = "bmsgw-sealed-push/1";
/// The largest ticket file read. An envelope is at most [`MAX_WIRE_LEN`]
/// bytes, twice that in hex, plus the other fields.
pub const MAX_FILE_LEN: usize = 128 * 1024;

const FIELDS: [&str; 4] = ["format", "vehicle_id", "topic", "payload"];

/// Why a ticket file was refused before any cryptography.
#[derive(Debug, thiserror::Error)]
pub enum TicketFileError {
    #[error("ticket file is over {MAX_FILE_LEN} bytes; this is not a ticket file")]
    TooLarge,
    #[error("ticket file is not JSON: {0}")]
    Json(#[source] serde_json::Error),
    #[error("a ticket file is a JSON object with the fields format, vehicle_id, topic and payload")]
    NotAnObject,
    #[error("ticket file has no `{0}` field")]
    Missing(&'static str),
    #[error("ticket file has an unknown field `{0}` (expected format, vehicle_id, topic, payload)")]
    UnknownField(String),
    #[error("ticket file `{field}` {problem}")]
    Field {
        field: &'static str,
        problem: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} already exists; remove it or choose another file")]
    Exists { path: PathBuf },
    #[error("{path}: {source}")]
    InFile {
        path: PathBuf,
        #[source]
        source: Box<TicketFileError>,
    },
}

/// A parsed ticket file: a sealed push and where it was meant to arrive.
///
/// Only built valid ([`TicketFile::parse`], [`TicketFile::new`]): `topic` is
/// the `vouchers` topic of `vehicle_id` and `payload` has an envelope's
/// length. Whether it is genuine only [`TicketFile::open`] can tell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TicketFile {
    vehicle_id: VehicleId,
    topic: String,
    payload: Vec<u8>,
}

/// The JSON shape, in field order.
#[derive(Serialize)]
struct Wire<'a> {
    format: &'a str,
    vehicle_id: &'a str,
    topic: &'a str,
    payload: String,
}

fn field(field: &'static str, problem: impl Into<String>) -> TicketFileError {
    TicketFileError::Field {
        field,
        problem: problem.into(),
    }
}

/// At most `max` characters of `s`, for echoing untrusted text.
fn clip(s: &str, max: usize) -> String {
    let mut out: String = s.chars().take(max).collect();
    if s.chars().nth(max).is_some() {
        out.push('…');
    }
    out
}

impl TicketFile {
    /// A ticket file for a push sealed to `vehicle_id` on `topic` (what
    /// `CloudService::push_vouchers` returns).
    pub fn new(
        vehicle_id: VehicleId,
        topic: String,
        payload: Vec<u8>,
    ) -> Result<TicketFile, TicketFileError> {
        let expected = topics::vouchers(&vehicle_id);
        if topic != expected {
            return Err(field(
                "topic",
                format!(
                    "is {:?}; a ticket for vehicle {vehicle_id} must carry {expected:?}",
                    clip(&topic, 100)
                ),
            ));
        }
        if !(OVERHEAD..=MAX_WIRE_LEN).contains(&payload.len()) {
            return Err(field(
                "payload",
                format!(
                    "is {} bytes; a sealed push is {OVERHEAD} to {MAX_WIRE_LEN} bytes",
                    payload.len()
                ),
            ));
        }
        Ok(TicketFile {
            vehicle_id,
            topic,
            payload,
        })
    }

    /// Parse the file's bytes.
    pub fn parse(bytes: &[u8]) -> Result<TicketFile, TicketFileError> {
        if bytes.len() > MAX_FILE_LEN {
            return Err(TicketFileError::TooLarge);
        }
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(TicketFileError::Json)?;
        TicketFile::try_from(value)
    }

    /// Read and parse a ticket file; errors name the file.
    pub fn load(path: &Path) -> Result<TicketFile, TicketFileError> {
        let in_file = |source| TicketFileError::InFile {
            path: path.to_owned(),
            source: Box::new(source),
        };
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_FILE_LEN as u64 + 1).read_to_end(&mut bytes))
            .map_err(|source| TicketFileError::Io {
                path: path.to_owned(),
                source,
            })?;
        TicketFile::parse(&bytes).map_err(in_file)
    }

    /// The file's text: one JSON object on one line, fields in the order
    /// `format`, `vehicle_id`, `topic`, `payload`.
    pub fn to_json(&self) -> String {
        // Invariant: a struct of strings always serializes.
        serde_json::to_string(&self.wire()).expect("a struct of strings serializes to JSON")
    }

    /// Write the file (JSON and a newline) to a new path; never overwrites.
    /// It is sealed, so the default mode (0644 under the usual umask) is fine.
    pub fn write_new(&self, path: &Path) -> Result<(), TicketFileError> {
        let io = |source| TicketFileError::Io {
            path: path.to_owned(),
            source,
        };
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    TicketFileError::Exists {
                        path: path.to_owned(),
                    }
                } else {
                    io(e)
                }
            })?;
        file.write_all(format!("{}\n", self.to_json()).as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(io)
    }

    /// Open and check the push exactly as one from MQTT: see [`open_push`].
    pub fn open(&self, keys: &VehicleKeys) -> Result<PushEvent, ExchangeError> {
        open_push(keys, &self.topic, &self.payload)
    }

    pub fn vehicle_id(&self) -> &VehicleId {
        &self.vehicle_id
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The sealed envelope.
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    fn wire(&self) -> Wire<'_> {
        Wire {
            format: FORMAT,
            vehicle_id: self.vehicle_id.as_str(),
            topic: &self.topic,
            payload: hex::encode(&self.payload),
        }
    }
}

impl TryFrom<serde_json::Value> for TicketFile {
    type Error = TicketFileError;

    fn try_from(value: serde_json::Value) -> Result<TicketFile, TicketFileError> {
        let serde_json::Value::Object(map) = value else {
            return Err(TicketFileError::NotAnObject);
        };
        if let Some(unknown) = map.keys().find(|k| !FIELDS.contains(&k.as_str())) {
            return Err(TicketFileError::UnknownField(clip(unknown, 64)));
        }
        let text = |name: &'static str| -> Result<&str, TicketFileError> {
            match map.get(name) {
                None => Err(TicketFileError::Missing(name)),
                Some(serde_json::Value::String(s)) => Ok(s),
                Some(_) => Err(field(name, "must be a string")),
            }
        };
        let format = text("format")?;
        if format != FORMAT {
            return Err(field(
                "format",
                format!("is {:?}; this build reads {FORMAT:?}", clip(format, 64)),
            ));
        }
        let vehicle_id = VehicleId::parse(text("vehicle_id")?)
            .map_err(|e| field("vehicle_id", e.to_string()))?;
        let topic = text("topic")?.to_owned();
        let hex_payload = text("payload")?;
        let payload = hex::decode(hex_payload.trim())
            .map_err(|e| field("payload", format!("is not hex: {e}")))?;
        TicketFile::new(vehicle_id, topic, payload)
    }
}

impl Serialize for TicketFile {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.wire().serialize(s)
    }
}

impl<'de> Deserialize<'de> for TicketFile {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<TicketFile, D::Error> {
        let value = serde_json::Value::deserialize(d)?;
        TicketFile::try_from(value).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::rng::StreamRng;
    use crate::auth::{Credential, RootKey};
    use crate::cloud::envelope::{self, EnvelopeError, KeyPair};
    use crate::cloud::messages::{Payload, Push, Voucher, VoucherBatch};

    const NOW: u32 = 1_760_000_000;

    fn vid(s: &str) -> VehicleId {
        VehicleId::parse(s).expect("valid id")
    }

    struct World {
        cloud: KeyPair,
        veh_a: VehicleKeys,
        veh_b: VehicleKeys,
        rng: StreamRng,
    }

    fn world() -> World {
        let mut rng = StreamRng::new(7);
        let cloud = KeyPair::generate(&mut rng);
        let veh_a = VehicleKeys {
            vehicle_id: vid("veh-a"),
            own: KeyPair::generate(&mut rng),
            cloud: *cloud.public(),
        };
        let veh_b = VehicleKeys {
            vehicle_id: vid("veh-b"),
            own: KeyPair::generate(&mut rng),
            cloud: *cloud.public(),
        };
        World {
            cloud,
            veh_a,
            veh_b,
            rng,
        }
    }

    /// Two vouchers for charger 7, sealed by `sender` to `to`.
    fn sealed(w: &mut World, sender: &KeyPair, to: &VehicleKeys) -> TicketFile {
        let vouchers = (0..2)
            .map(|_| {
                Voucher::from_credential(&Credential::issue(
                    &RootKey::from_bytes([3; 32]),
                    0,
                    7,
                    [1; 16],
                    NOW,
                    NOW + 3600,
                    0,
                    true,
                    &mut w.rng,
                ))
            })
            .collect();
        let push = Push::Vouchers(VoucherBatch {
            vehicle_id: to.vehicle_id.clone(),
            batch_id: [9; 16],
            issued_at: NOW,
            vouchers,
        });
        let topic = topics::vouchers(&to.vehicle_id);
        let payload = envelope::seal(
            to.own.public(),
            sender,
            &topic,
            &[],
            &push.encode(),
            &mut w.rng,
        )
        .expect("sealed");
        TicketFile::new(to.vehicle_id.clone(), topic, payload).expect("valid")
    }

    fn err_text(bytes: &[u8]) -> String {
        TicketFile::parse(bytes)
            .expect_err("must be refused")
            .to_string()
    }

    #[test]
    fn round_trip_and_open() {
        let mut w = world();
        let cloud = w.cloud.clone();
        let veh_a = w.veh_a.clone();
        let t = sealed(&mut w, &cloud, &veh_a);
        let json = t.to_json();
        assert!(json.starts_with(
            r#"{"format":"bmsgw-sealed-push/1","vehicle_id":"veh-a","topic":"bmsgw/v1/veh-a/vouchers","payload":"01"#
        ));
        let back = TicketFile::parse(json.as_bytes()).expect("parses");
        assert_eq!(back, t);
        // Through serde as well (the control protocol embeds it).
        let via_serde: TicketFile = serde_json::from_str(&json).expect("deserializes");
        assert_eq!(via_serde, t);
        assert_eq!(serde_json::to_string(&t).expect("serializes"), json);

        let Ok(PushEvent::Vouchers {
            batch_id, vouchers, ..
        }) = back.open(&veh_a)
        else {
            panic!("the genuine file opens");
        };
        assert_eq!(batch_id, [9; 16]);
        assert_eq!(vouchers.len(), 2);
        assert!(vouchers.iter().all(|v| v.charger_number == 7 && v.voucher));
    }

    #[test]
    fn load_and_write_new() {
        let mut w = world();
        let cloud = w.cloud.clone();
        let veh_a = w.veh_a.clone();
        let t = sealed(&mut w, &cloud, &veh_a);
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ticket.json");
        t.write_new(&path).expect("written");
        assert_eq!(TicketFile::load(&path).expect("loads"), t);
        assert!(matches!(
            t.write_new(&path),
            Err(TicketFileError::Exists { .. })
        ));
        std::fs::write(&path, b"{}").expect("written");
        let e = TicketFile::load(&path).expect_err("refused").to_string();
        assert!(
            e.contains("ticket.json") && e.contains("no `format` field"),
            "{e}"
        );
        let e = TicketFile::load(&dir.path().join("none.json"))
            .expect_err("refused")
            .to_string();
        assert!(e.contains("none.json"), "{e}");
    }

    #[test]
    fn forged_and_misdirected_files_are_refused() {
        let mut w = world();
        let cloud = w.cloud.clone();
        let (veh_a, veh_b) = (w.veh_a.clone(), w.veh_b.clone());
        // Sealed by someone who is not the cloud (here: vehicle b's key).
        let forger = veh_b.own.clone();
        let forged = sealed(&mut w, &forger, &veh_a);
        assert!(matches!(
            forged.open(&veh_a),
            Err(ExchangeError::Envelope(EnvelopeError::AuthenticationFailed))
        ));
        // Genuine, but for vehicle b.
        let for_b = sealed(&mut w, &cloud, &veh_b);
        assert!(matches!(
            for_b.open(&veh_a),
            Err(ExchangeError::WrongTopic { .. })
        ));
        assert!(for_b.open(&veh_b).is_ok());
        // Vehicle b's payload relabelled as vehicle a's: the envelope binds
        // the topic (and was sealed to b's key).
        let relabelled = TicketFile::new(
            vid("veh-a"),
            "bmsgw/v1/veh-a/vouchers".into(),
            for_b.payload().to_vec(),
        )
        .expect("well-formed");
        assert!(matches!(
            relabelled.open(&veh_a),
            Err(ExchangeError::Envelope(_))
        ));
        // One bit flipped.
        let genuine = sealed(&mut w, &cloud, &veh_a);
        let mut payload = genuine.payload().to_vec();
        if let Some(b) = payload.last_mut() {
            *b ^= 1;
        }
        let flipped =
            TicketFile::new(vid("veh-a"), genuine.topic().into(), payload).expect("well-formed");
        assert!(matches!(
            flipped.open(&veh_a),
            Err(ExchangeError::Envelope(_))
        ));
    }

    #[test]
    fn malformed_files_are_refused_naming_the_field() {
        let mut w = world();
        let cloud = w.cloud.clone();
        let veh_a = w.veh_a.clone();
        let json = sealed(&mut w, &cloud, &veh_a).to_json();
        let v: serde_json::Value = serde_json::from_str(&json).expect("json");
        let with = |key: &str, value: serde_json::Value| {
            let mut v = v.clone();
            v[key] = value;
            v.to_string()
        };
        let without = |key: &str| {
            let mut v = v.clone();
            v.as_object_mut().expect("object").remove(key);
            v.to_string()
        };
        let hex_payload = v["payload"].as_str().expect("string").to_owned();
        let cases: Vec<(String, &str)> = vec![
            (json[..json.len() / 2].to_owned(), "not JSON"),
            ("[1,2]".into(), "JSON object"),
            ("\u{1}garbage".into(), "not JSON"),
            (String::new(), "not JSON"),
            (without("payload"), "no `payload` field"),
            (without("format"), "no `format` field"),
            (with("extra", 1.into()), "unknown field `extra`"),
            (with("format", "bmsgw-sealed-push/2".into()), "`format`"),
            (with("format", 1.into()), "`format` must be a string"),
            (with("vehicle_id", "veh a".into()), "`vehicle_id`"),
            (with("vehicle_id", "veh-b".into()), "`topic`"),
            (with("topic", "bmsgw/v1/veh-a/events".into()), "`topic`"),
            (with("payload", "zz".into()), "`payload` is not hex"),
            (with("payload", "0102".into()), "`payload` is 2 bytes"),
            (
                with("payload", hex_payload[..hex_payload.len() - 1].into()),
                "`payload` is not hex",
            ),
        ];
        for (text, want) in cases {
            let e = err_text(text.as_bytes());
            assert!(e.contains(want), "{text:?}: {e}\nwanted: {want}");
        }
        assert!(matches!(
            TicketFile::parse(&vec![b' '; MAX_FILE_LEN + 1]),
            Err(TicketFileError::TooLarge)
        ));
        // A truncated but well-formed envelope parses, and fails to open.
        let short = with("payload", hex_payload[..hex_payload.len() - 2].into());
        let t = TicketFile::parse(short.as_bytes()).expect("well-formed");
        assert!(matches!(t.open(&veh_a), Err(ExchangeError::Envelope(_))));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = TicketFile::parse(&bytes);
        }
    }
}
