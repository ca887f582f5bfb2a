//! The MQTT topic tree of the cloud link (`docs/protocol.md` §6.1).
//!
//! Every topic of one vehicle lives under `bmsgw/v1/{vehicle_id}/`, so a
//! broker ACL can confine a vehicle to its own subtree with one pattern. The
//! vehicle id is a [`VehicleId`], which can only hold characters that are safe
//! in a topic level and in an MQTT user name: no `/`, `+`, `#` or `$`.

use std::fmt;

/// The prefix shared by every topic, without the trailing `/`.
pub const PREFIX: &str = "bmsgw/v1";
/// The shared-subscription groups of the cloud identity service, one per
/// filter: a group shared by two filters has one delivery cursor in some
/// brokers (rumqttd 0.20), which then loses messages of one of them.
pub const CLOUD_REQUEST_GROUP: &str = "bmsgw-cloud-req";
pub const CLOUD_EVENTS_GROUP: &str = "bmsgw-cloud-events";
/// The cloud's shared subscription to identity requests.
pub const CLOUD_REQUEST_FILTER: &str = "$share/bmsgw-cloud-req/bmsgw/v1/+/identity/req";
/// The cloud's shared subscription to vehicle events.
pub const CLOUD_EVENTS_FILTER: &str = "$share/bmsgw-cloud-events/bmsgw/v1/+/events";
/// The cloud's subscription to owner approvals. Not shared: every instance
/// sees every approval, and the one holding the pending request acts on it.
pub const CLOUD_APPROVAL_FILTER: &str = "bmsgw/v1/+/approval";

/// The longest vehicle id, in characters (all ASCII).
pub const VEHICLE_ID_MAX_LEN: usize = 64;

/// A vehicle's id: 1 to 64 characters of `[A-Za-z0-9_-]`.
///
/// It names the vehicle's topic subtree and is its MQTT user name (the CN of
/// its client certificate), so it can only be built valid.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct VehicleId(String);

/// Why a string is not a [`VehicleId`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VehicleIdError {
    #[error("a vehicle id must not be empty")]
    Empty,
    #[error("a vehicle id has at most {VEHICLE_ID_MAX_LEN} characters; this one has {len}")]
    TooLong { len: usize },
    #[error(
        "a vehicle id may hold only A-Z, a-z, 0-9, '_' and '-'; found {found:?} at position {position}"
    )]
    BadCharacter { found: char, position: usize },
}

impl VehicleId {
    pub fn parse(s: &str) -> Result<VehicleId, VehicleIdError> {
        Self::check(s)?;
        Ok(VehicleId(s.to_owned()))
    }

    fn check(s: &str) -> Result<(), VehicleIdError> {
        if s.is_empty() {
            return Err(VehicleIdError::Empty);
        }
        if let Some((position, found)) = s
            .chars()
            .enumerate()
            .find(|(_, c)| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
        {
            return Err(VehicleIdError::BadCharacter { found, position });
        }
        // All ASCII from here, so bytes are characters.
        if s.len() > VEHICLE_ID_MAX_LEN {
            return Err(VehicleIdError::TooLong { len: s.len() });
        }
        Ok(())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for VehicleId {
    type Error = VehicleIdError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::check(&s)?;
        Ok(VehicleId(s))
    }
}

impl From<VehicleId> for String {
    fn from(id: VehicleId) -> String {
        id.0
    }
}

impl std::str::FromStr for VehicleId {
    type Err = VehicleIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        VehicleId::parse(s)
    }
}

impl fmt::Display for VehicleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for VehicleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VehicleId({})", self.0)
    }
}

impl AsRef<str> for VehicleId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// The last levels of a topic under `bmsgw/v1/{vehicle_id}/`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TopicKind {
    /// `identity/req`: vehicle → cloud.
    IdentityRequest,
    /// `identity/resp`: cloud → vehicle, answering a request.
    IdentityResponse,
    /// `vouchers`: cloud → vehicle, pushed voucher batches and revocations.
    Vouchers,
    /// `events`: vehicle → cloud, session records from the outbox.
    Events,
    /// `approval`: owner's app → cloud.
    Approval,
}

