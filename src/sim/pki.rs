//! Development PKI: every key, certificate and registry file that the tests,
//! the demo and a developer's `bmsgw sim cloud` need, generated fresh into one
//! directory (`bmsgw pki dev --out DIR`).
//!
//! It exists so that no secret is ever committed: each test run makes its own
//! CA and keys. It owns the file layout of that directory (the names listed
//! in [`DevPki`]), the registry formats the reference cloud reads
//! (`vehicles.toml`, `piles.toml`, `cloud.toml`), and the broker's side: the
//! mosquitto dynamic-security file that confines each vehicle, owner app and
//! cloud instance to its own topics, and a `mosquitto.conf` (the shipped one
//! with this directory's paths) to run it with.
//!
//! Certificates: one ECDSA P-256 CA signs a broker certificate (SAN
//! `localhost` and `127.0.0.1`, serverAuth) and client certificates
//! (clientAuth) whose CN is the MQTT identity the broker sees: one
//! `bmsgw-cloud-{n}` per cloud instance, the vehicle id, and
//! `owner-{vehicle id}`. The broker takes the CN as the client id too
//! (`use_username_as_clientid`), so two instances need two certificates. Client certificates carry no
//! Organization: rumqttd's `verify-client-cert` would take it as a tenant id
//! and prefix every topic with it.
//!
//! Secrets (TLS private keys in PKCS#8 PEM, X25519 keys and pile root keys as
//! 32-byte keys) are written with mode 0600 through
//! [`crate::service::keyfile`]; nothing is ever overwritten in place.
//! This is development material only: the CA key sits next to the
//! certificates it signed.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::fs::DirBuilder;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::auth::SystemRng;
use crate::cloud::envelope::{self, KeyError};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use zeroize::Zeroizing;

use crate::service::keyfile::{self, KeyFileError};

/// Prefix of a cloud instance's identity (certificate CN): instance `n` is
/// `bmsgw-cloud-{n}` ([`cloud_identity`]). Vehicle ids may not start with it.
pub const CLOUD_IDENTITY_PREFIX: &str = "bmsgw-cloud";
/// The dynamic-security role every cloud instance holds.
pub const CLOUD_ROLE: &str = "bmsgw-cloud";
/// Cloud instances `bmsgw pki dev` makes certificates for unless told.
pub const DEFAULT_CLOUD_INSTANCES: u32 = 2;
/// The most cloud instances one PKI is made for.
pub const MAX_CLOUD_INSTANCES: u32 = 64;
/// Prefix of an owner app's identity: `owner-{vehicle id}`.
pub const OWNER_PREFIX: &str = "owner-";
/// Broker port written into `cloud.toml` when the caller names none.
pub const DEFAULT_BROKER_PORT: u16 = 8883;

const CA_CN: &str = "bmsgw development CA";
/// X.509 upper bound of a CommonName (RFC 5280 `ub-common-name`).
const MAX_CN_LEN: usize = 64;
/// Certificates start an hour in the past so that a peer whose clock is a
/// little behind does not reject them as not yet valid.
const BACKDATE: Duration = Duration::from_secs(3600);

/// Why the development PKI could not be generated or used.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error(
        "vehicle id {id:?} is not usable: {reason} (1 to {max} characters of A-Z a-z 0-9 _ -)",
        max = MAX_CN_LEN - OWNER_PREFIX.len()
    )]
    VehicleId { id: String, reason: &'static str },
    #[error("vehicle id {id:?} is listed twice")]
    DuplicateVehicle { id: String },
    #[error("charger number {charger} is listed twice")]
    DuplicateCharger { charger: u32 },
    #[error("validity_days must be at least 1")]
    Validity,
    #[error("cloud instances must be 1 to {MAX_CLOUD_INSTANCES}, not {0}")]
    CloudInstances(u32),
    #[error("the built-in config/mosquitto/mosquitto.conf: {0}")]
    BrokerConfig(#[from] crate::sim::mosquitto::ShapeError),
    #[error(
        "{dir} already holds files; refusing to overwrite a PKI (use --force, or another directory)"
    )]
    NotEmpty { dir: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    KeyFile(#[from] KeyFileError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("cannot make the {what} certificate: {source}")]
    Cert {
        what: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("the operating system's random number generator failed: {0}")]
    Rng(getrandom::Error),
    #[error("the system clock is before 1970")]
    Clock,
    #[error("{path}: not a usable PEM {what}: {reason}")]
    Pem {
        path: PathBuf,
        what: &'static str,
        reason: String,
    },
    #[error("TLS configuration from {cert}: {source}")]
    Tls {
        cert: PathBuf,
        #[source]
        source: rustls::Error,
    },
}

/// What to generate.
#[derive(Clone, Debug)]
pub struct DevPkiOptions {
    /// Output directory (created with mode 0700 if missing).
    pub dir: PathBuf,
    /// Vehicle ids; each gets a certificate, an X25519 key and an owner app.
    pub vehicles: Vec<String>,
    /// Vehicles whose policy requires owner approval (`approval = "required"`
    /// in `vehicles.toml`); the others have `approval = "none"`.
    pub approval_required: Vec<String>,
    /// Charger numbers; each pile gets a root key.
    pub chargers: Vec<u32>,
    /// Lifetime of every certificate, in days.
    pub validity_days: u32,
    /// Broker port written into `cloud.toml` and `mosquitto.conf` (see
    /// [`DevPki::write_cloud_toml`]).
    pub broker_port: u16,
    /// Cloud instances, each with its own certificate and config file.
    pub cloud_instances: u32,
    /// Replace the files of an existing PKI in `dir` (only the files this
    /// module writes are removed; nothing else in the directory is touched).
    pub force: bool,
}

impl DevPkiOptions {
    /// The default layout in `dir`: vehicles `veh-a` (no approval) and
    /// `veh-b` (owner approval required), chargers 1 and 2, 30-day
    /// certificates, broker port 8883.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        DevPkiOptions {
            dir: dir.into(),
            vehicles: vec!["veh-a".into(), "veh-b".into()],
            approval_required: vec!["veh-b".into()],
            chargers: vec![1, 2],
            validity_days: 30,
            broker_port: DEFAULT_BROKER_PORT,
            cloud_instances: DEFAULT_CLOUD_INSTANCES,
            force: false,
        }
    }
}

