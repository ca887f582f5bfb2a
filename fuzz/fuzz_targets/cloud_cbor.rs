//! The CBOR payloads of every cloud topic, as decoded after the envelope
//! opened: the first byte picks the topic, the rest is the payload.
#![no_main]

use bmsgw::cloud::messages::{Approval, Event, Payload, Push, Request, Response};
use libfuzzer_sys::fuzz_target;

/// What decodes re-encodes to a payload that decodes and re-encodes to the
/// same bytes (the first encoding may normalise: key order, integer width).
fn roundtrip<P: Payload + std::fmt::Debug>(bytes: &[u8]) {
    let Ok(first) = P::decode(bytes) else { return };
    first
        .check()
        .expect("a decoded payload passes the sender's checks");
    let encoded = first.encode();
    let again = match P::decode(&encoded) {
        Ok(again) => again,
        Err(e) => panic!("{first:?} decoded, but its encoding does not: {e}"),
    };
    assert_eq!(*again.encode(), *encoded, "{first:?}");
}

fuzz_target!(|data: &[u8]| {
    let Some((&topic, payload)) = data.split_first() else {
        return;
    };
    match topic % 5 {
        0 => roundtrip::<Request>(payload),
        1 => roundtrip::<Response>(payload),
        2 => roundtrip::<Push>(payload),
        3 => roundtrip::<Event>(payload),
        _ => roundtrip::<Approval>(payload),
    }
});
