//! The four authentication messages on CAN and the result codes
//! (`docs/protocol.md` §4.4–4.5).
//!
//! Pure codecs: [`AuthMessage::parse`] checks the type byte and the exact
//! length of each message and never panics; cryptographic checks are left to
//! the handshake.

use std::fmt;

use super::ticket::TICKET_LEN;

/// PGN of all four messages: Proprietary A, destination-specific.
pub const AUTH_PGN: u32 = 0xEF00;
/// Priority of a single-frame message (AuthResult without transport part).
pub const AUTH_PRIORITY: u8 = 6;
/// Priority of the transport-protocol frames carrying the longer messages.
pub const AUTH_TP_PRIORITY: u8 = 7;
/// No AuthRequest of any ticket version is longer.
pub const AUTH_REQUEST_MAX_LEN: usize = 160;

/// Noise message 1 (`psk, e`, empty payload): e (32) + tag (16).
pub const NOISE_MSG1_LEN: usize = 48;
/// Noise message 2 (`e, ee`, 16-byte challenge): e (32) + challenge (16) + tag (16).
pub const NOISE_MSG2_LEN: usize = 64;
/// The vehicle's key confirmation: "bmsgw confirm" (13) + challenge (16) + tag (16).
pub const CONFIRM_TRANSPORT_LEN: usize = 45;
/// The pile's authenticated result: code (1) + tag (16).
pub const RESULT_TRANSPORT_LEN: usize = 17;

/// Encoded sizes, type byte included.
pub const AUTH_REQUEST_LEN: usize = 1 + TICKET_LEN + NOISE_MSG1_LEN;
pub const AUTH_CHALLENGE_LEN: usize = 1 + NOISE_MSG2_LEN;
pub const AUTH_CONFIRM_LEN: usize = 1 + CONFIRM_TRANSPORT_LEN;
pub const AUTH_RESULT_PLAIN_LEN: usize = 2;
pub const AUTH_RESULT_SEALED_LEN: usize = 2 + RESULT_TRANSPORT_LEN;

/// The outcome of an authentication attempt, as the pile reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum ResultCode {
    Accepted = 0x00,
    Malformed = 0x01,
    UnsupportedVersion = 0x02,
    UnknownKeyOffset = 0x03,
    WrongCharger = 0x04,
    BadTicket = 0x05,
    NotYetValid = 0x06,
    Expired = 0x07,
    Replayed = 0x08,
    ReplayCacheFull = 0x09,
    HandshakeFailed = 0x0A,
    ConfirmFailed = 0x0B,
    Timeout = 0x0C,
    TooManyAttempts = 0x0D,
}

impl ResultCode {
    pub const ALL: [ResultCode; 14] = [
        ResultCode::Accepted,
        ResultCode::Malformed,
        ResultCode::UnsupportedVersion,
        ResultCode::UnknownKeyOffset,
        ResultCode::WrongCharger,
        ResultCode::BadTicket,
        ResultCode::NotYetValid,
        ResultCode::Expired,
        ResultCode::Replayed,
        ResultCode::ReplayCacheFull,
        ResultCode::HandshakeFailed,
        ResultCode::ConfirmFailed,
        ResultCode::Timeout,
        ResultCode::TooManyAttempts,
    ];

    pub fn from_u8(byte: u8) -> Option<ResultCode> {
        ResultCode::ALL.get(usize::from(byte)).copied()
    }

    pub fn as_u8(self) -> u8 {
        self as u8
    }

