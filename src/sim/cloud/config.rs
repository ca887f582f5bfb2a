//! `cloud.toml`, the configuration of `bmsgw sim cloud --config F`.
//!
//! ```toml
//! hpke_key = "cloud-hpke.key"        # the cloud's X25519 secret, mode 0600
//! vehicles = "vehicles.toml"         # see sim::cloud::registry
//! piles = "piles.toml"
//! grant_lifetime_s = 300             # online ticket validity
//! grant_energy_cap_wh = 0            # 0 = no cap
//! vouchers_per_grant = 0             # most vouchers with a grant (<= 64); caps want_vouchers
//! voucher_lifetime_s = 604800        # 7 days
//! voucher_energy_cap_wh = 30000
//! approval_deadline_s = 120          # how long a grant waits for the owner
//! max_request_age_s = 300            # requests whose time is further from ours are stale
//!
//! [broker]
//! host = "127.0.0.1"
//! port = 8883
//! client_id = "bmsgw-cloud-1"        # the certificate's CN
//!
//! [tls]
//! ca = "ca.pem"
//! cert = "cloud-1.pem"               # one certificate per instance
//! key = "cloud-1.key"
//! ```
//!
//! Paths are relative to the directory of `cloud.toml`. Unknown keys are
//! refused, so a misspelt setting is not silently left at its default.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::registry::{self, Registry, RegistryError};
use crate::cloud::envelope::{KeyError, KeyPair};
use crate::cloud::messages::MAX_VOUCHERS;

/// What the identity service decides with, apart from the registries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloudSettings {
    pub grant_lifetime_s: u32,
    pub grant_energy_cap_wh: u32,
    pub vouchers_per_grant: u16,
    pub voucher_lifetime_s: u32,
    pub voucher_energy_cap_wh: u32,
    pub approval_deadline_s: u32,
    pub max_request_age_s: u32,
}

impl Default for CloudSettings {
    fn default() -> Self {
        CloudSettings {
            grant_lifetime_s: 300,
            grant_energy_cap_wh: 0,
            vouchers_per_grant: 0,
            voucher_lifetime_s: 7 * 24 * 3600,
            voucher_energy_cap_wh: 30_000,
            approval_deadline_s: 120,
            max_request_age_s: 300,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    pub host: String,
    pub port: u16,
    /// The certificate's CN (`bmsgw-cloud-{n}`): the production broker
    /// takes the CN as the client id whatever is sent here
    /// (`use_username_as_clientid`), so each instance needs a certificate
    /// of its own; this names the session on other brokers and in logs.
    #[serde(default = "default_client_id")]
    pub client_id: String,
}

fn default_client_id() -> String {
    crate::sim::pki::cloud_identity(1)
}

/// The TLS client files (mutual TLS to the broker).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsPaths {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// `cloud.toml`, with every path resolved against its directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloudConfig {
    pub broker: BrokerConfig,
    pub tls: TlsPaths,
    pub hpke_key: PathBuf,
    pub vehicles: PathBuf,
    pub piles: PathBuf,
    pub settings: CloudSettings,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    broker: BrokerConfig,
    tls: TlsPaths,
    hpke_key: PathBuf,
    vehicles: PathBuf,
    piles: PathBuf,
    grant_lifetime_s: Option<u32>,
    grant_energy_cap_wh: Option<u32>,
    vouchers_per_grant: Option<u16>,
    voucher_lifetime_s: Option<u32>,
    voucher_energy_cap_wh: Option<u32>,
    approval_deadline_s: Option<u32>,
    max_request_age_s: Option<u32>,
}

/// Why `cloud.toml` could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    File(#[from] RegistryError),
    #[error("{path}: `{key}` {problem}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        problem: String,
    },
}