impl TopicKind {
    pub const ALL: [TopicKind; 5] = [
        TopicKind::IdentityRequest,
        TopicKind::IdentityResponse,
        TopicKind::Vouchers,
        TopicKind::Events,
        TopicKind::Approval,
    ];

    /// The topic levels after the vehicle id.
    pub fn suffix(self) -> &'static str {
        match self {
            TopicKind::IdentityRequest => "identity/req",
            TopicKind::IdentityResponse => "identity/resp",
            TopicKind::Vouchers => "vouchers",
            TopicKind::Events => "events",
            TopicKind::Approval => "approval",
        }
    }

    /// The full topic of this kind for `vehicle`.
    pub fn topic(self, vehicle: &VehicleId) -> String {
        format!("{PREFIX}/{vehicle}/{}", self.suffix())
    }
}

impl fmt::Display for TopicKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.suffix())
    }
}

pub fn identity_req(vehicle: &VehicleId) -> String {
    TopicKind::IdentityRequest.topic(vehicle)
}

pub fn identity_resp(vehicle: &VehicleId) -> String {
    TopicKind::IdentityResponse.topic(vehicle)
}

pub fn vouchers(vehicle: &VehicleId) -> String {
    TopicKind::Vouchers.topic(vehicle)
}

pub fn events(vehicle: &VehicleId) -> String {
    TopicKind::Events.topic(vehicle)
}

pub fn approval(vehicle: &VehicleId) -> String {
    TopicKind::Approval.topic(vehicle)
}

/// The filters the cloud identity service subscribes to.
pub fn cloud_filters() -> [&'static str; 3] {
    [
        CLOUD_REQUEST_FILTER,
        CLOUD_EVENTS_FILTER,
        CLOUD_APPROVAL_FILTER,
    ]
}

/// Why an incoming topic is not one of ours. The topic is echoed (cut to 100
/// characters) because it names what was wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("topic {topic:?} is not under {PREFIX}/")]
    NotOurs { topic: String },
    #[error("topic {topic:?}: bad vehicle id: {source}")]
    VehicleId {
        topic: String,
        #[source]
        source: VehicleIdError,
    },
    #[error(
        "topic {topic:?}: unknown kind; expected identity/req, identity/resp, vouchers, events or approval"
    )]
    UnknownKind { topic: String },
}

fn shown(topic: &str) -> String {
    topic.chars().take(100).collect()
}

