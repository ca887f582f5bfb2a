//! The cloud's registries: which vehicles it serves (and how), and the root
//! keys of the piles it issues tickets for.
//!
//! `vehicles.toml`:
//!
//! ```toml
//! [[vehicle]]
//! id = "veh-a"                 # 1-64 of [A-Za-z0-9_-]
//! hpke_public = "64 hex"       # the vehicle's X25519 public key
//! owner_public = "64 hex"      # the owner app's X25519 key; needed for approval = "required"
//! approval = "none"            # or "required" (default "none")
//! revoked = false              # default false
//! ```
//!
//! `piles.toml` (`root_key_file` is relative to the toml's directory, and
//! must be mode 0600):
//!
//! ```toml
//! [[pile]]
//! charger_number = 1
//! root_key_file = "pile-1-root.key"
//! key_offset = 1
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::auth::RootKey;
use crate::cloud::envelope::{KeyError, PublicKey};
use crate::cloud::topics::{VehicleId, VehicleIdError};
use crate::service::keyfile::{self, KeyFileError};

/// Whether a grant waits for the owner's approval.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApprovalPolicy {
    #[default]
    None,
    Required,
}

/// One vehicle the cloud serves.
#[derive(Clone, Debug)]
pub struct VehicleEntry {
    pub id: VehicleId,
    /// Requests and events must be sealed by it; answers are sealed to it.
    pub hpke_public: PublicKey,
    /// The owner app's key: approvals must be sealed by it.
    pub owner_public: Option<PublicKey>,
    pub approval: ApprovalPolicy,
    /// A revoked vehicle gets `Denied(revoked)` and nothing else.
    pub revoked: bool,
}

/// One pile the cloud issues tickets for.
#[derive(Clone, Debug)]
pub struct PileEntry {
    pub charger_number: u32,
    pub root: RootKey,
    /// The key epoch new tickets are sealed under.
    pub key_offset: u16,
}

/// What is wrong with one entry of a registry file.
#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    #[error("`id`: {0}")]
    Id(#[source] VehicleIdError),
    #[error("`id` {0} appears more than once")]
    DuplicateId(VehicleId),
    #[error(
        "`id` {0} is reserved: on the broker it would be a cloud instance (bmsgw-cloud…) or an owner's app (owner-…)"
    )]
    ReservedId(VehicleId),
    #[error("`hpke_public`: {0}")]
    HpkePublic(#[source] KeyError),
    #[error("`owner_public`: {0}")]
    OwnerPublic(#[source] KeyError),
    #[error(
        "approval = \"required\" needs `owner_public` (the owner app's X25519 public key, 64 hex digits)"
    )]
    OwnerMissing,
    #[error("`charger_number` {0} appears more than once")]
    DuplicatePile(u32),
    #[error("`root_key_file`: {0}")]
    RootKey(#[source] KeyFileError),
}

