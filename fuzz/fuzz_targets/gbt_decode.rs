//! Every GB/T 27930 decoder: the first byte picks the message (one of the
//! 22 PGNs, or any other PGN), the rest is its body.
#![no_main]

use bmsgw::gbt27930::MessageKind;
use bmsgw::gbt27930::codec::decode;
use bmsgw::j1939::Pgn;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let kinds = MessageKind::ALL;
    let pgn = match kinds.get(usize::from(pick) % (kinds.len() + 1)) {
        Some(kind) => kind.pgn(),
        // An unknown PGN: must be refused, not misread.
        None => match Pgn::new(u32::from(pick) << 8) {
            Ok(pgn) => pgn,
            Err(_) => return,
        },
    };
    let Ok(msg) = decode(pgn, body) else {
        return;
    };
    assert_eq!(msg.kind().pgn(), pgn);
    // What decodes re-encodes to a body that decodes to the same message.
    let encoded = msg.encode();
    match decode(pgn, &encoded) {
        Ok(again) => assert_eq!(again, msg, "re-encoded as {encoded:02x?}"),
        Err(e) => {
            panic!("{msg:?} decoded from {body:02x?} but its encoding {encoded:02x?} does not: {e}")
        }
    }
});