/// The files of one MQTT client that also holds an X25519 (HPKE) key: a
/// vehicle, or an owner app.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VehicleFiles {
    /// Client certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PKCS#8 PEM, 0600).
    pub key: PathBuf,
    /// X25519 secret key (0600, read with `keyfile::load_key`).
    pub hpke_key: PathBuf,
    /// X25519 public key: 64 hex digits and a newline.
    pub hpke_pub: PathBuf,
}

/// The files of one cloud instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloudInstanceFiles {
    /// Its MQTT identity: certificate CN, user name and client id.
    pub identity: String,
    /// Client certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PKCS#8 PEM, 0600).
    pub key: PathBuf,
    /// Its `bmsgw sim cloud --config` file.
    pub toml: PathBuf,
}

/// The MQTT identity of cloud instance `n` (from 1).
pub fn cloud_identity(n: u32) -> String {
    format!("{CLOUD_IDENTITY_PREFIX}-{n}")
}

/// A generated development PKI: where each file is.
///
/// Layout of `dir` (secrets marked 0600):
/// `ca.pem`, `ca.key` (0600), `broker.pem`, `broker.key` (0600); for each
/// cloud instance n `cloud-{n}.pem`, `cloud-{n}.key` (0600) and its config
/// (`cloud.toml` for instance 1, `cloud-{n}.toml` for the others);
/// `cloud-hpke.key` (0600), `cloud-hpke.pub` (shared by the instances); for
/// each vehicle `vehicle-{id}.pem/.key`, `vehicle-{id}-hpke.key/.pub`,
/// `owner-{id}.pem/.key`, `owner-{id}-hpke.key/.pub`; for each charger
/// `pile-{n}-root.key` (0600); `vehicles.toml`, `piles.toml`, the broker's
/// `dynamic-security.json` and `mosquitto.conf`, and the directory
/// `mosquitto-data/` for its persistence.
#[derive(Clone, Debug)]
pub struct DevPki {
    pub dir: PathBuf,
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub broker_cert: PathBuf,
    pub broker_key: PathBuf,
    /// Instance 1's certificate and key (see [`DevPki::cloud_instance`]).
    pub cloud_cert: PathBuf,
    pub cloud_key: PathBuf,
    pub cloud_hpke_key: PathBuf,
    pub cloud_hpke_pub: PathBuf,
    pub vehicles_toml: PathBuf,
    pub piles_toml: PathBuf,
    /// Instance 1's config.
    pub cloud_toml: PathBuf,
    /// The broker's dynamic-security plugin file (see [`mosquitto_dynsec`]).
    pub mosquitto_dynsec: PathBuf,
    /// `config/mosquitto/mosquitto.conf` with this directory's paths.
    pub mosquitto_conf: PathBuf,
    /// The broker's persistence directory in `mosquitto_conf`.
    pub mosquitto_data: PathBuf,
    vehicles: Vec<String>,
    chargers: Vec<u32>,
    cloud_instances: u32,
}

impl DevPki {
    /// Generate a complete PKI into `opts.dir`.
    pub fn generate(opts: &DevPkiOptions) -> Result<DevPki, PkiError> {
        validate(opts)?;
        let pki = DevPki::layout(&opts.dir, opts.vehicles.clone(), opts.chargers.clone())
            .with_cloud_instances(opts.cloud_instances);
        pki.prepare_dir(opts.force)?;

        let ca = Ca::new(opts.validity_days)?;
        write_text(&pki.ca_cert, &ca.cert_pem)?;
        write_secret(&pki.ca_key, &ca.key)?;

        ca.issue(
            "broker",
            &[
                SanType::DnsName("localhost".try_into().map_err(|source| PkiError::Cert {
                    what: "broker".into(),
                    source,
                })?),
                SanType::IpAddress([127, 0, 0, 1].into()),
            ],
            "localhost",
            ExtendedKeyUsagePurpose::ServerAuth,
            &pki.broker_cert,
            &pki.broker_key,
        )?;
        for n in 1..=pki.cloud_instances {
            let c = pki.cloud_instance(n);
            ca.issue_client(&c.identity, &c.cert, &c.key)?;
        }
        x25519_pair(&pki.cloud_hpke_key, &pki.cloud_hpke_pub)?;

        let mut registry = String::from(
            "# Vehicle registry of the reference cloud (generated by `bmsgw pki dev`).\n",
        );
        for id in &pki.vehicles {
            let v = pki.vehicle(id);
            ca.issue_client(id, &v.cert, &v.key)?;
            let vehicle_public = x25519_pair(&v.hpke_key, &v.hpke_pub)?;
            let o = pki.owner(id);
            ca.issue_client(&format!("{OWNER_PREFIX}{id}"), &o.cert, &o.key)?;
            let owner_public = x25519_pair(&o.hpke_key, &o.hpke_pub)?;
            let approval = if opts.approval_required.contains(id) {
                "required"
            } else {
                "none"
            };
            // Ids are validated to [A-Za-z0-9_-], so they need no escaping.
            let _ = write!(
                registry,
                "\n[[vehicle]]\nid = \"{id}\"\nhpke_public = \"{}\"\nowner_public = \"{}\"\n\
                 approval = \"{approval}\"\nrevoked = false\n",
                hex::encode(vehicle_public),
                hex::encode(owner_public),
            );
        }
        write_text(&pki.vehicles_toml, &registry)?;

        let mut piles = String::from(
            "# Pile registry of the reference cloud (generated by `bmsgw pki dev`).\n\
             # root_key_file is relative to this file's directory.\n",
        );
        for &charger in &pki.chargers {
            let path = pki.pile_root_key(charger);
            write_secret(&path, &random_key()?)?;
            let _ = write!(
                piles,
                "\n[[pile]]\ncharger_number = {charger}\nroot_key_file = \"{}\"\nkey_offset = 0\n",
                file_name(&path)
            );
        }
        write_text(&pki.piles_toml, &piles)?;

        pki.write_cloud_toml(opts.broker_port)?;
        write_text(
            &pki.mosquitto_dynsec,
            &mosquitto_dynsec(&pki.vehicles, pki.cloud_instances),
        )?;
        pki.write_mosquitto_conf(opts.broker_port)?;
        Ok(pki)
    }

