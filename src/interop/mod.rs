//! Field interoperability: the ways real chargers and BMSs deviate from
//! GB/T 27930-2015 and SAE J1939-21, and what bmsgw does about each.
//!
//! The gateway sits between a vehicle's BMS and thousands of third-party
//! piles, and both sides of that link deviate from the standards in known
//! ways. Each side of a link has a [`Profile`]:
//! - [`Profile::Field`] (the default) acts on the one unambiguous reading of
//!   a known deviation, where that reading is safe, and counts it;
//! - [`Profile::Strict`] refuses the deviation with a [`Refusal`] that
//!   names it.
//!
//! Either way, what bmsgw itself sends is the standard (the one exception,
//! TP.CM_CTS bytes 4–5, is explained at [`crate::j1939::tp`]), and no
//! tolerance lets anything past the firewall's allowlist, its rate limits,
//! the recognition gate or authentication. `docs/interop.md` has the table
//! of deviations, what each profile does, and the tests that show it.
//!
//! This module only names the deviations and counts them; the protocol
//! cores that meet them decide ([`crate::j1939::tp`] for the transport,
//! [`crate::gbt27930::field`] for GB/T messages).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// How one side of a link treats its peer's deviations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Profile {
    /// Refuse every known deviation, naming it.
    Strict,
    /// Act on the unambiguous reading of known deviations, and count them.
    #[default]
    Field,
}

impl Profile {
    pub fn is_strict(self) -> bool {
        self == Profile::Strict
    }

    pub fn name(self) -> &'static str {
        match self {
            Profile::Strict => "strict",
            Profile::Field => "field",
        }
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A profile name that is neither `strict` nor `field`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a compatibility profile; expected \"field\" or \"strict\"")]
pub struct ProfileError(pub String);

impl FromStr for Profile {
    type Err = ProfileError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "strict" => Ok(Profile::Strict),
            "field" => Ok(Profile::Field),
            other => Err(ProfileError(other.to_owned())),
        }
    }
}

/// One known deviation from GB/T 27930-2015 or J1939-21, as a peer shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Deviation {
    /// TP.CM_CTS bytes 4–5 (reserved, 0xFF) carry a packet interval.
    CtsPacketInterval,
    /// TP.CM_CTS bytes 6–8 hold 0xFFFFFF or 0x000000 instead of the PGN.
    CtsWithoutPgn,
    /// BCP sent before CRM(0xAA) (and not repeated after it).
    BcpBeforeRecognition,
    /// The BMS sends no BCL until it has seen the first CCS.
    BclWaitsForCcs,
    /// BEM reporting a CCS timeout before any CCS could have been due.
    EarlyCcsTimeout,
    /// Charging current counted positive: raw 4000 + 10·A instead of 4000 − 10·A.
    PositiveCurrent,
    /// BHM's maximum charging voltage is not a usable voltage (version
    /// bytes, or below the charger's minimum output).
    BhmImplausible,
    /// BCS as an 8-byte single frame instead of 9 bytes over TP.
    BcsSingleFrame,
}

impl Deviation {
    pub const ALL: [Deviation; 8] = [
        Deviation::CtsPacketInterval,
        Deviation::CtsWithoutPgn,
        Deviation::BcpBeforeRecognition,
        Deviation::BclWaitsForCcs,
        Deviation::EarlyCcsTimeout,
        Deviation::PositiveCurrent,
        Deviation::BhmImplausible,
        Deviation::BcsSingleFrame,
    ];

    /// The name used in logs, `bmsgw status`, session records and
    /// `docs/interop.md`.
    pub fn name(self) -> &'static str {
        match self {
            Deviation::CtsPacketInterval => "cts-packet-interval",
            Deviation::CtsWithoutPgn => "cts-without-pgn",
            Deviation::BcpBeforeRecognition => "bcp-before-recognition",
            Deviation::BclWaitsForCcs => "bcl-waits-for-ccs",
            Deviation::EarlyCcsTimeout => "early-ccs-timeout",
            Deviation::PositiveCurrent => "positive-current",
            Deviation::BhmImplausible => "bhm-implausible",
            Deviation::BcsSingleFrame => "bcs-single-frame",
        }
    }

    /// What the peer did, in a few words.
    pub fn what(self) -> &'static str {
        match self {
            Deviation::CtsPacketInterval => {
                "TP.CM_CTS bytes 4-5 carry a packet interval (J1939-21: reserved, 0xFF)"
            }
            Deviation::CtsWithoutPgn => {
                "TP.CM_CTS without the PGN (bytes 6-8 all 0xFF or all 0x00)"
            }
            Deviation::BcpBeforeRecognition => "BCP sent before CRM(0xAA)",
            Deviation::BclWaitsForCcs => "the BMS sends no BCL until the first CCS",
            Deviation::EarlyCcsTimeout => "BEM with a CCS timeout before any CCS was due",
            Deviation::PositiveCurrent => {
                "charging current counted positive (raw 4000 + 10*A; GB/T: 4000 - 10*A)"
            }
            Deviation::BhmImplausible => "BHM's maximum charging voltage is not a usable voltage",
            Deviation::BcsSingleFrame => "BCS as an 8-byte single frame (GB/T: 9 bytes over TP)",
        }
    }

    pub fn from_name(name: &str) -> Option<Deviation> {
        Deviation::ALL.into_iter().find(|d| d.name() == name)
    }
}

impl fmt::Display for Deviation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A deviation the strict profile would not accept, with what exactly was
/// seen: the one-line reason a session fails with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub deviation: Deviation,
    pub detail: String,
}

impl Refusal {
    pub fn new(deviation: Deviation, detail: impl Into<String>) -> Self {
        Refusal {
            deviation,
            detail: detail.into(),
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "deviation {} refused by the strict profile: {} ({})",
            self.deviation,
            self.detail,
            self.deviation.what()
        )
    }
}

