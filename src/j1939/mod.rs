//! SAE J1939: the identifier codec and the transport protocol, both sans-IO.
//!
//! GB/T 27930 rides on J1939-21: single frames for messages up to 8 bytes and
//! the transport protocol (RTS/CTS, BAM) for longer ones such as BRM and BCP.
//! [`Transport`] takes part in transfers for one address; [`Monitor`] only
//! watches a bus and reassembles what it sees.

mod id;
pub mod monitor;
pub mod tp;

pub use id::{Address, IdError, J1939Id, Pgn, Priority};
pub use monitor::{IncompleteReason, Monitor, MonitorEvent};
pub use tp::{AbortReason, J1939Message, MAX_TP_LEN, TpConfig, TpError, TpEvent, Transport};