/// Split an incoming topic into its vehicle and kind.
pub fn parse(topic: &str) -> Result<(VehicleId, TopicKind), TopicError> {
    let rest = topic
        .strip_prefix(PREFIX)
        .and_then(|r| r.strip_prefix('/'))
        .ok_or_else(|| TopicError::NotOurs {
            topic: shown(topic),
        })?;
    let (id, suffix) = rest
        .split_once('/')
        .ok_or_else(|| TopicError::UnknownKind {
            topic: shown(topic),
        })?;
    let vehicle = VehicleId::parse(id).map_err(|source| TopicError::VehicleId {
        topic: shown(topic),
        source,
    })?;
    let kind = TopicKind::ALL
        .into_iter()
        .find(|k| k.suffix() == suffix)
        .ok_or_else(|| TopicError::UnknownKind {
            topic: shown(topic),
        })?;
    Ok((vehicle, kind))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn vehicle_id_strategy() -> impl Strategy<Value = VehicleId> {
        "[A-Za-z0-9_-]{1,64}"
            .prop_map(|s| VehicleId::parse(&s).expect("the regex matches the rule"))
    }

    #[test]
    fn vehicle_id_rules() {
        assert_eq!(
            VehicleId::parse("veh-a_01").map(|v| v.to_string()),
            Ok("veh-a_01".into())
        );
        assert!(VehicleId::parse(&"x".repeat(64)).is_ok());
        assert_eq!(VehicleId::parse(""), Err(VehicleIdError::Empty));
        assert_eq!(
            VehicleId::parse(&"x".repeat(65)),
            Err(VehicleIdError::TooLong { len: 65 })
        );
        for (bad, c, position) in [
            ("a/b", '/', 1),
            ("+", '+', 0),
            ("ab#", '#', 2),
            ("$sys", '$', 0),
            ("a b", ' ', 1),
            ("é", 'é', 0),
        ] {
            assert_eq!(
                VehicleId::parse(bad),
                Err(VehicleIdError::BadCharacter { found: c, position }),
                "{bad}"
            );
        }
    }

    #[test]
    fn vehicle_id_serde_validates() {
        let mut buf = Vec::new();
        ciborium::into_writer(&"veh-a", &mut buf).expect("writes to a Vec");
        let id: VehicleId = ciborium::from_reader(&buf[..]).expect("valid");
        assert_eq!(id.as_str(), "veh-a");
        buf.clear();
        ciborium::into_writer(&"veh/a", &mut buf).expect("writes to a Vec");
        let err = ciborium::from_reader::<VehicleId, _>(&buf[..]).expect_err("invalid");
        assert!(err.to_string().contains("'/'"), "{err}");
    }

    #[test]
    fn builders_and_filters() {
        let v = VehicleId::parse("veh-a").expect("valid");
        assert_eq!(identity_req(&v), "bmsgw/v1/veh-a/identity/req");
        assert_eq!(identity_resp(&v), "bmsgw/v1/veh-a/identity/resp");
        assert_eq!(vouchers(&v), "bmsgw/v1/veh-a/vouchers");
        assert_eq!(events(&v), "bmsgw/v1/veh-a/events");
        assert_eq!(approval(&v), "bmsgw/v1/veh-a/approval");
        assert_eq!(
            cloud_filters(),
            [
                "$share/bmsgw-cloud-req/bmsgw/v1/+/identity/req",
                "$share/bmsgw-cloud-events/bmsgw/v1/+/events",
                "bmsgw/v1/+/approval",
            ]
        );
        assert!(
            CLOUD_REQUEST_FILTER.starts_with(&format!("$share/{CLOUD_REQUEST_GROUP}/{PREFIX}/"))
        );
        assert!(CLOUD_EVENTS_FILTER.starts_with(&format!("$share/{CLOUD_EVENTS_GROUP}/{PREFIX}/")));
    }

    #[test]
    fn parse_refuses_what_is_not_ours() {
        for (topic, want) in [
            ("bmsgw/v2/veh-a/events", "not under"),
            ("bmsgw/v1", "not under"),
            ("bmsgw/v1/veh-a", "unknown kind"),
            ("bmsgw/v1/veh-a/identity", "unknown kind"),
            ("bmsgw/v1/veh-a/events/x", "unknown kind"),
            ("bmsgw/v1/+/events", "bad vehicle id"),
            ("bmsgw/v1//events", "bad vehicle id"),
            ("$share/bmsgw-cloud/bmsgw/v1/veh-a/events", "not under"),
        ] {
            let err = parse(topic).expect_err(topic);
            assert!(err.to_string().contains(want), "{topic}: {err}");
        }
    }

    proptest! {
        #[test]
        fn every_built_topic_parses_back(v in vehicle_id_strategy(), k in 0usize..5) {
            let kind = TopicKind::ALL[k];
            prop_assert_eq!(parse(&kind.topic(&v)), Ok((v, kind)));
        }

        #[test]
        fn parse_never_panics(s in "\\PC*") {
            let _ = parse(&s);
            let _ = VehicleId::parse(&s);
        }
    }
}
