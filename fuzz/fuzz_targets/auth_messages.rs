//! The authentication messages (AuthRequest, AuthChallenge, AuthConfirm,
//! AuthResult) and the pile's opening of the ticket they carry.
#![no_main]

use bmsgw::auth::ticket::{TicketHeader, open};
use bmsgw::auth::{AuthMessage, PileAuthConfig};
use bmsgw_fuzz::{UNIX_NOW, pile_keys};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = AuthMessage::parse(data) {
        // What parses re-encodes to bytes that parse to the same message.
        let encoded = msg.encode();
        assert_eq!(AuthMessage::parse(&encoded).as_ref(), Ok(&msg));
    }
    // The ticket: either the message's own (an AuthRequest carries one) or
    // the whole input as a bare ticket.
    let keys = pile_keys();
    let skew = PileAuthConfig::default().skew;
    let ticket = match AuthMessage::parse(data) {
        Ok(AuthMessage::Request { ticket, .. }) => ticket.to_vec(),
        _ => data.to_vec(),
    };
    let header = TicketHeader::parse(&ticket);
    if let Ok(opened) = open(&keys, &ticket, UNIX_NOW, skew) {
        // Only a ticket sealed with our root key opens, and its clear
        // header is the one that was authenticated.
        let header = header.expect("an opened ticket has a header");
        assert_eq!(header.ticket_id, opened.ticket_id);
        assert_eq!(header.charger_number, keys.charger_number);
        assert_eq!(opened.body.charger_number, keys.charger_number);
    }
});