    /// The paths of a PKI in `dir` for these vehicles and chargers, without
    /// touching the file system.
    pub fn layout(dir: &Path, vehicles: Vec<String>, chargers: Vec<u32>) -> DevPki {
        let f = |name: &str| dir.join(name);
        DevPki {
            dir: dir.to_owned(),
            ca_cert: f("ca.pem"),
            ca_key: f("ca.key"),
            broker_cert: f("broker.pem"),
            broker_key: f("broker.key"),
            cloud_cert: f("cloud-1.pem"),
            cloud_key: f("cloud-1.key"),
            cloud_hpke_key: f("cloud-hpke.key"),
            cloud_hpke_pub: f("cloud-hpke.pub"),
            vehicles_toml: f("vehicles.toml"),
            piles_toml: f("piles.toml"),
            cloud_toml: f("cloud.toml"),
            mosquitto_dynsec: f("dynamic-security.json"),
            mosquitto_conf: f("mosquitto.conf"),
            mosquitto_data: f("mosquitto-data"),
            vehicles,
            chargers,
            cloud_instances: 1,
        }
    }

    /// The same layout with `n` cloud instances ([`DevPki::layout`] has one).
    pub fn with_cloud_instances(mut self, n: u32) -> DevPki {
        self.cloud_instances = n;
        self
    }

    /// How many cloud instances this PKI was made for.
    pub fn cloud_instances(&self) -> u32 {
        self.cloud_instances
    }

    /// The files of cloud instance `n` (from 1; CN `bmsgw-cloud-{n}`).
    pub fn cloud_instance(&self, n: u32) -> CloudInstanceFiles {
        let toml = if n == 1 {
            self.cloud_toml.clone()
        } else {
            self.dir.join(format!("cloud-{n}.toml"))
        };
        CloudInstanceFiles {
            identity: cloud_identity(n),
            cert: self.dir.join(format!("cloud-{n}.pem")),
            key: self.dir.join(format!("cloud-{n}.key")),
            toml,
        }
    }

    /// (Re)write `mosquitto.conf`: the shipped production config with this
    /// PKI's files, `dynamic-security.json`, `mosquitto-data/` (created)
    /// and a listener on 127.0.0.1:`port`.
    pub fn write_mosquitto_conf(&self, port: u16) -> Result<(), PkiError> {
        private_dir(&self.mosquitto_data)?;
        // mosquitto resolves relative paths against its working directory,
        // not the file's: name everything absolutely.
        let dir = std::path::absolute(&self.dir).map_err(|source| PkiError::Io {
            path: self.dir.clone(),
            source,
        })?;
        let abs = DevPki::layout(&dir, self.vehicles.clone(), self.chargers.clone())
            .with_cloud_instances(self.cloud_instances);
        let conf = crate::sim::mosquitto::shipped_config(
            crate::sim::mosquitto::SHIPPED_CONF,
            &abs,
            &abs.mosquitto_dynsec,
            &abs.mosquitto_data,
            port,
        )?;
        write_text(&self.mosquitto_conf, &conf)
    }

    /// The vehicle ids this PKI was made for.
    pub fn vehicle_ids(&self) -> &[String] {
        &self.vehicles
    }

    /// The charger numbers this PKI was made for.
    pub fn chargers(&self) -> &[u32] {
        &self.chargers
    }

    /// The files of vehicle `id` (CN = `id`).
    pub fn vehicle(&self, id: &str) -> VehicleFiles {
        self.client_files(&format!("vehicle-{id}"))
    }

    /// The files of the owner app of vehicle `id` (CN = `owner-{id}`).
    pub fn owner(&self, id: &str) -> VehicleFiles {
        self.client_files(&format!("{OWNER_PREFIX}{id}"))
    }

    /// The root key file of pile `charger`.
    pub fn pile_root_key(&self, charger: u32) -> PathBuf {
        self.dir.join(format!("pile-{charger}-root.key"))
    }

    /// (Re)write each instance's `bmsgw sim cloud --config` file
    /// (`cloud.toml`, `cloud-2.toml`, …) for a broker on 127.0.0.1:`port`
    /// (tests start brokers on free ports).
    pub fn write_cloud_toml(&self, port: u16) -> Result<(), PkiError> {
        for n in 1..=self.cloud_instances {
            let c = self.cloud_instance(n);
            let text = format!(
                "# Reference cloud configuration of instance {n} (generated by `bmsgw pki dev`).\n\
                 # Paths are relative to this file's directory.\n\
                 hpke_key = \"{hpke}\"\n\
                 vehicles = \"{vehicles}\"\n\
                 piles = \"{piles}\"\n\
                 grant_lifetime_s = 300\n\
                 vouchers_per_grant = 4\n\
                 voucher_lifetime_s = 604800\n\
                 voucher_energy_cap_wh = 60000\n\
                 approval_deadline_s = 60\n\
                 max_request_age_s = 30\n\
                 \n\
                 [broker]\n\
                 host = \"127.0.0.1\"\n\
                 port = {port}\n\
                 # The certificate's CN: the broker uses it as the client id.\n\
                 client_id = \"{id}\"\n\
                 \n\
                 [tls]\n\
                 ca = \"{ca}\"\n\
                 cert = \"{cert}\"\n\
                 key = \"{key}\"\n",
                hpke = file_name(&self.cloud_hpke_key),
                vehicles = file_name(&self.vehicles_toml),
                piles = file_name(&self.piles_toml),
                id = c.identity,
                ca = file_name(&self.ca_cert),
                cert = file_name(&c.cert),
                key = file_name(&c.key),
            );
            write_text(&c.toml, &text)?;
        }
        Ok(())
    }

    /// A rustls client configuration for the MQTT identity in `cert`/`key`
    /// (e.g. [`VehicleFiles::cert`]), trusting only this PKI's CA, TLS 1.3
    /// only. For simulators and tests; the product's own is `cloud::tls`.
    pub fn tls_client_config(
        &self,
        cert: &Path,
        key: &Path,
    ) -> Result<Arc<rustls::ClientConfig>, PkiError> {
        tls_client_config(&self.ca_cert, cert, key, &[&rustls::version::TLS13])
    }

