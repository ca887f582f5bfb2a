//! What the vehicle does with bytes from the broker or another carrier:
//! the HPKE envelope, the CBOR inside it, and the checks after.
//!
//! The first byte picks the path:
//! - 0: an `identity/resp` answer to a request in progress, as received
//!   (envelope, CBOR, nonce and credential checks);
//! - 1: the same, but the rest of the input is the *plaintext*, sealed
//!   here by the cloud's key so the fuzzer gets past the AEAD and reaches
//!   the decoding and checks behind it;
//! - 2, 3: a `vouchers` push, as received / as plaintext sealed here;
//! - 4: a ticket file for `bmsgw ticket import` (JSON, then the push).
#![no_main]

use bmsgw::cloud::envelope::{open, seal};
use bmsgw::cloud::exchange::{ExchangeParams, IdentityExchange, open_push};
use bmsgw::cloud::ticket_file::TicketFile;
use bmsgw::cloud::topics;
use bmsgw_fuzz::{CHARGER, FixedRng, UNIX_NOW, cloud_world};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&path, rest)) = data.split_first() else {
        return;
    };
    let world = cloud_world();
    let keys = &world.vehicle;
    // Sealed as the cloud would, with a fixed ephemeral key.
    let sealed = |topic: &str, corr: &[u8], plain: &[u8]| {
        seal(
            keys.own.public(),
            &world.cloud,
            topic,
            corr,
            plain,
            &mut FixedRng::new(5),
        )
    };
    match path % 5 {
        p @ (0 | 1) => {
            let params = ExchangeParams {
                charger_number: CHARGER,
                region_code: *b"310",
                want_vouchers: 2,
            };
            // The same request id and nonce as `make-seeds` recorded.
            let (mut exchange, request) =
                IdentityExchange::start(params, keys, UNIX_NOW, &mut FixedRng::new(6));
            let topic = request.response_topic.clone();
            let payload = if p == 0 {
                rest.to_vec()
            } else {
                match sealed(&topic, &request.correlation, rest) {
                    Ok(wire) => wire,
                    Err(_) => return,
                }
            };
            let first = exchange.on_response(&topic, &request.correlation, &payload, UNIX_NOW);
            // An answer is final once: after a grant or a denial, even the
            // same bytes again are refused.
            if first.is_ok() && exchange.is_finished() {
                assert!(
                    exchange
                        .on_response(&topic, &request.correlation, &payload, UNIX_NOW)
                        .is_err()
                );
            }
        }
        p @ (2 | 3) => {
            let topic = topics::vouchers(&keys.vehicle_id);
            let payload = if p == 2 {
                rest.to_vec()
            } else {
                match sealed(&topic, &[], rest) {
                    Ok(wire) => wire,
                    Err(_) => return,
                }
            };
            let _ = open_push(keys, &topic, &payload);
            // The envelope alone, for another recipient: must never open.
            assert!(
                open(
                    world.cloud.secret(),
                    keys.own.public(),
                    &topic,
                    &[],
                    &payload
                )
                .is_err()
            );
        }
        _ => {
            if let Ok(file) = TicketFile::parse(rest) {
                let _ = file.open(keys);
                // The parsed file writes back as JSON that parses to it.
                let again = TicketFile::parse(file.to_json().as_bytes())
                    .expect("a parsed ticket file re-parses from its own JSON");
                assert_eq!(again, file);
            }
        }
    }
});
