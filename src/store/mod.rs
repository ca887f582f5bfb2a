//! Durable state in redb (being written).