    /// Every file this PKI consists of, secret or not.
    pub fn files(&self) -> Vec<PathBuf> {
        let mut files = vec![
            self.ca_cert.clone(),
            self.ca_key.clone(),
            self.broker_cert.clone(),
            self.broker_key.clone(),
            self.cloud_hpke_key.clone(),
            self.cloud_hpke_pub.clone(),
        ];
        for n in 1..=self.cloud_instances {
            let c = self.cloud_instance(n);
            files.extend([c.cert, c.key, c.toml]);
        }
        for id in &self.vehicles {
            for f in [self.vehicle(id), self.owner(id)] {
                files.extend([f.cert, f.key, f.hpke_key, f.hpke_pub]);
            }
        }
        files.extend(self.chargers.iter().map(|&c| self.pile_root_key(c)));
        files.extend([
            self.vehicles_toml.clone(),
            self.piles_toml.clone(),
            self.mosquitto_dynsec.clone(),
            self.mosquitto_conf.clone(),
        ]);
        files
    }

    /// The files that hold a secret (mode 0600).
    pub fn secret_files(&self) -> Vec<PathBuf> {
        let mut files = vec![
            self.ca_key.clone(),
            self.broker_key.clone(),
            self.cloud_hpke_key.clone(),
        ];
        files.extend((1..=self.cloud_instances).map(|n| self.cloud_instance(n).key));
        for id in &self.vehicles {
            for f in [self.vehicle(id), self.owner(id)] {
                files.extend([f.key, f.hpke_key]);
            }
        }
        files.extend(self.chargers.iter().map(|&c| self.pile_root_key(c)));
        files
    }

    fn client_files(&self, stem: &str) -> VehicleFiles {
        VehicleFiles {
            cert: self.dir.join(format!("{stem}.pem")),
            key: self.dir.join(format!("{stem}.key")),
            hpke_key: self.dir.join(format!("{stem}-hpke.key")),
            hpke_pub: self.dir.join(format!("{stem}-hpke.pub")),
        }
    }

    /// Create the directory (0700), or check that it holds no files unless
    /// `force`, in which case this PKI's own files are removed.
    fn prepare_dir(&self, force: bool) -> Result<(), PkiError> {
        let io = |source| PkiError::Io {
            path: self.dir.clone(),
            source,
        };
        private_dir(&self.dir)?;
        let mut entries = std::fs::read_dir(&self.dir).map_err(io)?;
        if entries.next().is_none() {
            return Ok(());
        }
        if !force {
            return Err(PkiError::NotEmpty {
                dir: self.dir.clone(),
            });
        }
        for path in self.files() {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(PkiError::Io { path, source }),
            }
        }
        Ok(())
    }
}

/// A rustls client configuration: trust only the CA certificates in
/// `ca`, present `cert` with `key`, speak only `versions`, ring provider.
pub fn tls_client_config(
    ca: &Path,
    cert: &Path,
    key: &Path,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Result<Arc<rustls::ClientConfig>, PkiError> {
    let tls = |source| PkiError::Tls {
        cert: cert.to_owned(),
        source,
    };
    let mut roots = rustls::RootCertStore::empty();
    for ca_cert in read_certs(ca)? {
        roots.add(ca_cert).map_err(tls)?;
    }
    let chain = read_certs(cert)?;
    let key_pem = keyfile::read_secret_text(key)?;
    let key_der = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| PkiError::Pem {
        path: key.to_owned(),
        what: "private key",
        reason: e.to_string(),
    })?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(versions)
    .map_err(tls)?
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key_der)
    .map_err(tls)?;
    Ok(Arc::new(config))
}

/// Every certificate in a PEM file (at least one).
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let pem = std::fs::read(path).map_err(|source| PkiError::Io {
        path: path.to_owned(),
        source,
    })?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PkiError::Pem {
            path: path.to_owned(),
            what: "certificate",
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(PkiError::Pem {
            path: path.to_owned(),
            what: "certificate",
            reason: "no CERTIFICATE section".into(),
        });
    }
    Ok(certs)
}

/// The mosquitto dynamic-security plugin's file (`plugin_opt_config_file`)
/// for these vehicles and `cloud_instances` cloud instances.
///
/// Why the plugin and not an `acl_file`: mosquitto 2.0's ACL file grants
/// every SUBSCRIBE and filters only on delivery, so a vehicle could join the
/// cloud's `$share/bmsgw-cloud-req/…` group and silently swallow a share of
/// every vehicle's requests (the publisher still gets PUBACK 0x00). The
/// plugin refuses such a SUBSCRIBE at SUBACK (0x87). It has no `%u`
/// substitution (2.0.11), so each vehicle and each owner app has a role of
/// its own; default access is deny, except unsubscribing.
///
/// Clients carry no password (they log in with a certificate, whose CN the
/// broker takes as the user name) and no `clientid`: the plugin does not
/// enforce one for certificate logins (eclipse-mosquitto/mosquitto#2999);
/// `use_username_as_clientid` in `mosquitto.conf` binds the client id.
pub fn mosquitto_dynsec(vehicles: &[String], cloud_instances: u32) -> String {
    use serde_json::{Value, json};
    let acl =
        |acltype: &str, topic: String| json!({"acltype": acltype, "topic": topic, "allow": true});
    let client = |username: String, role: String| json!({"username": username, "roles": [{"rolename": role}]});
    let mut clients: Vec<Value> = (1..=cloud_instances)
        .map(|n| client(cloud_identity(n), CLOUD_ROLE.into()))
        .collect();
    // The whole tree, and its shared subscriptions: the plugin matches
    // the full `$share/<group>/<filter>` string.
    let cloud_acls: Vec<Value> = ["bmsgw/v1/#", "$share/+/bmsgw/v1/#"]
        .into_iter()
        .flat_map(|t| {
            let mut a = vec![
                acl("subscribePattern", t.into()),
                acl("unsubscribePattern", t.into()),
            ];
            if !t.starts_with('$') {
                a.insert(0, acl("publishClientReceive", t.into()));
                a.insert(0, acl("publishClientSend", t.into()));
            }
            a
        })
        .collect();
    let mut roles = vec![json!({"rolename": CLOUD_ROLE, "acls": cloud_acls})];
    for id in vehicles {
        // Ids are validated to [A-Za-z0-9_-]: literal topics, no wildcards.
        let t = |leaf: &str| format!("bmsgw/v1/{id}/{leaf}");
        let vehicle_role = format!("vehicle-{id}");
        roles.push(json!({"rolename": vehicle_role, "acls": [
            acl("publishClientSend", t("identity/req")),
            acl("publishClientSend", t("events")),
            acl("publishClientReceive", t("identity/resp")),
            acl("publishClientReceive", t("vouchers")),
            acl("subscribeLiteral", t("identity/resp")),
            acl("subscribeLiteral", t("vouchers")),
        ]}));
        clients.push(client(id.clone(), vehicle_role));
        let owner = format!("{OWNER_PREFIX}{id}");
        roles.push(json!({"rolename": owner, "acls": [
            acl("publishClientSend", t("approval")),
        ]}));
        clients.push(client(owner.clone(), owner));
    }
    let file = json!({
        "defaultACLAccess": {
            "publishClientSend": false,
            "publishClientReceive": false,
            "subscribe": false,
            "unsubscribe": true,
        },
        "clients": clients,
        "groups": [],
        "roles": roles,
    });
    // Serializing a `Value` (string keys only) cannot fail.
    let mut text = serde_json::to_string_pretty(&file).unwrap_or_default();
    text.push('\n');
    text
}