/// How often each deviation was seen. Serialized as a map from
/// [`Deviation::name`] to the count, holding only the kinds seen; names a
/// newer peer sends that this build does not know are dropped on reading.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviationCounts(BTreeMap<Deviation, u64>);

/// The most distinct names a serialized [`DeviationCounts`] may hold.
pub const MAX_DEVIATION_KINDS: usize = 64;

impl DeviationCounts {
    pub fn add(&mut self, d: Deviation) {
        let n = self.0.entry(d).or_default();
        *n = n.saturating_add(1);
    }

    pub fn get(&self, d: Deviation) -> u64 {
        self.0.get(&d).copied().unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The kinds seen, with their counts, in a fixed order.
    pub fn iter(&self) -> impl Iterator<Item = (Deviation, u64)> + '_ {
        self.0.iter().map(|(d, n)| (*d, *n))
    }
}

impl fmt::Display for DeviationCounts {
    /// `cts-packet-interval×3, positive-current×1`, or `none`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("none");
        }
        for (i, (d, n)) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{d}×{n}")?;
        }
        Ok(())
    }
}

impl serde::Serialize for DeviationCounts {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (d, n) in self.iter() {
            m.serialize_entry(d.name(), &n)?;
        }
        m.end()
    }
}

impl<'de> serde::Deserialize<'de> for DeviationCounts {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = DeviationCounts;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(
                    f,
                    "a map of at most {MAX_DEVIATION_KINDS} deviation names to counts"
                )
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut out = DeviationCounts::default();
                let mut seen = 0usize;
                while let Some((name, n)) = map.next_entry::<String, u64>()? {
                    seen += 1;
                    if seen > MAX_DEVIATION_KINDS {
                        return Err(serde::de::Error::invalid_length(seen, &self));
                    }
                    if let Some(d) = Deviation::from_name(&name) {
                        let e = out.0.entry(d).or_default();
                        *e = e.saturating_add(n);
                    }
                }
                Ok(out)
            }
        }
        d.deserialize_map(Visit)
    }
}

/// What one side of a link showed: deviations accepted (field profile) and
/// refused (strict profile).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SideDeviations {
    #[serde(default)]
    pub accepted: DeviationCounts,
    #[serde(default)]
    pub refused: DeviationCounts,
}

impl SideDeviations {
    pub fn is_empty(&self) -> bool {
        self.accepted.is_empty() && self.refused.is_empty()
    }

    /// Counts one deviation, accepted or refused.
    pub fn add(&mut self, d: Deviation, refused: bool) {
        if refused {
            self.refused.add(d);
        } else {
            self.accepted.add(d);
        }
    }
}

impl fmt::Display for SideDeviations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "accepted {}", self.accepted)?;
        if !self.refused.is_empty() {
            write!(f, "; refused {}", self.refused)?;
        }
        Ok(())
    }
}

/// The deviations of both peers of the gateway: the BMS and the pile.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LinkDeviations {
    #[serde(default)]
    pub bms: SideDeviations,
    #[serde(default)]
    pub pile: SideDeviations,
}

impl LinkDeviations {
    pub fn is_empty(&self) -> bool {
        self.bms.is_empty() && self.pile.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_are_unique() {
        for d in Deviation::ALL {
            assert_eq!(Deviation::from_name(d.name()), Some(d));
            assert!(!d.what().is_empty());
        }
        let mut names: Vec<_> = Deviation::ALL.iter().map(|d| d.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Deviation::ALL.len());
        assert_eq!(Deviation::from_name("no-such"), None);
    }

    #[test]
    fn profiles_parse_by_name_and_default_to_field() {
        assert_eq!("strict".parse(), Ok(Profile::Strict));
        assert_eq!("field".parse(), Ok(Profile::Field));
        assert_eq!(Profile::default(), Profile::Field);
        let e = "lenient".parse::<Profile>().unwrap_err();
        assert!(e.to_string().contains("\"lenient\""), "{e}");
    }

    #[test]
    fn counts_print_and_serialize_by_name() {
        let mut c = DeviationCounts::default();
        assert_eq!(c.to_string(), "none");
        c.add(Deviation::PositiveCurrent);
        c.add(Deviation::CtsPacketInterval);
        c.add(Deviation::CtsPacketInterval);
        assert_eq!(c.to_string(), "cts-packet-interval×2, positive-current×1");
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(json, r#"{"cts-packet-interval":2,"positive-current":1}"#);
        let back: DeviationCounts = serde_json::from_str(&json).unwrap();
        assert_eq!(back, c);
        // A newer peer's unknown kind is dropped, not an error.
        let back: DeviationCounts =
            serde_json::from_str(r#"{"from-the-future":7,"positive-current":1}"#).unwrap();
        assert_eq!(back.get(Deviation::PositiveCurrent), 1);
        assert_eq!(back.iter().count(), 1);
    }

    #[test]
    fn too_many_names_are_refused() {
        let many: BTreeMap<String, u64> = (0..=MAX_DEVIATION_KINDS)
            .map(|i| (format!("k{i}"), 1))
            .collect();
        let json = serde_json::to_string(&many).unwrap();
        assert!(serde_json::from_str::<DeviationCounts>(&json).is_err());
    }

    #[test]
    fn a_refusal_names_the_deviation() {
        let r = Refusal::new(Deviation::BcpBeforeRecognition, "BCP while CRM was 0x00");
        let text = r.to_string();
        assert!(
            text.starts_with("deviation bcp-before-recognition refused"),
            "{text}"
        );
        assert!(text.contains("BCP while CRM was 0x00"), "{text}");
    }
}