impl CloudConfig {
    pub fn load(path: &Path) -> Result<CloudConfig, ConfigError> {
        let raw: RawConfig = registry::read_toml(path)?;
        let dir = registry::base_dir(path);
        let d = CloudSettings::default();
        let settings = CloudSettings {
            grant_lifetime_s: raw.grant_lifetime_s.unwrap_or(d.grant_lifetime_s),
            grant_energy_cap_wh: raw.grant_energy_cap_wh.unwrap_or(d.grant_energy_cap_wh),
            vouchers_per_grant: raw.vouchers_per_grant.unwrap_or(d.vouchers_per_grant),
            voucher_lifetime_s: raw.voucher_lifetime_s.unwrap_or(d.voucher_lifetime_s),
            voucher_energy_cap_wh: raw.voucher_energy_cap_wh.unwrap_or(d.voucher_energy_cap_wh),
            approval_deadline_s: raw.approval_deadline_s.unwrap_or(d.approval_deadline_s),
            max_request_age_s: raw.max_request_age_s.unwrap_or(d.max_request_age_s),
        };
        let invalid = |key, problem: &str| ConfigError::Invalid {
            path: path.to_owned(),
            key,
            problem: problem.to_owned(),
        };
        for (key, value) in [
            ("grant_lifetime_s", settings.grant_lifetime_s),
            ("voucher_lifetime_s", settings.voucher_lifetime_s),
            ("approval_deadline_s", settings.approval_deadline_s),
            ("max_request_age_s", settings.max_request_age_s),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be at least 1 (seconds)"));
            }
        }
        if usize::from(settings.vouchers_per_grant) > MAX_VOUCHERS {
            return Err(invalid(
                "vouchers_per_grant",
                &format!("must be at most {MAX_VOUCHERS} (one grant's batch)"),
            ));
        }
        if raw.broker.client_id.is_empty() {
            return Err(invalid("broker.client_id", "must not be empty"));
        }
        Ok(CloudConfig {
            broker: raw.broker,
            tls: TlsPaths {
                ca: dir.join(raw.tls.ca),
                cert: dir.join(raw.tls.cert),
                key: dir.join(raw.tls.key),
            },
            hpke_key: dir.join(raw.hpke_key),
            vehicles: dir.join(raw.vehicles),
            piles: dir.join(raw.piles),
            settings,
        })
    }

    /// The cloud's HPKE key pair (the secret file must be mode 0600).
    pub fn load_keys(&self) -> Result<KeyPair, KeyError> {
        KeyPair::load(&self.hpke_key)
    }

    pub fn load_registry(&self) -> Result<Registry, RegistryError> {
        Registry::load(&self.vehicles, &self.piles)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "hpke_key = \"cloud-hpke.key\"\nvehicles = \"vehicles.toml\"\npiles = \"p/piles.toml\"\n\
                           [broker]\nhost = \"127.0.0.1\"\nport = 8883\n\
                           [tls]\nca = \"ca.pem\"\ncert = \"cloud.pem\"\nkey = \"/abs/cloud.key\"\n";

    fn load(text: &str) -> (tempfile::TempDir, Result<CloudConfig, ConfigError>) {
        let dir = tempfile::tempdir().expect("temp dir");
        let p = dir.path().join("cloud.toml");
        std::fs::write(&p, text).expect("written");
        let r = CloudConfig::load(&p);
        (dir, r)
    }

    #[test]
    fn minimal_config_gets_defaults_and_resolved_paths() {
        let (dir, r) = load(MINIMAL);
        let c = r.expect("loads");
        assert_eq!(c.settings, CloudSettings::default());
        assert_eq!(c.settings.voucher_lifetime_s, 604_800);
        assert_eq!(
            c.broker,
            BrokerConfig {
                host: "127.0.0.1".into(),
                port: 8883,
                client_id: "bmsgw-cloud-1".into()
            }
        );
        assert_eq!(c.hpke_key, dir.path().join("cloud-hpke.key"));
        assert_eq!(c.piles, dir.path().join("p/piles.toml"));
        assert_eq!(c.tls.ca, dir.path().join("ca.pem"));
        assert_eq!(c.tls.key, PathBuf::from("/abs/cloud.key"));
    }

    #[test]
    fn settings_are_read() {
        let text = format!(
            "grant_lifetime_s = 60\nvouchers_per_grant = 4\nvoucher_lifetime_s = 3600\nvoucher_energy_cap_wh = 5000\n\
             grant_energy_cap_wh = 80000\napproval_deadline_s = 30\nmax_request_age_s = 10\n{MINIMAL}"
        );
        let (_dir, r) = load(&text);
        let s = r.expect("loads").settings;
        assert_eq!(
            s,
            CloudSettings {
                grant_lifetime_s: 60,
                grant_energy_cap_wh: 80_000,
                vouchers_per_grant: 4,
                voucher_lifetime_s: 3600,
                voucher_energy_cap_wh: 5000,
                approval_deadline_s: 30,
                max_request_age_s: 10,
            }
        );
    }

    #[test]
    fn errors_name_the_key_and_the_file() {
        for (text, want) in [
            (
                format!("grant_lifetime_s = 0\n{MINIMAL}"),
                "`grant_lifetime_s` must be at least 1",
            ),
            (
                format!("vouchers_per_grant = 65\n{MINIMAL}"),
                "`vouchers_per_grant` must be at most 64",
            ),
            (format!("grant_lifetime = 60\n{MINIMAL}"), "grant_lifetime"),
            (
                format!("grant_lifetime_s = \"long\"\n{MINIMAL}"),
                "grant_lifetime_s",
            ),
            (MINIMAL.replace("port = 8883", "port = 70000"), "port"),
            (
                MINIMAL.replace("hpke_key = \"cloud-hpke.key\"\n", ""),
                "hpke_key",
            ),
            (
                MINIMAL.replace("port = 8883\n", "port = 8883\nclient_id = \"\"\n"),
                "`broker.client_id` must not be empty",
            ),
            ("not = [toml".to_string(), "cloud.toml"),
        ] {
            let (_dir, r) = load(&text);
            let err = r.expect_err(&text).to_string();
            assert!(err.contains("cloud.toml"), "{err}");
            assert!(err.contains(want), "{err}\nwanted: {want}");
        }
    }
}
