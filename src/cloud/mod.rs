//! The cloud side of the gateway: what it says to the OEM cloud, how that is
//! sealed end to end, and the MQTT link that carries it.
//!
//! - [`messages`]: the CBOR payloads (pure);
//! - [`envelope`]: the HPKE envelope around every payload (pure);
//! - [`topics`]: the topic tree `bmsgw/v1/{vehicle_id}/…` (pure);
//! - [`exchange`]: the vehicle's identity request and the checks on its answer (sans-IO);
//! - [`tls`]: the rustls client configuration (TLS 1.3, mutual TLS);
//! - [`link`]: the MQTT v5 link (rumqttc);
//! - [`client`]: the vehicle's identity client (an exchange over the link);
//! - [`outbox`]: session records through the durable outbox to the events topic;
//! - [`ticket_file`]: a sealed push carried by another carrier (phone, head unit).

pub mod client;
pub mod envelope;
pub mod exchange;
pub mod link;
pub mod messages;
pub mod outbox;
pub mod ticket_file;
pub mod tls;
pub mod topics;