    /// The name in the spec's table.
    pub fn name(self) -> &'static str {
        match self {
            ResultCode::Accepted => "Accepted",
            ResultCode::Malformed => "Malformed",
            ResultCode::UnsupportedVersion => "UnsupportedVersion",
            ResultCode::UnknownKeyOffset => "UnknownKeyOffset",
            ResultCode::WrongCharger => "WrongCharger",
            ResultCode::BadTicket => "BadTicket",
            ResultCode::NotYetValid => "NotYetValid",
            ResultCode::Expired => "Expired",
            ResultCode::Replayed => "Replayed",
            ResultCode::ReplayCacheFull => "ReplayCacheFull",
            ResultCode::HandshakeFailed => "HandshakeFailed",
            ResultCode::ConfirmFailed => "ConfirmFailed",
            ResultCode::Timeout => "Timeout",
            ResultCode::TooManyAttempts => "TooManyAttempts",
        }
    }

    /// The meaning in the spec's table.
    pub fn meaning(self) -> &'static str {
        match self {
            ResultCode::Accepted => "the pile will send CRM(0xAA)",
            ResultCode::Malformed => "the message does not parse",
            ResultCode::UnsupportedVersion => "ticket version not 1",
            ResultCode::UnknownKeyOffset => "the key epoch is not one the pile holds",
            ResultCode::WrongCharger => "the ticket is for another pile",
            ResultCode::BadTicket => "the ticket does not open (forged, modified, wrong key)",
            ResultCode::NotYetValid => "before not_before (beyond the skew tolerance)",
            ResultCode::Expired => "after not_after (beyond the skew tolerance)",
            ResultCode::Replayed => "the ticket id has been used before",
            ResultCode::ReplayCacheFull => "the pile cannot record more tickets until some expire",
            ResultCode::HandshakeFailed => "Noise message 1 does not verify",
            ResultCode::ConfirmFailed => "AuthConfirm does not verify or echo the challenge",
            ResultCode::Timeout => "AuthConfirm did not arrive in time",
            ResultCode::TooManyAttempts => "the pile allows 3 attempts per session",
        }
    }
}

impl fmt::Display for ResultCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (0x{:02X}): {}",
            self.name(),
            self.as_u8(),
            self.meaning()
        )
    }
}

impl std::error::Error for ResultCode {}

/// The type byte of an authentication message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MessageType {
    Request = 0x01,
    Challenge = 0x02,
    Confirm = 0x03,
    Result = 0x04,
}

impl MessageType {
    pub fn from_u8(byte: u8) -> Option<MessageType> {
        match byte {
            0x01 => Some(MessageType::Request),
            0x02 => Some(MessageType::Challenge),
            0x03 => Some(MessageType::Confirm),
            0x04 => Some(MessageType::Result),
            _ => None,
        }
    }
}

impl fmt::Display for MessageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MessageType::Request => "AuthRequest",
            MessageType::Challenge => "AuthChallenge",
            MessageType::Confirm => "AuthConfirm",
            MessageType::Result => "AuthResult",
        })
    }
}

/// Why bytes are not an authentication message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("empty authentication message")]
    Empty,
    #[error("unknown authentication message type 0x{0:02X}")]
    UnknownType(u8),
    #[error("{message} is {got} bytes, expected {expected}")]
    Length {
        message: MessageType,
        expected: &'static str,
        got: usize,
    },
    #[error("AuthRequest carries a ticket of version {version}; this pile supports version 1")]
    UnsupportedVersion { version: u8 },
    #[error("AuthResult carries unknown result code 0x{code:02X}")]
    UnknownResultCode { code: u8 },
}

impl ParseError {
    /// The code a pile answers with.
    pub fn code(&self) -> ResultCode {
        match self {
            ParseError::UnsupportedVersion { .. } => ResultCode::UnsupportedVersion,
            _ => ResultCode::Malformed,
        }
    }
}

impl From<ParseError> for ResultCode {
    fn from(e: ParseError) -> ResultCode {
        e.code()
    }
}

/// One authentication message (PGN 0xEF00).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthMessage {
    /// Vehicle → pile: the ticket and Noise message 1.
    Request {
        ticket: [u8; TICKET_LEN],
        noise: [u8; NOISE_MSG1_LEN],
    },
    /// Pile → vehicle: Noise message 2, carrying the challenge.
    Challenge { noise: [u8; NOISE_MSG2_LEN] },
    /// Vehicle → pile: the key confirmation, a Noise transport message.
    Confirm {
        transport: [u8; CONFIRM_TRANSPORT_LEN],
    },
    /// Pile → vehicle: the result, authenticated once the handshake reached
    /// transport mode.
    Result {
        code: ResultCode,
        transport: Option<[u8; RESULT_TRANSPORT_LEN]>,
    },
}