/// Why a registry file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {}", crate::service::config::one_line(&.source.to_string()))]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<config::ConfigError>,
    },
    #[error("{path}: {entry}: {source}")]
    Entry {
        path: PathBuf,
        /// Which entry, e.g. `[[vehicle]] #2 (id "veh-b")`.
        entry: String,
        #[source]
        source: EntryError,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VehiclesFile {
    #[serde(default)]
    vehicle: Vec<RawVehicle>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVehicle {
    id: String,
    hpke_public: String,
    #[serde(default)]
    owner_public: Option<String>,
    #[serde(default)]
    approval: ApprovalPolicy,
    #[serde(default)]
    revoked: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PilesFile {
    #[serde(default)]
    pile: Vec<RawPile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPile {
    charger_number: u32,
    root_key_file: PathBuf,
    key_offset: u16,
}

/// Read a TOML file through the `config` crate into `T`.
pub(crate) fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, RegistryError> {
    // Registries of many vehicles and piles stay far below 16 MiB.
    let bytes =
        crate::service::keyfile::read_bounded(path, 16 * 1024 * 1024).map_err(|source| {
            RegistryError::Read {
                path: path.to_owned(),
                source,
            }
        })?;
    let text = String::from_utf8(bytes).map_err(|_| RegistryError::Read {
        path: path.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text"),
    })?;
    config::Config::builder()
        .add_source(config::File::from_str(&text, config::FileFormat::Toml))
        .build()
        .and_then(|c| c.try_deserialize())
        .map_err(|source| RegistryError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })
}

/// The directory relative paths in `path` are resolved against.
pub(crate) fn base_dir(path: &Path) -> &Path {
    path.parent().unwrap_or(Path::new("."))
}

/// Vehicles by id and piles by charger number.
#[derive(Clone, Debug, Default)]
pub struct Registry {
    vehicles: HashMap<VehicleId, VehicleEntry>,
    piles: HashMap<u32, PileEntry>,
}

impl Registry {
    /// Load both files.
    pub fn load(vehicles_toml: &Path, piles_toml: &Path) -> Result<Registry, RegistryError> {
        let mut registry = Registry::default();
        for v in Self::load_vehicles(vehicles_toml)? {
            registry.insert_vehicle(v);
        }
        for p in Self::load_piles(piles_toml)? {
            registry.insert_pile(p);
        }
        Ok(registry)
    }

    pub fn load_vehicles(path: &Path) -> Result<Vec<VehicleEntry>, RegistryError> {
        let file: VehiclesFile = read_toml(path)?;
        let mut out: Vec<VehicleEntry> = Vec::with_capacity(file.vehicle.len());
        for (i, raw) in file.vehicle.into_iter().enumerate() {
            let entry = format!("[[vehicle]] #{} (id {:?})", i + 1, raw.id);
            let wrap = |source| RegistryError::Entry {
                path: path.to_owned(),
                entry: entry.clone(),
                source,
            };
            let id = VehicleId::parse(&raw.id).map_err(|e| wrap(EntryError::Id(e)))?;
            // The id is the certificate's CN, the broker's user name.
            if [
                crate::sim::pki::CLOUD_IDENTITY_PREFIX,
                crate::sim::pki::OWNER_PREFIX,
            ]
            .iter()
            .any(|p| id.as_str().starts_with(p))
            {
                return Err(wrap(EntryError::ReservedId(id)));
            }
            if out.iter().any(|v| v.id == id) {
                return Err(wrap(EntryError::DuplicateId(id)));
            }
            let hpke_public = PublicKey::from_hex(&raw.hpke_public)
                .map_err(|e| wrap(EntryError::HpkePublic(e)))?;
            let owner_public = raw
                .owner_public
                .as_deref()
                .map(PublicKey::from_hex)
                .transpose()
                .map_err(|e| wrap(EntryError::OwnerPublic(e)))?;
            if raw.approval == ApprovalPolicy::Required && owner_public.is_none() {
                return Err(wrap(EntryError::OwnerMissing));
            }
            out.push(VehicleEntry {
                id,
                hpke_public,
                owner_public,
                approval: raw.approval,
                revoked: raw.revoked,
            });
        }
        Ok(out)
    }

    pub fn load_piles(path: &Path) -> Result<Vec<PileEntry>, RegistryError> {
        let file: PilesFile = read_toml(path)?;
        let dir = base_dir(path);
        let mut out: Vec<PileEntry> = Vec::with_capacity(file.pile.len());
        for (i, raw) in file.pile.into_iter().enumerate() {
            let wrap = |source| RegistryError::Entry {
                path: path.to_owned(),
                entry: format!(
                    "[[pile]] #{} (charger_number {})",
                    i + 1,
                    raw.charger_number
                ),
                source,
            };
            if out.iter().any(|p| p.charger_number == raw.charger_number) {
                return Err(wrap(EntryError::DuplicatePile(raw.charger_number)));
            }
            let key = keyfile::load_key(&dir.join(&raw.root_key_file))
                .map_err(|e| wrap(EntryError::RootKey(e)))?;
            out.push(PileEntry {
                charger_number: raw.charger_number,
                root: RootKey::from_bytes(*key),
                key_offset: raw.key_offset,
            });
        }
        Ok(out)
    }

    /// Add or replace a vehicle; returns the one it replaced.
    pub fn insert_vehicle(&mut self, v: VehicleEntry) -> Option<VehicleEntry> {
        self.vehicles.insert(v.id.clone(), v)
    }

    /// Add or replace a pile; returns the one it replaced.
    pub fn insert_pile(&mut self, p: PileEntry) -> Option<PileEntry> {
        self.piles.insert(p.charger_number, p)
    }

    pub fn vehicle(&self, id: &VehicleId) -> Option<&VehicleEntry> {
        self.vehicles.get(id)
    }

    pub fn vehicle_mut(&mut self, id: &VehicleId) -> Option<&mut VehicleEntry> {
        self.vehicles.get_mut(id)
    }

    pub fn pile(&self, charger_number: u32) -> Option<&PileEntry> {
        self.piles.get(&charger_number)
    }

    pub fn vehicles(&self) -> impl Iterator<Item = &VehicleEntry> {
        self.vehicles.values()
    }

    pub fn piles(&self) -> impl Iterator<Item = &PileEntry> {
        self.piles.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::rng::StreamRng;
    use crate::cloud::envelope::KeyPair;
    use std::os::unix::fs::PermissionsExt;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("written");
        p
    }

    fn hex_key(seed: u64) -> String {
        KeyPair::generate(&mut StreamRng::new(seed))
            .public()
            .to_hex()
    }

    #[test]
    fn loads_both_files() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (a, b, owner) = (hex_key(1), hex_key(2), hex_key(3));
        let vehicles = write(
            dir.path(),
            "vehicles.toml",
            &format!(
                "[[vehicle]]\nid = \"veh-a\"\nhpke_public = \"{a}\"\n\n\
                 [[vehicle]]\nid = \"veh-b\"\nhpke_public = \"{b}\"\nowner_public = \"{owner}\"\n\
                 approval = \"required\"\nrevoked = true\n"
            ),
        );
        std::fs::create_dir(dir.path().join("keys")).expect("dir");
        keyfile::write_key(&dir.path().join("keys/pile-7.key"), &[7; 32]).expect("key");
        let piles = write(
            dir.path(),
            "piles.toml",
            "[[pile]]\ncharger_number = 7\nroot_key_file = \"keys/pile-7.key\"\nkey_offset = 3\n",
        );
        let r = Registry::load(&vehicles, &piles).expect("loads");
        let va = r
            .vehicle(&VehicleId::parse("veh-a").expect("id"))
            .expect("veh-a");
        assert_eq!(va.hpke_public.to_hex(), a);
        assert_eq!(
            (va.approval, va.revoked, va.owner_public),
            (ApprovalPolicy::None, false, None)
        );
        let vb = r
            .vehicle(&VehicleId::parse("veh-b").expect("id"))
            .expect("veh-b");
        assert_eq!((vb.approval, vb.revoked), (ApprovalPolicy::Required, true));
        assert_eq!(vb.owner_public.map(|k| k.to_hex()), Some(owner));
        let p = r.pile(7).expect("pile 7");
        assert_eq!((p.key_offset, p.root.expose()), (3, &[7; 32]));
        assert!(r.pile(8).is_none());
    }

    #[test]
    fn errors_name_the_file_and_the_entry() {
        let dir = tempfile::tempdir().expect("temp dir");
        let a = hex_key(1);
        let cases = [
            (
                format!("[[vehicle]]\nid = \"veh/a\"\nhpke_public = \"{a}\"\n"),
                "[[vehicle]] #1 (id \"veh/a\"): `id`: a vehicle id may hold only",
            ),
            (
                format!(
                    "[[vehicle]]\nid = \"a\"\nhpke_public = \"{a}\"\n[[vehicle]]\nid = \"b\"\nhpke_public = \"12\"\n"
                ),
                "[[vehicle]] #2 (id \"b\"): `hpke_public`: public key: expected an X25519 public key as 64 hex digits, found 2 hex digits",
            ),
            (
                format!(
                    "[[vehicle]]\nid = \"a\"\nhpke_public = \"{a}\"\napproval = \"required\"\n"
                ),
                "[[vehicle]] #1 (id \"a\"): approval = \"required\" needs `owner_public`",
            ),
            (
                format!(
                    "[[vehicle]]\nid = \"a\"\nhpke_public = \"{a}\"\n[[vehicle]]\nid = \"a\"\nhpke_public = \"{a}\"\n"
                ),
                "[[vehicle]] #2 (id \"a\"): `id` a appears more than once",
            ),
            (
                format!("[[vehicle]]\nid = \"bmsgw-cloud-2\"\nhpke_public = \"{a}\"\n"),
                "`id` bmsgw-cloud-2 is reserved",
            ),
            (
                format!("[[vehicle]]\nid = \"owner-a\"\nhpke_public = \"{a}\"\n"),
                "`id` owner-a is reserved",
            ),
            (
                format!("[[vehicle]]\nid = \"a\"\nhpke_public = \"{a}\"\napproval = \"maybe\"\n"),
                "maybe",
            ),
            (
                format!("[[vehicle]]\nid = \"a\"\nhpke_publik = \"{a}\"\n"),
                "hpke_publik",
            ),
            ("[[vehicle]]\nid = \"a\"\n".to_string(), "hpke_public"),
        ];
        for (text, want) in cases {
            let p = write(dir.path(), "vehicles.toml", &text);
            let err = Registry::load_vehicles(&p).expect_err(&text).to_string();
            assert!(err.starts_with(&p.display().to_string()), "{err}");
            assert!(err.contains(want), "{err}\nwanted: {want}");
        }
    }

    #[test]
    fn pile_errors_name_the_file_and_the_entry() {
        let dir = tempfile::tempdir().expect("temp dir");
        let key = dir.path().join("k.key");
        keyfile::write_key(&key, &[1; 32]).expect("key");
        let p = write(
            dir.path(),
            "piles.toml",
            "[[pile]]\ncharger_number = 1\nroot_key_file = \"missing.key\"\nkey_offset = 1\n",
        );
        let err = Registry::load_piles(&p).expect_err("missing").to_string();
        assert!(
            err.contains("[[pile]] #1 (charger_number 1): `root_key_file`: key file"),
            "{err}"
        );
        assert!(err.contains("missing.key"), "{err}");

        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let p = write(
            dir.path(),
            "piles.toml",
            "[[pile]]\ncharger_number = 1\nroot_key_file = \"k.key\"\nkey_offset = 1\n",
        );
        let err = Registry::load_piles(&p).expect_err("loose").to_string();
        assert!(err.contains("chmod 600"), "{err}");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");

        let p = write(
            dir.path(),
            "piles.toml",
            "[[pile]]\ncharger_number = 1\nroot_key_file = \"k.key\"\nkey_offset = 1\n\
             [[pile]]\ncharger_number = 1\nroot_key_file = \"k.key\"\nkey_offset = 2\n",
        );
        let err = Registry::load_piles(&p).expect_err("dup").to_string();
        assert!(
            err.contains(
                "[[pile]] #2 (charger_number 1): `charger_number` 1 appears more than once"
            ),
            "{err}"
        );

        let p = write(
            dir.path(),
            "piles.toml",
            "[[pile]]\ncharger_number = -1\nroot_key_file = \"k.key\"\nkey_offset = 1\n",
        );
        let err = Registry::load_piles(&p).expect_err("negative").to_string();
        assert!(err.contains("charger_number"), "{err}");
        let p = write(
            dir.path(),
            "piles.toml",
            "[[pile]]\ncharger_number = 1\nroot_key_file = \"k.key\"\nkey_offset = 70000\n",
        );
        let err = Registry::load_piles(&p).expect_err("u16").to_string();
        assert!(err.contains("key_offset"), "{err}");

        let err = Registry::load_piles(&dir.path().join("nope.toml"))
            .expect_err("missing file")
            .to_string();
        assert!(err.contains("nope.toml"), "{err}");
    }

    #[test]
    fn empty_files_are_empty_registries() {
        let dir = tempfile::tempdir().expect("temp dir");
        let v = write(dir.path(), "v.toml", "");
        let p = write(dir.path(), "p.toml", "");
        let r = Registry::load(&v, &p).expect("loads");
        assert_eq!((r.vehicles().count(), r.piles().count()), (0, 0));
    }
}