fn validate(opts: &DevPkiOptions) -> Result<(), PkiError> {
    if opts.validity_days == 0 {
        return Err(PkiError::Validity);
    }
    if !(1..=MAX_CLOUD_INSTANCES).contains(&opts.cloud_instances) {
        return Err(PkiError::CloudInstances(opts.cloud_instances));
    }
    let mut seen = HashSet::new();
    for id in &opts.vehicles {
        let bad = |reason| {
            Err(PkiError::VehicleId {
                id: id.clone(),
                reason,
            })
        };
        if id.is_empty() || id.len() + OWNER_PREFIX.len() > MAX_CN_LEN {
            return bad("wrong length");
        }
        if !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return bad("a character outside the allowed set");
        }
        // A vehicle named like a cloud instance or an owner app would be
        // that identity on the broker (the CN is the user name).
        if id.starts_with(CLOUD_IDENTITY_PREFIX) || id.starts_with(OWNER_PREFIX) {
            return bad("reserved for the cloud or an owner app");
        }
        if !seen.insert(id) {
            return Err(PkiError::DuplicateVehicle { id: id.clone() });
        }
    }
    let mut chargers = HashSet::new();
    for &charger in &opts.chargers {
        if !chargers.insert(charger) {
            return Err(PkiError::DuplicateCharger { charger });
        }
    }
    Ok(())
}

/// The CA: its certificate and the issuer that signs the others.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    key: Zeroizing<String>,
    not_before: SystemTime,
    not_after: SystemTime,
}

impl Ca {
    fn new(validity_days: u32) -> Result<Ca, PkiError> {
        let now = SystemTime::now();
        let not_before = now.checked_sub(BACKDATE).ok_or(PkiError::Clock)?;
        let not_after = now + Duration::from_secs(u64::from(validity_days) * 86_400);
        let cert_err = |source| PkiError::Cert {
            what: "CA".into(),
            source,
        };
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(cert_err)?;
        let mut params = CertificateParams::default();
        set_validity(&mut params, not_before, not_after)?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, CA_CN);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "bmsgw development");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).map_err(cert_err)?;
        let key_pem = Zeroizing::new(key.serialize_pem());
        Ok(Ca {
            issuer: Issuer::new(params, key),
            cert_pem: cert.pem(),
            key: key_pem,
            not_before,
            not_after,
        })
    }

    fn issue_client(&self, cn: &str, cert: &Path, key: &Path) -> Result<(), PkiError> {
        self.issue(cn, &[], cn, ExtendedKeyUsagePurpose::ClientAuth, cert, key)
    }

    /// Issue a leaf certificate with a fresh P-256 key; write both.
    fn issue(
        &self,
        what: &str,
        sans: &[SanType],
        cn: &str,
        usage: ExtendedKeyUsagePurpose,
        cert_path: &Path,
        key_path: &Path,
    ) -> Result<(), PkiError> {
        let cert_err = |source| PkiError::Cert {
            what: what.into(),
            source,
        };
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(cert_err)?;
        let mut params = CertificateParams::default();
        set_validity(&mut params, self.not_before, self.not_after)?;
        params.subject_alt_names = sans.to_vec();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer).map_err(cert_err)?;
        write_text(cert_path, &cert.pem())?;
        write_secret(key_path, &Zeroizing::new(key.serialize_pem()))
    }
}

fn set_validity(
    params: &mut CertificateParams,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<(), PkiError> {
    // rcgen takes `time::OffsetDateTime`, which it does not re-export; build
    // it from its own epoch constructor plus a std duration.
    let since_epoch = |t: SystemTime| t.duration_since(UNIX_EPOCH).map_err(|_| PkiError::Clock);
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + since_epoch(not_before)?;
    params.not_after = epoch + since_epoch(not_after)?;
    Ok(())
}

fn random_key() -> Result<Zeroizing<[u8; 32]>, PkiError> {
    let mut key = Zeroizing::new([0u8; 32]);
    getrandom::fill(&mut key[..]).map_err(PkiError::Rng)?;
    Ok(key)
}

/// A fresh X25519 key pair (the envelope's key type): the secret to
/// `secret` (0600), the public key as hex to `public`. Returns the public key.
fn x25519_pair(secret: &Path, public: &Path) -> Result<[u8; 32], PkiError> {
    let pair = envelope::KeyPair::generate(&mut SystemRng);
    pair.secret().write(secret)?;
    pair.public().write(public)?;
    Ok(*pair.public().as_bytes())
}

trait Secret {
    fn write_to(&self, path: &Path) -> Result<(), KeyFileError>;
}

impl Secret for Zeroizing<[u8; 32]> {
    fn write_to(&self, path: &Path) -> Result<(), KeyFileError> {
        keyfile::write_key(path, self)
    }
}

impl Secret for Zeroizing<String> {
    fn write_to(&self, path: &Path) -> Result<(), KeyFileError> {
        keyfile::write_secret_text(path, self)
    }
}

fn write_secret(path: &Path, secret: &impl Secret) -> Result<(), PkiError> {
    Ok(secret.write_to(path)?)
}

/// Create `path` and its parents, mode 0700 (an existing one is kept).
fn private_dir(path: &Path) -> Result<(), PkiError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|source| PkiError::Io {
            path: path.to_owned(),
            source,
        })
}

