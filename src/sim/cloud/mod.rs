//! The reference cloud identity service (being written).