impl AuthMessage {
    pub fn message_type(&self) -> MessageType {
        match self {
            AuthMessage::Request { .. } => MessageType::Request,
            AuthMessage::Challenge { .. } => MessageType::Challenge,
            AuthMessage::Confirm { .. } => MessageType::Confirm,
            AuthMessage::Result { .. } => MessageType::Result,
        }
    }

    /// Parse one reassembled message. Every length is exact (§4.4).
    pub fn parse(data: &[u8]) -> Result<AuthMessage, ParseError> {
        let (&type_byte, body) = data.split_first().ok_or(ParseError::Empty)?;
        let message = MessageType::from_u8(type_byte).ok_or(ParseError::UnknownType(type_byte))?;
        let length = |expected| ParseError::Length {
            message,
            expected,
            got: data.len(),
        };
        match message {
            MessageType::Request => {
                if data.len() != AUTH_REQUEST_LEN {
                    // A later ticket version may change the length (up to
                    // 160 bytes); report the version rather than the length.
                    return Err(match body.first() {
                        Some(&version) if version != 1 && data.len() <= AUTH_REQUEST_MAX_LEN => {
                            ParseError::UnsupportedVersion { version }
                        }
                        _ => length("150"),
                    });
                }
                let (ticket, noise) = body.split_at(TICKET_LEN);
                Ok(AuthMessage::Request {
                    ticket: ticket.try_into().map_err(|_| length("150"))?,
                    noise: noise.try_into().map_err(|_| length("150"))?,
                })
            }
            MessageType::Challenge => Ok(AuthMessage::Challenge {
                noise: body.try_into().map_err(|_| length("65"))?,
            }),
            MessageType::Confirm => Ok(AuthMessage::Confirm {
                transport: body.try_into().map_err(|_| length("46"))?,
            }),
            MessageType::Result => {
                let (&code, rest) = body.split_first().ok_or(length("2 or 19"))?;
                let transport = match rest.len() {
                    0 => None,
                    RESULT_TRANSPORT_LEN => Some(rest.try_into().map_err(|_| length("2 or 19"))?),
                    _ => return Err(length("2 or 19")),
                };
                let code =
                    ResultCode::from_u8(code).ok_or(ParseError::UnknownResultCode { code })?;
                Ok(AuthMessage::Result { code, transport })
            }
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![self.message_type() as u8];
        match self {
            AuthMessage::Request { ticket, noise } => {
                out.extend_from_slice(ticket);
                out.extend_from_slice(noise);
            }
            AuthMessage::Challenge { noise } => out.extend_from_slice(noise),
            AuthMessage::Confirm { transport } => out.extend_from_slice(transport),
            AuthMessage::Result { code, transport } => {
                out.push(code.as_u8());
                if let Some(t) = transport {
                    out.extend_from_slice(t);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sizes_match_the_spec_table() {
        assert_eq!(AUTH_REQUEST_LEN, 150);
        assert_eq!(AUTH_CHALLENGE_LEN, 65);
        assert_eq!(AUTH_CONFIRM_LEN, 46);
        assert_eq!((AUTH_RESULT_PLAIN_LEN, AUTH_RESULT_SEALED_LEN), (2, 19));
        // J1939 TP packets carry 7 bytes each.
        assert_eq!(AUTH_REQUEST_LEN.div_ceil(7), 22);
        assert_eq!(AUTH_CHALLENGE_LEN.div_ceil(7), 10);
        assert_eq!(AUTH_CONFIRM_LEN.div_ceil(7), 7);
    }

    #[test]
    fn codes_round_trip_and_display_name_and_meaning() {
        for (i, code) in ResultCode::ALL.iter().enumerate() {
            assert_eq!(code.as_u8() as usize, i);
            assert_eq!(ResultCode::from_u8(code.as_u8()), Some(*code));
        }
        assert_eq!(ResultCode::from_u8(0x0E), None);
        assert_eq!(
            ResultCode::Replayed.to_string(),
            "Replayed (0x08): the ticket id has been used before"
        );
    }

    #[test]
    fn wrong_lengths_and_types_are_malformed() {
        let cases: &[&[u8]] = &[
            &[],
            &[0x00],
            &[0x05, 0, 0],
            &[0x02; 64],
            &[0x03; 47],
            &[0x04],
            &[0x04, 0x00, 0x00],
            &[0x04, 0x0E],
        ];
        for case in cases {
            let err = AuthMessage::parse(case).expect_err("must not parse");
            assert_eq!(err.code(), ResultCode::Malformed, "{case:?}: {err}");
        }
        let mut request = vec![0x01, 0x01];
        request.resize(149, 0);
        assert!(matches!(
            AuthMessage::parse(&request),
            Err(ParseError::Length {
                message: MessageType::Request,
                got: 149,
                ..
            })
        ));
    }

    #[test]
    fn other_ticket_versions_are_unsupported_not_malformed() {
        let mut request = vec![0x01, 0x02];
        request.resize(160, 0);
        assert_eq!(
            AuthMessage::parse(&request),
            Err(ParseError::UnsupportedVersion { version: 2 })
        );
        request.push(0);
        assert_eq!(
            AuthMessage::parse(&request).map_err(|e| e.code()),
            Err(ResultCode::Malformed)
        );
    }

    fn arb_message() -> impl Strategy<Value = AuthMessage> {
        let code = (0u8..14).prop_map(|c| ResultCode::from_u8(c).expect("0..14 are codes"));
        prop_oneof![
            (any::<[u8; 32]>(), any::<[u8; 32]>()).prop_map(|(a, b)| {
                let mut ticket = [0u8; TICKET_LEN];
                let mut noise = [0u8; NOISE_MSG1_LEN];
                for (i, t) in ticket.iter_mut().enumerate() {
                    *t = a[i % 32] ^ (i as u8);
                }
                for (i, n) in noise.iter_mut().enumerate() {
                    *n = b[i % 32];
                }
                AuthMessage::Request { ticket, noise }
            }),
            any::<[u8; 32]>().prop_map(|a| {
                let mut noise = [0u8; NOISE_MSG2_LEN];
                noise[..32].copy_from_slice(&a);
                AuthMessage::Challenge { noise }
            }),
            any::<[u8; 32]>().prop_map(|a| {
                let mut transport = [0u8; CONFIRM_TRANSPORT_LEN];
                transport[..32].copy_from_slice(&a);
                AuthMessage::Confirm { transport }
            }),
            (
                code,
                proptest::option::of(any::<[u8; RESULT_TRANSPORT_LEN]>())
            )
                .prop_map(|(code, transport)| AuthMessage::Result { code, transport }),
        ]
    }

    proptest! {
        #[test]
        fn parse_never_panics(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = AuthMessage::parse(&data);
        }

        #[test]
        fn parse_never_panics_on_known_types(t in 1u8..=4, data in proptest::collection::vec(any::<u8>(), 0..170)) {
            let mut msg = vec![t];
            msg.extend_from_slice(&data);
            if let Ok(parsed) = AuthMessage::parse(&msg) {
                prop_assert_eq!(parsed.encode(), msg);
            }
        }

        #[test]
        fn encode_parse_round_trip(msg in arb_message()) {
            let bytes = msg.encode();
            let expected_len = match &msg {
                AuthMessage::Request { .. } => AUTH_REQUEST_LEN,
                AuthMessage::Challenge { .. } => AUTH_CHALLENGE_LEN,
                AuthMessage::Confirm { .. } => AUTH_CONFIRM_LEN,
                AuthMessage::Result { transport: None, .. } => AUTH_RESULT_PLAIN_LEN,
                AuthMessage::Result { transport: Some(_), .. } => AUTH_RESULT_SEALED_LEN,
            };
            prop_assert_eq!(bytes.len(), expected_len);
            prop_assert_eq!(AuthMessage::parse(&bytes), Ok(msg));
        }
    }
}