fn write_text(path: &Path, text: &str) -> Result<(), PkiError> {
    std::fs::write(path, text).map_err(|source| PkiError::Io {
        path: path.to_owned(),
        source,
    })
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// What [`DevPki::write_gateway_toml`] needs besides the PKI.
#[derive(Clone, Debug)]
pub struct GatewayTomlOptions {
    pub broker_port: u16,
    pub can: crate::service::config::CanInterfaces,
    /// Holds the state file and the wallet key.
    pub state_dir: PathBuf,
    pub control_socket: PathBuf,
    pub request_timeout: std::time::Duration,
}

impl DevPki {
    /// Write `gateway-{vehicle}.toml`, a `bmsgw run --config` file for
    /// `vehicle` on a broker at 127.0.0.1:`broker_port`, with this PKI's
    /// keys. Returns its path.
    pub fn write_gateway_toml(
        &self,
        vehicle: &str,
        opts: &GatewayTomlOptions,
    ) -> Result<PathBuf, PkiError> {
        use crate::service::config::CanInterfaces;
        let v = self.vehicle(vehicle);
        let can = match &opts.can {
            CanInterfaces::SingleBus { interface } => {
                format!("mode = \"single-bus\"\ninterface = \"{interface}\"\n")
            }
            CanInterfaces::Bridge { bms, pile } => format!(
                "mode = \"bridge\"\nbms_interface = \"{bms}\"\npile_interface = \"{pile}\"\n"
            ),
        };
        // The config resolves relative paths against its own directory:
        // files beside it are named by their file name, anything else is
        // made absolute (a relative `--out` is relative to the caller's
        // working directory, not to the config).
        let here = std::env::current_dir().unwrap_or_default();
        let q = |p: &Path| {
            let p = match p.strip_prefix(&self.dir) {
                Ok(inside) if !inside.as_os_str().is_empty() => inside.to_path_buf(),
                _ if p.is_relative() => here.join(p),
                _ => p.to_path_buf(),
            };
            p.display()
                .to_string()
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
        };
        let text = format!(
            "# bmsgw daemon config for {vehicle} (generated by `bmsgw pki dev`; development keys).\n\
             \n[vehicle]\nid = \"{vehicle}\"\nhpke_key = \"{hpke}\"\ncloud_public_key = \"{cloud}\"\n\
             \n[can]\n{can}\
             \n[cloud]\nhost = \"127.0.0.1\"\nport = {port}\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n\
             request_timeout = \"{timeout}ms\"\n\
             \n[store]\npath = \"{state}\"\nwallet_key = \"{wallet}\"\n\
             \n[control]\nsocket = \"{socket}\"\n",
            hpke = q(&v.hpke_key),
            cloud = q(&self.cloud_hpke_pub),
            port = opts.broker_port,
            ca = q(&self.ca_cert),
            cert = q(&v.cert),
            key = q(&v.key),
            timeout = opts.request_timeout.as_millis(),
            state = q(&opts.state_dir.join("state.redb")),
            wallet = q(&opts.state_dir.join("wallet.key")),
            socket = q(&opts.control_socket),
        );
        let path = self.dir.join(format!("gateway-{vehicle}.toml"));
        write_text(&path, &text)?;
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::{ServerName, UnixTime};
    use std::os::unix::fs::PermissionsExt;

    fn generate() -> (tempfile::TempDir, DevPki) {
        let dir = tempfile::tempdir().unwrap();
        let pki = DevPki::generate(&DevPkiOptions::new(dir.path().join("pki"))).unwrap();
        (dir, pki)
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    fn roots(pki: &DevPki) -> Arc<rustls::RootCertStore> {
        let mut roots = rustls::RootCertStore::empty();
        for c in read_certs(&pki.ca_cert).unwrap() {
            roots.add(c).unwrap();
        }
        Arc::new(roots)
    }

    fn one_cert(path: &Path) -> CertificateDer<'static> {
        let mut certs = read_certs(path).unwrap();
        assert_eq!(certs.len(), 1, "{}", path.display());
        certs.remove(0)
    }

    #[test]
    fn writes_exactly_the_planned_files_with_secrets_0600() {
        let (_tmp, pki) = generate();
        let mut expected: Vec<String> = pki.files().iter().map(|p| file_name(p)).collect();
        // And the broker's (empty) persistence directory.
        expected.push(file_name(&pki.mosquitto_data));
        expected.sort();
        assert!(pki.mosquitto_data.is_dir());
        let mut found: Vec<String> = std::fs::read_dir(&pki.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        found.sort();
        assert_eq!(found, expected);
        for name in [
            "ca.pem",
            "ca.key",
            "broker.key",
            "cloud-hpke.pub",
            "vehicle-veh-a.pem",
            "vehicle-veh-b-hpke.key",
            "owner-veh-a.key",
            "owner-veh-b-hpke.pub",
            "pile-1-root.key",
            "pile-2-root.key",
            "vehicles.toml",
            "piles.toml",
            "cloud.toml",
            "cloud-2.toml",
            "cloud-1.key",
            "cloud-2.pem",
            "dynamic-security.json",
            "mosquitto.conf",
        ] {
            assert!(found.iter().any(|f| f == name), "{name} missing");
        }
        let secrets = pki.secret_files();
        // CA, broker, cloud HPKE; 2 cloud instances; 2 vehicles and their
        // owners (TLS and HPKE); 2 piles.
        assert_eq!(secrets.len(), 3 + 2 + 2 * 2 * 2 + 2);
        for path in &secrets {
            assert_eq!(mode(path), 0o600, "{}", path.display());
        }
        assert_eq!(mode(&pki.dir), 0o700);
        // Secrets load back through the loaders that refuse loose modes.
        for path in &secrets {
            let name = file_name(path);
            if name.ends_with("-hpke.key") || name.starts_with("pile-") {
                keyfile::load_key(path).unwrap();
            } else {
                let pem = keyfile::read_secret_text(path).unwrap();
                PrivateKeyDer::from_pem_slice(pem.as_bytes()).unwrap();
            }
        }
    }

    #[test]
    fn certificates_chain_to_the_ca_with_their_usages() {
        let (_tmp, pki) = generate();
        let now = UnixTime::now();
        let server =
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots(&pki), provider())
                .build()
                .unwrap();
        let broker = one_cert(&pki.broker_cert);
        for name in ["localhost", "127.0.0.1"] {
            let name = ServerName::try_from(name).unwrap();
            server
                .verify_server_cert(&broker, &[], &name, &[], now)
                .unwrap();
        }
        let other = ServerName::try_from("example.com").unwrap();
        assert!(
            server
                .verify_server_cert(&broker, &[], &other, &[], now)
                .is_err()
        );

        let client =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots(&pki), provider())
                .build()
                .unwrap();
        let mut clients = vec![pki.cloud_cert.clone()];
        for id in pki.vehicle_ids() {
            clients.push(pki.vehicle(id).cert);
            clients.push(pki.owner(id).cert);
        }
        for path in &clients {
            let cert = one_cert(path);
            client
                .verify_client_cert(&cert, &[], now)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            // clientAuth only: not usable as a server certificate.
            let localhost = ServerName::try_from("localhost").unwrap();
            assert!(
                server
                    .verify_server_cert(&cert, &[], &localhost, &[], now)
                    .is_err()
            );
        }
        // And the broker certificate is not a client certificate.
        assert!(client.verify_client_cert(&broker, &[], now).is_err());

        // A second PKI's CA does not vouch for the first one's certificates.
        let tmp2 = tempfile::tempdir().unwrap();
        let pki2 = DevPki::generate(&DevPkiOptions::new(tmp2.path())).unwrap();
        let client2 =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots(&pki2), provider())
                .build()
                .unwrap();
        assert!(
            client2
                .verify_client_cert(&one_cert(&pki.vehicle("veh-a").cert), &[], now)
                .is_err()
        );
    }

    #[test]
    fn client_tls_configs_load_for_every_identity() {
        let (_tmp, pki) = generate();
        pki.tls_client_config(&pki.cloud_cert, &pki.cloud_key)
            .unwrap();
        for id in pki.vehicle_ids() {
            let v = pki.vehicle(id);
            pki.tls_client_config(&v.cert, &v.key).unwrap();
        }
        // A certificate with the wrong key is refused.
        let a = pki.vehicle("veh-a");
        let b = pki.vehicle("veh-b");
        assert!(matches!(
            pki.tls_client_config(&a.cert, &b.key),
            Err(PkiError::Tls { .. })
        ));
    }

    fn x25519_public(secret: &[u8; 32]) -> crate::cloud::envelope::PublicKey {
        crate::cloud::envelope::SecretKey::from_bytes(Zeroizing::new(*secret)).public_key()
    }

    #[test]
    fn x25519_public_files_match_their_secrets() {
        let (_tmp, pki) = generate();
        let mut pairs = vec![(pki.cloud_hpke_key.clone(), pki.cloud_hpke_pub.clone())];
        for id in pki.vehicle_ids() {
            for f in [pki.vehicle(id), pki.owner(id)] {
                pairs.push((f.hpke_key, f.hpke_pub));
            }
        }
        let mut publics = HashSet::new();
        for (secret, public) in pairs {
            let secret = keyfile::load_key(&secret).unwrap();
            let text = std::fs::read_to_string(&public).unwrap();
            assert!(text.ends_with('\n') && text.len() == 65, "{text:?}");
            assert_eq!(text.trim(), hex::encode(x25519_public(&secret).as_bytes()));
            assert!(publics.insert(text.clone()), "two identical keys");
            // The envelope's HPKE implementation derives the same key.
            use hpke::{Deserializable, Kem, Serializable};
            type X = hpke::kem::X25519HkdfSha256;
            let sk = <X as Kem>::PrivateKey::from_bytes(&secret[..]).unwrap();
            assert_eq!(hex::encode(X::sk_to_pk(&sk).to_bytes()), text.trim());
        }
        // RFC 7748 §6.1 test vector: Alice's key pair.
        let alice: [u8; 32] =
            hex::decode("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
                .unwrap()
                .try_into()
                .unwrap();
        assert_eq!(
            hex::encode(x25519_public(&alice).as_bytes()),
            "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
        );
    }

    #[test]
    fn registries_and_acl_name_every_vehicle_and_pile() {
        let (_tmp, pki) = generate();
        let vehicles = std::fs::read_to_string(&pki.vehicles_toml).unwrap();
        let parsed: toml_like::Vehicles = config::Config::builder()
            .add_source(config::File::from(pki.vehicles_toml.as_path()))
            .build()
            .unwrap()
            .try_deserialize()
            .unwrap();
        assert_eq!(parsed.vehicle.len(), 2, "{vehicles}");
        let a = &parsed.vehicle[0];
        assert_eq!(a.id, "veh-a");
        assert_eq!(a.approval, "none");
        assert!(!a.revoked);
        assert_eq!(
            format!("{}\n", a.hpke_public),
            std::fs::read_to_string(pki.vehicle("veh-a").hpke_pub).unwrap()
        );
        assert_eq!(
            format!("{}\n", a.owner_public),
            std::fs::read_to_string(pki.owner("veh-a").hpke_pub).unwrap()
        );
        assert_eq!(parsed.vehicle[1].id, "veh-b");
        assert_eq!(parsed.vehicle[1].approval, "required");

        let piles: toml_like::Piles = config::Config::builder()
            .add_source(config::File::from(pki.piles_toml.as_path()))
            .build()
            .unwrap()
            .try_deserialize()
            .unwrap();
        assert_eq!(piles.pile.len(), 2);
        for (pile, charger) in piles.pile.iter().zip([1u32, 2]) {
            assert_eq!(pile.charger_number, charger);
            assert_eq!(pile.key_offset, 0);
            assert_eq!(
                pki.dir.join(&pile.root_key_file),
                pki.pile_root_key(charger)
            );
        }

        pki.write_cloud_toml(41883).unwrap();
        let cloud: toml_like::Cloud = config::Config::builder()
            .add_source(config::File::from(pki.cloud_toml.as_path()))
            .build()
            .unwrap()
            .try_deserialize()
            .unwrap();
        assert_eq!(cloud.broker.port, 41883);
        assert_eq!(cloud.broker.host, "127.0.0.1");
        assert_eq!(pki.dir.join(&cloud.tls.cert), pki.cloud_cert);
        assert_eq!(pki.dir.join(&cloud.tls.key), pki.cloud_key);
        assert_eq!(pki.dir.join(&cloud.tls.ca), pki.ca_cert);
        assert_eq!(pki.dir.join(&cloud.hpke_key), pki.cloud_hpke_key);
        assert_eq!(pki.dir.join(&cloud.vehicles), pki.vehicles_toml);
        assert_eq!(pki.dir.join(&cloud.piles), pki.piles_toml);
        assert!(cloud.grant_lifetime_s > 0 && cloud.approval_deadline_s > 0);

        let dynsec: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&pki.mosquitto_dynsec).unwrap()).unwrap();
        let users: Vec<&str> = dynsec["clients"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["username"].as_str().unwrap())
            .collect();
        assert_eq!(
            users,
            [
                "bmsgw-cloud-1",
                "bmsgw-cloud-2",
                "veh-a",
                "owner-veh-a",
                "veh-b",
                "owner-veh-b"
            ]
        );
        let role = |name: &str| {
            dynsec["roles"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["rolename"] == name)
                .unwrap_or_else(|| panic!("no role {name}"))["acls"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| {
                    assert_eq!(a["allow"], true);
                    format!(
                        "{} {}",
                        a["acltype"].as_str().unwrap(),
                        a["topic"].as_str().unwrap()
                    )
                })
                .collect::<Vec<_>>()
        };
        assert!(role("bmsgw-cloud").contains(&"subscribePattern $share/+/bmsgw/v1/#".to_owned()));
        assert_eq!(
            role("vehicle-veh-a"),
            [
                "publishClientSend bmsgw/v1/veh-a/identity/req",
                "publishClientSend bmsgw/v1/veh-a/events",
                "publishClientReceive bmsgw/v1/veh-a/identity/resp",
                "publishClientReceive bmsgw/v1/veh-a/vouchers",
                "subscribeLiteral bmsgw/v1/veh-a/identity/resp",
                "subscribeLiteral bmsgw/v1/veh-a/vouchers",
            ]
        );
        assert_eq!(
            role("owner-veh-b"),
            ["publishClientSend bmsgw/v1/veh-b/approval"]
        );
        assert_eq!(dynsec["defaultACLAccess"]["subscribe"], false);

        // Each instance: its own certificate, key and config.
        for n in [1, 2] {
            let c = pki.cloud_instance(n);
            assert_eq!(mode(&c.key), 0o600);
            let text = std::fs::read_to_string(&c.toml).unwrap();
            assert!(
                text.contains(&format!("client_id = \"bmsgw-cloud-{n}\"")),
                "{text}"
            );
            assert!(
                text.contains(&format!("cert = \"cloud-{n}.pem\"")),
                "{text}"
            );
        }
        let conf = std::fs::read_to_string(&pki.mosquitto_conf).unwrap();
        for line in [
            format!("plugin_opt_config_file {}", pki.mosquitto_dynsec.display()),
            format!("persistence_location {}/", pki.mosquitto_data.display()),
            "use_username_as_clientid true".to_owned(),
        ] {
            assert!(conf.lines().any(|l| l == line), "{line:?} not in\n{conf}");
        }
    }

    #[test]
    fn refuses_to_overwrite_unless_forced() {
        let (_tmp, pki) = generate();
        let mut opts = DevPkiOptions::new(&pki.dir);
        let before = std::fs::read(&pki.ca_cert).unwrap();
        assert!(matches!(
            DevPki::generate(&opts),
            Err(PkiError::NotEmpty { .. })
        ));
        assert_eq!(std::fs::read(&pki.ca_cert).unwrap(), before);

        // A foreign file in the directory is left alone by --force.
        let keep = pki.dir.join("notes.txt");
        std::fs::write(&keep, "mine").unwrap();
        opts.force = true;
        let again = DevPki::generate(&opts).unwrap();
        assert_ne!(std::fs::read(&again.ca_cert).unwrap(), before);
        assert_eq!(std::fs::read_to_string(&keep).unwrap(), "mine");
        assert_eq!(mode(&again.ca_key), 0o600);
    }

    #[test]
    fn bad_options_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let with = |vehicles: &[&str], chargers: &[u32]| {
            let mut o = DevPkiOptions::new(tmp.path().join("x"));
            o.vehicles = vehicles.iter().map(|s| s.to_string()).collect();
            o.chargers = chargers.to_vec();
            DevPki::generate(&o)
        };
        for bad in [
            "",
            "a/b",
            "a+b",
            "#",
            "bmsgw-cloud",
            "bmsgw-cloud-3",
            "owner-x",
            &"v".repeat(59),
        ] {
            assert!(
                matches!(with(&[bad], &[1]), Err(PkiError::VehicleId { .. })),
                "{bad:?}"
            );
        }
        assert!(matches!(
            with(&["a", "a"], &[1]),
            Err(PkiError::DuplicateVehicle { .. })
        ));
        assert!(matches!(
            with(&["a"], &[1, 1]),
            Err(PkiError::DuplicateCharger { .. })
        ));
        let mut o = DevPkiOptions::new(tmp.path().join("y"));
        o.validity_days = 0;
        assert!(matches!(DevPki::generate(&o), Err(PkiError::Validity)));
        // Nothing was written for refused options.
        assert!(!tmp.path().join("x").exists() && !tmp.path().join("y").exists());
        // The longest allowed id works.
        assert!(with(&[&"v".repeat(58)], &[7]).is_ok());
    }

    /// The registry shapes the reference cloud reads, as far as this test
    /// needs them.
    mod toml_like {
        use serde::Deserialize;

        #[derive(Deserialize)]
        pub struct Vehicles {
            pub vehicle: Vec<Vehicle>,
        }
        #[derive(Deserialize)]
        pub struct Vehicle {
            pub id: String,
            pub hpke_public: String,
            pub owner_public: String,
            pub approval: String,
            pub revoked: bool,
        }
        #[derive(Deserialize)]
        pub struct Piles {
            pub pile: Vec<Pile>,
        }
        #[derive(Deserialize)]
        pub struct Pile {
            pub charger_number: u32,
            pub root_key_file: String,
            pub key_offset: u16,
        }
        #[derive(Deserialize)]
        pub struct Cloud {
            pub broker: Broker,
            pub tls: Tls,
            pub hpke_key: String,
            pub vehicles: String,
            pub piles: String,
            pub grant_lifetime_s: u64,
            pub approval_deadline_s: u64,
        }
        #[derive(Deserialize)]
        pub struct Broker {
            pub host: String,
            pub port: u16,
        }
        #[derive(Deserialize)]
        pub struct Tls {
            pub ca: String,
            pub cert: String,
            pub key: String,
        }
    }
}
