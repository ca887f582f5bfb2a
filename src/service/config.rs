//! The daemon's configuration: `/etc/bmsgw/bmsgw.toml`, overridden by
//! `BMSGW__SECTION__KEY` environment variables (for example
//! `BMSGW__CLOUD__HOST=mqtt.example.com`), typed and validated before
//! anything starts.
//!
//! The `config` crate layers the file and the environment; serde with
//! `deny_unknown_fields` types them, so a misspelt key is an error rather
//! than a silently ignored setting. Every error names the file, the key,
//! the value and what was expected. Relative paths are resolved against the
//! config file's directory. `docs/configuration.md` is the reference and
//! `config/bmsgw.toml` a commented example.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::cloud::link::{LinkConfig, QoS};
use crate::cloud::tls::TlsFiles;
use crate::cloud::topics::{self, VehicleId};
use crate::gateway::throttle::ThrottleConfig;
use crate::interop::Profile;
use crate::j1939::{Address, Pgn};

/// The largest config file read: far above any real one, far below what
/// could hurt (a 300 MB file of whitespace took 886 MB to parse).
pub const MAX_CONFIG_LEN: usize = 1024 * 1024;

/// Where `bmsgw run` looks by default.
pub const DEFAULT_PATH: &str = "/etc/bmsgw/bmsgw.toml";
/// Environment overrides: `BMSGW__SECTION__KEY`.
pub const ENV_PREFIX: &str = "BMSGW";
pub const ENV_SEPARATOR: &str = "__";

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Syntax, a wrong type or an unknown key in the file, as the parser saw it.
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error(
        "{path}: the file is empty; a config needs at least [vehicle] and [can] (config/bmsgw.toml is a commented example)"
    )]
    Empty { path: PathBuf },
    #[error("{path}: over {max} bytes; a bmsgw config is a few kilobytes")]
    TooLarge { path: PathBuf, max: usize },
    /// An environment override that does not fit: an unknown key, or a
    /// value of the wrong type.
    #[error("environment variable {name}={value:?}: {message}")]
    Env {
        name: String,
        value: String,
        message: String,
    },
    /// An environment override whose value the checks refuse.
    #[error("environment variable {name}={value:?} (`{key}`): expected {expected}")]
    EnvInvalid {
        name: String,
        key: &'static str,
        value: String,
        expected: String,
    },
    /// An override whose name is not `BMSGW__SECTION__KEY`.
    #[error(
        "environment variable {name:?}: after BMSGW__ only letters, digits and '_' may \
         follow (BMSGW__SECTION__KEY)"
    )]
    EnvName { name: String },
    #[error("{path}: `{key}` = {value:?}: expected {expected}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        value: String,
        expected: String,
    },
}

/// The whole configuration, checked.
#[derive(Clone, Debug)]
pub struct Config {
    /// The file it was loaded from.
    pub path: PathBuf,
    pub vehicle: VehicleConfig,
    pub can: CanConfig,
    pub cloud: CloudLinkConfig,
    pub store: StoreConfig,
    pub control: ControlConfig,
    pub session: SessionConfig,
    pub firewall: FirewallSection,
    pub interop: InteropConfig,
    pub log: LogConfig,
}

/// How the gateway meets each peer's deviations from GB/T 27930 and
/// J1939-21 (docs/interop.md).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InteropConfig {
    pub bms: Profile,
    pub pile: Profile,
}

#[derive(Clone, Debug)]
pub struct VehicleConfig {
    /// The vehicle's id in the cloud (its MQTT topics and certificate CN).
    pub id: VehicleId,
    /// The vehicle's X25519 secret key (0600).
    pub hpke_key: PathBuf,
    /// The cloud's X25519 public key (hex).
    pub cloud_public_key: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CanInterfaces {
    /// One bus shared with the BMS and the pile.
    SingleBus { interface: String },
    /// The BMS's bus and the pile's bus, with the firewall between.
    Bridge { bms: String, pile: String },
}

#[derive(Clone, Debug)]
pub struct CanConfig {
    pub interfaces: CanInterfaces,
    /// The gateway's own J1939 address (authentication traffic).
    pub address: Address,
    pub bms_address: Address,
    pub pile_address: Address,
}

#[derive(Clone, Debug)]
pub struct CloudLinkConfig {
    /// Off: vouchers and imported tickets only.
    pub enabled: bool,
    pub host: String,
    pub port: u16,
    pub client_id: String,
    pub ca: PathBuf,
    pub cert: PathBuf,
    /// The TLS client key (0600).
    pub key: PathBuf,
    /// How long a charge request waits for the cloud before a voucher.
    pub request_timeout: Duration,
    pub keep_alive: Duration,
    /// How long a wake-up check of the link may go unanswered before it
    /// reconnects (`cloud::link`, "Waking up").
    pub wake_check_timeout: Duration,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// Vouchers asked for with each grant.
    pub want_vouchers: u16,
}

#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// The redb state file (created 0600).
    pub path: PathBuf,
    /// The key that seals vouchers at rest (0600; created at first start
    /// if missing).
    pub wallet_key: PathBuf,
}

#[derive(Clone, Debug)]
pub struct ControlConfig {
    pub socket: PathBuf,
    /// Group allowed to use the socket (name or numeric gid).
    pub group: Option<String>,
}

#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// No GB/T message for this long ends a session (cable pulled).
    pub bus_silence: Duration,
    /// Bridge mode: CRM(0xAA) reaches the BMS only after the pile proved
    /// it holds its key.
    pub require_pile_auth: bool,
    /// How long each step of the handshake with the pile may take.
    pub auth_timeout: Duration,
    /// Limits on credential requests (see `gateway::throttle`).
    pub throttle: ThrottleConfig,
}

#[derive(Clone, Debug)]
pub struct FirewallSection {
    pub blank_vin: bool,
    pub rate_per_second: u32,
    pub burst: u32,
    pub bms_to_pile: Vec<u32>,
    pub pile_to_bms: Vec<u32>,
}

#[derive(Clone, Debug)]
pub struct LogConfig {
    pub level: String,
}

// --- the file's shape --------------------------------------------------------

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a bmsgw config: [vehicle], [can] and optional sections"
)]
struct Raw {
    vehicle: RawVehicle,
    can: RawCan,
    #[serde(default)]
    cloud: Option<RawCloud>,
    #[serde(default)]
    store: RawStore,
    #[serde(default)]
    control: RawControl,
    #[serde(default)]
    session: RawSession,
    #[serde(default)]
    firewall: RawFirewall,
    #[serde(default)]
    interop: RawInterop,
    #[serde(default)]
    log: RawLog,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [interop] table")]
struct RawInterop {
    #[serde(default = "d_profile")]
    bms: String,
    #[serde(default = "d_profile")]
    pile: String,
}

impl Default for RawInterop {
    fn default() -> Self {
        RawInterop {
            bms: d_profile(),
            pile: d_profile(),
        }
    }
}

fn d_profile() -> String {
    Profile::Field.name().to_owned()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [vehicle] table")]
struct RawVehicle {
    id: String,
    hpke_key: PathBuf,
    cloud_public_key: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [can] table")]
struct RawCan {
    mode: String,
    interface: Option<String>,
    bms_interface: Option<String>,
    pile_interface: Option<String>,
    #[serde(default = "d_address", deserialize_with = "de_u8")]
    address: u8,
    #[serde(default = "d_bms", deserialize_with = "de_u8")]
    bms_address: u8,
    #[serde(default = "d_pile", deserialize_with = "de_u8")]
    pile_address: u8,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [cloud] table")]
struct RawCloud {
    #[serde(default = "d_true")]
    enabled: bool,
    host: Option<String>,
    #[serde(default = "d_port")]
    port: u16,
    client_id: Option<String>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    #[serde(default = "d_request_timeout")]
    request_timeout: String,
    #[serde(default = "d_keep_alive")]
    keep_alive: String,
    #[serde(default = "d_wake_check_timeout")]
    wake_check_timeout: String,
    #[serde(default = "d_reconnect_min")]
    reconnect_min: String,
    #[serde(default = "d_reconnect_max")]
    reconnect_max: String,
    #[serde(default = "d_want_vouchers")]
    want_vouchers: u16,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [store] table")]
struct RawStore {
    #[serde(default = "d_store_path")]
    path: PathBuf,
    #[serde(default = "d_wallet_key")]
    wallet_key: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [control] table")]
struct RawControl {
    #[serde(default = "d_socket")]
    socket: PathBuf,
    group: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [session] table")]
struct RawSession {
    #[serde(default = "d_bus_silence")]
    bus_silence: String,
    #[serde(default = "d_true")]
    require_pile_auth: bool,
    #[serde(default = "d_auth_timeout")]
    auth_timeout: String,
    #[serde(default = "d_request_burst")]
    request_burst: u32,
    #[serde(default = "d_request_interval")]
    request_interval: String,
    #[serde(default = "d_max_unproven")]
    max_unproven: u32,
    #[serde(default = "d_unproven_cooldown")]
    unproven_cooldown: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [firewall] table")]
struct RawFirewall {
    #[serde(default = "d_true")]
    blank_vin: bool,
    #[serde(default = "d_rate")]
    rate_per_second: u32,
    #[serde(default = "d_burst")]
    burst: u32,
    bms_to_pile: Option<Vec<u32>>,
    pile_to_bms: Option<Vec<u32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [log] table")]
struct RawLog {
    #[serde(default = "d_level")]
    level: String,
}

/// A byte as TOML writes it (`0xF4`, `244`) or as the environment gives it
/// (the string `"0xF4"` or `"244"`): both must mean the same.
fn de_u8<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u8, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum IntOrText {
        Int(u64),
        Text(String),
    }
    let n = match IntOrText::deserialize(d)? {
        IntOrText::Int(n) => n,
        IntOrText::Text(t) => {
            let t = t.trim();
            let parsed = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => t.parse(),
            };
            parsed.map_err(|_| {
                serde::de::Error::custom(format!("{t:?} is not a number (e.g. 0xF4 or 244)"))
            })?
        }
    };
    u8::try_from(n).map_err(|_| serde::de::Error::custom(format!("{n} does not fit in a byte")))
}

fn d_true() -> bool {
    true
}
fn d_address() -> u8 {
    crate::gateway::vehicle_auth::DEFAULT_VEHICLE_ADDRESS
}
fn d_bms() -> u8 {
    crate::gbt27930::BMS_ADDRESS
}
fn d_pile() -> u8 {
    crate::gbt27930::CHARGER_ADDRESS
}
fn d_port() -> u16 {
    8883
}
fn d_request_timeout() -> String {
    "2s".into()
}
fn d_wake_check_timeout() -> String {
    "2s".into()
}
fn d_keep_alive() -> String {
    "30s".into()
}
fn d_reconnect_min() -> String {
    "500ms".into()
}
fn d_reconnect_max() -> String {
    "60s".into()
}
fn d_want_vouchers() -> u16 {
    4
}
fn d_store_path() -> PathBuf {
    "/var/lib/bmsgw/state.redb".into()
}
fn d_wallet_key() -> PathBuf {
    "/var/lib/bmsgw/wallet.key".into()
}
fn d_socket() -> PathBuf {
    "/run/bmsgw/control.sock".into()
}
fn d_bus_silence() -> String {
    "5s".into()
}
fn d_auth_timeout() -> String {
    "3s".into()
}
fn d_request_burst() -> u32 {
    ThrottleConfig::default().burst
}
fn d_request_interval() -> String {
    format!("{}s", ThrottleConfig::default().refill.as_secs())
}
fn d_max_unproven() -> u32 {
    ThrottleConfig::default().max_unproven
}
fn d_unproven_cooldown() -> String {
    format!("{}s", ThrottleConfig::default().cooldown.as_secs())
}
fn d_rate() -> u32 {
    100
}
fn d_burst() -> u32 {
    20
}
fn d_level() -> String {
    "info".into()
}

impl Default for RawStore {
    fn default() -> Self {
        RawStore {
            path: d_store_path(),
            wallet_key: d_wallet_key(),
        }
    }
}

impl Default for RawControl {
    fn default() -> Self {
        RawControl {
            socket: d_socket(),
            group: None,
        }
    }
}

impl Default for RawSession {
    fn default() -> Self {
        RawSession {
            bus_silence: d_bus_silence(),
            require_pile_auth: true,
            auth_timeout: d_auth_timeout(),
            request_burst: d_request_burst(),
            request_interval: d_request_interval(),
            max_unproven: d_max_unproven(),
            unproven_cooldown: d_unproven_cooldown(),
        }
    }
}

impl Default for RawFirewall {
    fn default() -> Self {
        RawFirewall {
            blank_vin: true,
            rate_per_second: d_rate(),
            burst: d_burst(),
            bms_to_pile: None,
            pile_to_bms: None,
        }
    }
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog { level: d_level() }
    }
}

// --- loading -------------------------------------------------------------------

impl Config {
    /// The file at `path`, overridden by the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars()
            .filter(|(k, _)| k.starts_with(&format!("{ENV_PREFIX}{ENV_SEPARATOR}")))
            .collect();
        Self::load_with_env(path, env)
    }

    /// The file at `path`, overridden by `env` only (tests; no process
    /// environment is read).
    pub fn load_with_env(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let text = read_bounded(path, MAX_CONFIG_LEN)?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, path, base, env)
    }

    /// TOML text with paths relative to `base` and no environment (the
    /// demo, tests).
    pub fn from_toml_str(text: &str, base: &Path) -> Result<Config, ConfigError> {
        Self::from_toml_str_with_env(text, base, std::iter::empty())
    }

    /// TOML text with paths relative to `base`, overridden by `env` only:
    /// [`Config::load_with_env`] without the file (fuzzing, tests).
    pub fn from_toml_str_with_env(
        text: &str,
        base: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        Self::parse(text, &base.join("<text>"), base, env)
    }

    fn parse(
        text: &str,
        path: &Path,
        base: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let prefix = format!("{ENV_PREFIX}{ENV_SEPARATOR}");
        let env: HashMap<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .collect();
        // The config crate reads `[n]` and `.` in a name as a path: a name
        // like BMSGW__X[99999999999] made it allocate an array that long and
        // abort (found by fuzzing). Our keys need neither.
        if let Some(name) = env.keys().find(|k| {
            !k[prefix.len()..]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        }) {
            return Err(ConfigError::EnvName { name: name.clone() });
        }
        if text.trim().is_empty() {
            return Err(ConfigError::Empty {
                path: path.to_owned(),
            });
        }
        let file_err = |e: config::ConfigError| ConfigError::Parse {
            path: path.to_owned(),
            message: one_line(&e.to_string()),
        };
        // The file's own syntax is the file's.
        build(text, &HashMap::new()).map_err(file_err)?;
        let env: BTreeMap<String, String> = env.into_iter().collect();
        let raw: Raw = match build(text, &env).and_then(|c| c.try_deserialize()) {
            Ok(raw) => raw,
            Err(e) => return Err(blame(text, path, &env, e)),
        };
        Checker {
            path,
            base,
            env: &env,
        }
        .check(raw)
    }

    /// The cloud link this configuration describes: subscribed to the
    /// vehicle's answers and pushes.
    pub fn link_config(&self) -> LinkConfig {
        let c = &self.cloud;
        let mut link = LinkConfig::new(
            c.host.clone(),
            c.port,
            c.client_id.clone(),
            TlsFiles {
                ca: c.ca.clone(),
                cert: c.cert.clone(),
                key: c.key.clone(),
            },
        );
        link.keep_alive = c.keep_alive;
        link.wake_check_timeout = c.wake_check_timeout;
        link.backoff_min = c.reconnect_min;
        link.backoff_max = c.reconnect_max;
        link.request_timeout = c.request_timeout;
        let id = &self.vehicle.id;
        link.subscriptions = vec![
            (topics::identity_resp(id), QoS::AtLeastOnce),
            (topics::vouchers(id), QoS::AtLeastOnce),
        ];
        link
    }
}

/// The file's text, overridden by `env`, as the `config` crate layers them.
fn build(
    text: &str,
    env: &(impl Clone + IntoIterator<Item = (String, String)>),
) -> Result<config::Config, config::ConfigError> {
    config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Toml))
        .add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator(ENV_SEPARATOR)
                .separator(ENV_SEPARATOR)
                // Off: it would turn "007" into 7 before serde sees it.
                // Numbers and booleans still parse from strings when the
                // field wants them.
                .try_parsing(false)
                .source(Some(env.clone().into_iter().collect())),
        )
        .build()
}

/// Who is to blame for a config that does not deserialize: the first
/// environment override that breaks a file that is fine without it, or
/// else the file (naming the overrides in effect).
fn blame(
    text: &str,
    path: &Path,
    env: &BTreeMap<String, String>,
    full: config::ConfigError,
) -> ConfigError {
    let file_alone = build(text, &BTreeMap::new()).and_then(|c| c.try_deserialize::<Raw>());
    if file_alone.is_ok() {
        for (name, value) in env {
            let one = BTreeMap::from([(name.clone(), value.clone())]);
            if let Err(e) = build(text, &one).and_then(|c| c.try_deserialize::<Raw>()) {
                return ConfigError::Env {
                    name: name.clone(),
                    value: value.clone(),
                    message: one_line(&e.to_string()),
                };
            }
        }
    }
    let mut message = one_line(&full.to_string());
    if !env.is_empty() {
        let names: Vec<&str> = env.keys().map(String::as_str).collect();
        message.push_str(&format!(
            " (with the environment overrides {})",
            names.join(", ")
        ));
    }
    ConfigError::Parse {
        path: path.to_owned(),
        message,
    }
}

/// A parser's message on one line, in the config's own words: TOML errors
/// come as several lines with a caret under the column; a missing section
/// is named as a section.
pub(crate) fn one_line(message: &str) -> String {
    let lines: Vec<&str> = message
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty() && !l.starts_with('|') && !l.chars().all(|c| c == '^' || c == ' ')
        })
        .collect();
    let text = match lines.as_slice() {
        [] => message.trim().to_string(),
        [one] => (*one).to_string(),
        [first, .., last] => format!("{first}: {last}"),
    };
    if let Some(rest) = text.strip_prefix("missing configuration field \"")
        && let Some(name) = rest.strip_suffix('"')
    {
        return match name.split_once('.') {
            None => format!("the [{name}] section is missing"),
            Some((section, key)) => format!("`{key}` is missing in [{section}]"),
        };
    }
    text
}

/// Reads at most `max` bytes of `path` as UTF-8 text: a larger file is
/// refused before it is read into memory.
fn read_bounded(path: &Path, max: usize) -> Result<String, ConfigError> {
    let bytes = super::keyfile::read_bounded(path, max).map_err(|source| {
        if source.kind() == std::io::ErrorKind::InvalidData {
            ConfigError::TooLarge {
                path: path.to_owned(),
                max,
            }
        } else {
            ConfigError::Read {
                path: path.to_owned(),
                source,
            }
        }
    })?;
    String::from_utf8(bytes).map_err(|_| ConfigError::Parse {
        path: path.to_owned(),
        message: "not UTF-8 text".into(),
    })
}

/// Turns the file's shape into a checked [`Config`].
struct Checker<'a> {
    path: &'a Path,
    base: &'a Path,
    /// The environment overrides, to name the variable a refused value
    /// came from.
    env: &'a BTreeMap<String, String>,
}

impl Checker<'_> {
    fn bad(
        &self,
        key: &'static str,
        value: impl std::fmt::Display,
        expected: impl Into<String>,
    ) -> ConfigError {
        let name = format!(
            "{ENV_PREFIX}{ENV_SEPARATOR}{}",
            key.replace('.', ENV_SEPARATOR).to_uppercase()
        );
        if let Some(env_value) = self.env.get(&name) {
            return ConfigError::EnvInvalid {
                name,
                key,
                value: env_value.clone(),
                expected: expected.into(),
            };
        }
        ConfigError::Invalid {
            path: self.path.to_owned(),
            key,
            value: value.to_string(),
            expected: expected.into(),
        }
    }

    fn resolve(&self, p: PathBuf) -> PathBuf {
        if p.is_absolute() {
            p
        } else {
            self.base.join(p)
        }
    }

    fn duration(
        &self,
        key: &'static str,
        text: &str,
        range: std::ops::RangeInclusive<Duration>,
    ) -> Result<Duration, ConfigError> {
        let d = crate::time::parse_duration(text)
            .map_err(|e| self.bad(key, text, format!("a duration such as 2s or 500ms ({e})")))?;
        if !range.contains(&d) {
            return Err(self.bad(
                key,
                text,
                format!("between {:?} and {:?}", range.start(), range.end()),
            ));
        }
        Ok(d)
    }

    fn count(
        &self,
        key: &'static str,
        v: u32,
        range: std::ops::RangeInclusive<u32>,
    ) -> Result<u32, ConfigError> {
        if range.contains(&v) {
            Ok(v)
        } else {
            Err(self.bad(
                key,
                v.to_string(),
                format!("a whole number from {} to {}", range.start(), range.end()),
            ))
        }
    }

    fn address(&self, key: &'static str, v: u8) -> Result<Address, ConfigError> {
        if v >= 0xFE {
            return Err(self.bad(
                key,
                format!("{v:#04x}"),
                "a J1939 node address 0x00..=0xFD (0xFE is null, 0xFF global)",
            ));
        }
        Ok(Address(v))
    }

    fn iface(
        &self,
        key: &'static str,
        v: Option<String>,
        mode: &str,
    ) -> Result<String, ConfigError> {
        let name = v.ok_or_else(|| {
            self.bad(
                key,
                "(missing)",
                format!("an interface name, required in {mode} mode"),
            )
        })?;
        if name.is_empty() || name.len() > 15 || name.contains(['/', ' ']) {
            return Err(self.bad(
                key,
                &name,
                "a network interface name of 1 to 15 characters (e.g. can0)",
            ));
        }
        Ok(name)
    }

    fn pgns(
        &self,
        key: &'static str,
        v: Option<Vec<u32>>,
        default: std::collections::BTreeSet<Pgn>,
    ) -> Result<Vec<u32>, ConfigError> {
        match v {
            None => Ok(default.into_iter().map(Pgn::raw).collect()),
            Some(list) => {
                for &p in &list {
                    if Pgn::new(p).is_err() {
                        return Err(self.bad(
                            key,
                            format!("{p:#x}"),
                            "PGNs of 18 bits (e.g. 0x2600 for CHM)",
                        ));
                    }
                }
                Ok(list)
            }
        }
    }

    fn check(&self, raw: Raw) -> Result<Config, ConfigError> {
        let id = VehicleId::parse(&raw.vehicle.id)
            .map_err(|e| self.bad("vehicle.id", &raw.vehicle.id, format!("a vehicle id ({e})")))?;
        let can_mode = raw.can.mode.as_str();
        let interfaces = match can_mode {
            "single-bus" => CanInterfaces::SingleBus {
                interface: self.iface("can.interface", raw.can.interface, "single-bus")?,
            },
            "bridge" => {
                let bms = self.iface("can.bms_interface", raw.can.bms_interface, "bridge")?;
                let pile = self.iface("can.pile_interface", raw.can.pile_interface, "bridge")?;
                if bms == pile {
                    return Err(self.bad(
                        "can.pile_interface",
                        &pile,
                        "an interface other than can.bms_interface",
                    ));
                }
                CanInterfaces::Bridge { bms, pile }
            }
            other => return Err(self.bad("can.mode", other, "\"single-bus\" or \"bridge\"")),
        };
        let can = CanConfig {
            interfaces,
            address: self.address("can.address", raw.can.address)?,
            bms_address: self.address("can.bms_address", raw.can.bms_address)?,
            pile_address: self.address("can.pile_address", raw.can.pile_address)?,
        };
        let distinct: BTreeMap<u8, ()> = [can.address.0, can.bms_address.0, can.pile_address.0]
            .into_iter()
            .map(|a| (a, ()))
            .collect();
        if distinct.len() != 3 {
            return Err(self.bad(
                "can.address",
                format!(
                    "{:#04x}, bms {:#04x}, pile {:#04x}",
                    can.address.0, can.bms_address.0, can.pile_address.0
                ),
                "three different addresses for the gateway, the BMS and the pile",
            ));
        }

        let cloud = match raw.cloud {
            Some(c) if c.enabled => {
                let need = |key: &'static str, v: Option<PathBuf>| {
                    v.map(|p| self.resolve(p)).ok_or_else(|| {
                        self.bad(
                            key,
                            "(missing)",
                            "a file path (required when the cloud is enabled)",
                        )
                    })
                };
                let host = c.host.filter(|h| !h.is_empty()).ok_or_else(|| {
                    self.bad(
                        "cloud.host",
                        "(missing)",
                        "the broker's host name or IP address",
                    )
                })?;
                let reconnect_min = self.duration(
                    "cloud.reconnect_min",
                    &c.reconnect_min,
                    Duration::from_millis(10)..=Duration::from_secs(600),
                )?;
                let reconnect_max = self.duration(
                    "cloud.reconnect_max",
                    &c.reconnect_max,
                    Duration::from_millis(10)..=Duration::from_secs(3600),
                )?;
                if reconnect_min > reconnect_max {
                    return Err(self.bad(
                        "cloud.reconnect_min",
                        &c.reconnect_min,
                        format!("at most cloud.reconnect_max ({})", c.reconnect_max),
                    ));
                }
                if c.port == 0 {
                    return Err(self.bad("cloud.port", 0, "a TCP port 1..=65535"));
                }
                if c.want_vouchers > 64 {
                    return Err(self.bad(
                        "cloud.want_vouchers",
                        c.want_vouchers,
                        "at most 64 (the cloud sends at most 64 per grant)",
                    ));
                }
                CloudLinkConfig {
                    enabled: true,
                    host,
                    port: c.port,
                    client_id: c.client_id.unwrap_or_else(|| id.to_string()),
                    ca: need("cloud.ca", c.ca)?,
                    cert: need("cloud.cert", c.cert)?,
                    key: need("cloud.key", c.key)?,
                    request_timeout: self.duration(
                        "cloud.request_timeout",
                        &c.request_timeout,
                        Duration::from_millis(100)..=Duration::from_secs(30),
                    )?,
                    keep_alive: self.duration(
                        "cloud.keep_alive",
                        &c.keep_alive,
                        Duration::from_secs(5)..=Duration::from_secs(3600),
                    )?,
                    wake_check_timeout: self.duration(
                        "cloud.wake_check_timeout",
                        &c.wake_check_timeout,
                        Duration::from_millis(100)..=Duration::from_secs(60),
                    )?,
                    reconnect_min,
                    reconnect_max,
                    want_vouchers: c.want_vouchers,
                }
            }
            _ => CloudLinkConfig {
                enabled: false,
                host: String::new(),
                port: d_port(),
                client_id: id.to_string(),
                ca: PathBuf::new(),
                cert: PathBuf::new(),
                key: PathBuf::new(),
                request_timeout: Duration::from_secs(2),
                keep_alive: Duration::from_secs(30),
                wake_check_timeout: Duration::from_secs(2),
                reconnect_min: Duration::from_millis(500),
                reconnect_max: Duration::from_secs(60),
                want_vouchers: 0,
            },
        };

        let level = raw.log.level;
        if tracing_subscriber::EnvFilter::try_new(&level).is_err() {
            return Err(self.bad(
                "log.level",
                &level,
                "error, warn, info, debug or trace (or a RUST_LOG-style filter)",
            ));
        }
        if raw.firewall.rate_per_second == 0 {
            return Err(self.bad(
                "firewall.rate_per_second",
                0,
                "at least 1 message per second",
            ));
        }
        Ok(Config {
            path: self.path.to_owned(),
            vehicle: VehicleConfig {
                id,
                hpke_key: self.resolve(raw.vehicle.hpke_key),
                cloud_public_key: self.resolve(raw.vehicle.cloud_public_key),
            },
            can,
            cloud,
            store: StoreConfig {
                path: self.resolve(raw.store.path),
                wallet_key: self.resolve(raw.store.wallet_key),
            },
            control: ControlConfig {
                socket: self.resolve(raw.control.socket),
                group: raw.control.group.filter(|g| !g.is_empty()),
            },
            session: SessionConfig {
                bus_silence: self.duration(
                    "session.bus_silence",
                    &raw.session.bus_silence,
                    Duration::from_secs(1)..=Duration::from_secs(600),
                )?,
                require_pile_auth: raw.session.require_pile_auth,
                auth_timeout: self.duration(
                    "session.auth_timeout",
                    &raw.session.auth_timeout,
                    Duration::from_millis(100)..=Duration::from_secs(10),
                )?,
                throttle: ThrottleConfig {
                    burst: self.count(
                        "session.request_burst",
                        raw.session.request_burst,
                        1..=1000,
                    )?,
                    refill: self.duration(
                        "session.request_interval",
                        &raw.session.request_interval,
                        Duration::from_secs(1)..=Duration::from_secs(3600),
                    )?,
                    max_unproven: self.count(
                        "session.max_unproven",
                        raw.session.max_unproven,
                        1..=1000,
                    )?,
                    cooldown: self.duration(
                        "session.unproven_cooldown",
                        &raw.session.unproven_cooldown,
                        Duration::ZERO..=Duration::from_secs(86_400),
                    )?,
                },
            },
            firewall: FirewallSection {
                blank_vin: raw.firewall.blank_vin,
                rate_per_second: raw.firewall.rate_per_second,
                burst: raw.firewall.burst.max(1),
                bms_to_pile: self.pgns(
                    "firewall.bms_to_pile",
                    raw.firewall.bms_to_pile,
                    crate::gateway::firewall::default_bms_to_pile(),
                )?,
                pile_to_bms: self.pgns(
                    "firewall.pile_to_bms",
                    raw.firewall.pile_to_bms,
                    crate::gateway::firewall::default_pile_to_bms(),
                )?,
            },
            interop: InteropConfig {
                bms: self.profile("interop.bms", &raw.interop.bms)?,
                pile: self.profile("interop.pile", &raw.interop.pile)?,
            },
            log: LogConfig { level },
        })
    }

    fn profile(&self, key: &'static str, v: &str) -> Result<Profile, ConfigError> {
        v.parse()
            .map_err(|_| self.bad(key, v, "\"field\" or \"strict\""))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[vehicle]
id = "veh-a"
hpke_key = "keys/vehicle-hpke.key"
cloud_public_key = "/etc/bmsgw/cloud-hpke.pub"

[can]
mode = "bridge"
bms_interface = "can1"
pile_interface = "can0"

[cloud]
host = "mqtt.example.com"
ca = "ca.pem"
cert = "vehicle.pem"
key = "vehicle.key"
"#;

    fn load(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("bmsgw.toml");
        std::fs::write(&path, text).expect("write");
        Config::load_with_env(
            &path,
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    fn err(text: &str, env: &[(&str, &str)]) -> String {
        match load(text, env) {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn defaults_fill_in_and_relative_paths_resolve_against_the_file() {
        let c = load(MINIMAL, &[]).expect("loads");
        assert_eq!(c.vehicle.id.as_str(), "veh-a");
        assert!(c.vehicle.hpke_key.is_absolute());
        assert!(c.vehicle.hpke_key.ends_with("keys/vehicle-hpke.key"));
        assert_eq!(
            c.vehicle.cloud_public_key,
            PathBuf::from("/etc/bmsgw/cloud-hpke.pub")
        );
        assert_eq!(
            c.can.interfaces,
            CanInterfaces::Bridge {
                bms: "can1".into(),
                pile: "can0".into()
            }
        );
        assert_eq!(c.can.address, Address(0xF5));
        assert_eq!(c.cloud.port, 8883);
        assert_eq!(c.cloud.client_id, "veh-a");
        assert_eq!(c.cloud.request_timeout, Duration::from_secs(2));
        assert_eq!(c.store.path, PathBuf::from("/var/lib/bmsgw/state.redb"));
        assert_eq!(c.control.socket, PathBuf::from("/run/bmsgw/control.sock"));
        assert!(c.session.require_pile_auth);
        assert_eq!(c.session.throttle, ThrottleConfig::default());
        assert!(
            c.firewall.bms_to_pile.contains(&0x0200),
            "BRM allowed by default"
        );
        let link = c.link_config();
        assert_eq!(link.subscriptions.len(), 2);
    }

    #[test]
    fn environment_overrides_the_file() {
        let c = load(
            MINIMAL,
            &[
                ("BMSGW__CLOUD__HOST", "broker.test"),
                ("BMSGW__CLOUD__PORT", "9883"),
                ("BMSGW__CLOUD__REQUEST_TIMEOUT", "750ms"),
                ("BMSGW__SESSION__REQUIRE_PILE_AUTH", "false"),
                // Strings that look like numbers stay strings.
                ("BMSGW__VEHICLE__ID", "007"),
                ("BMSGW__CLOUD__CLIENT_ID", "1e3"),
                ("OTHER__CLOUD__HOST", "ignored"),
            ],
        )
        .expect("loads");
        assert_eq!(c.cloud.host, "broker.test");
        assert_eq!(c.cloud.port, 9883);
        assert_eq!(c.cloud.request_timeout, Duration::from_millis(750));
        assert!(!c.session.require_pile_auth);
        assert_eq!(c.vehicle.id.as_str(), "007");
        assert_eq!(c.cloud.client_id, "1e3");
    }

    /// Found by `fuzz/run.sh 600` (target config): the config crate reads
    /// `[n]` in a variable's name as an array index and allocated a vector
    /// of that length, so this aborted the process.
    #[test]
    fn an_environment_name_with_a_path_in_it_is_refused_by_name() {
        for name in [
            "BMSGW__KF0000[0][222222222222221]",
            "BMSGW__CLOUD__PORT[3]",
            "BMSGW__CLOUD.PORT",
            "BMSGW__CLOUD__PORT-X",
        ] {
            let env = [(name.to_string(), "1".to_string())];
            let err = Config::from_toml_str_with_env(MINIMAL, Path::new("/etc/bmsgw"), env)
                .expect_err(name);
            assert!(
                matches!(&err, ConfigError::EnvName { name: n } if n == name),
                "{name}: {err}"
            );
            assert!(err.to_string().contains(name), "{err}");
        }
        // Other variables are none of ours, whatever their names.
        let env = [("PATH[0]".to_string(), "/bin".to_string())];
        Config::from_toml_str_with_env(MINIMAL, Path::new("/etc/bmsgw"), env).expect("loads");
    }

    #[test]
    fn text_with_environment_is_read_as_a_file_would_be() {
        let env = [
            ("BMSGW__CLOUD__PORT", "1883"),
            ("BMSGW__VEHICLE__ID", "007"),
        ];
        let owned = || env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        let c = Config::from_toml_str_with_env(MINIMAL, Path::new("/etc/bmsgw"), owned())
            .expect("loads");
        assert_eq!(c.cloud.port, 1883);
        assert_eq!(c.vehicle.id.as_str(), "007");
        assert_eq!(
            c.vehicle.hpke_key,
            PathBuf::from("/etc/bmsgw/keys/vehicle-hpke.key")
        );
        let from_file = load(MINIMAL, &env).expect("loads");
        assert_eq!(from_file.cloud.port, c.cloud.port);
        assert_eq!(from_file.vehicle.id, c.vehicle.id);
    }

    #[test]
    fn errors_name_the_file_the_key_the_value_and_the_expectation() {
        let e = err(
            &MINIMAL.replace("mode = \"bridge\"", "mode = \"both\""),
            &[],
        );
        assert!(
            e.contains("bmsgw.toml")
                && e.contains("can.mode")
                && e.contains("both")
                && e.contains("bridge"),
            "{e}"
        );

        let e = err(MINIMAL, &[("BMSGW__SESSION__REQUEST_BURST", "0")]);
        assert!(
            e.contains("session.request_burst") && e.contains("whole number from 1"),
            "{e}"
        );

        let e = err(MINIMAL, &[("BMSGW__CLOUD__REQUEST_TIMEOUT", "soon")]);
        assert!(
            e.contains("cloud.request_timeout") && e.contains("soon") && e.contains("duration"),
            "{e}"
        );

        let e = err(&MINIMAL.replace("[can]", "[can]\naddress = 0xFF"), &[]);
        assert!(e.contains("can.address") && e.contains("0xff"), "{e}");

        let e = err(&MINIMAL.replace("[can]", "[can]\naddress = 0xF4"), &[]);
        assert!(e.contains("three different addresses"), "{e}");

        let e = err(
            &MINIMAL.replace("pile_interface = \"can0\"", "pile_interface = \"can1\""),
            &[],
        );
        assert!(e.contains("can.pile_interface"), "{e}");

        let e = err(&MINIMAL.replace("id = \"veh-a\"", "id = \"veh a/1\""), &[]);
        assert!(e.contains("vehicle.id"), "{e}");

        let e = err(&MINIMAL.replace("host = \"mqtt.example.com\"", ""), &[]);
        assert!(e.contains("cloud.host") && e.contains("missing"), "{e}");
    }

    #[test]
    fn a_misspelt_key_is_an_error_not_ignored() {
        let e = err(
            &MINIMAL.replace("[cloud]", "[cloud]\nrequest_timout = \"1s\""),
            &[],
        );
        assert!(e.contains("request_timout"), "{e}");
        let e = err(&format!("{MINIMAL}\n[sesion]\nbus_silence = \"3s\"\n"), &[]);
        assert!(e.contains("sesion"), "{e}");
    }

    #[test]
    fn single_bus_needs_its_interface_and_the_cloud_may_be_off() {
        let text = MINIMAL
            .replace("mode = \"bridge\"", "mode = \"single-bus\"")
            .replace(
                "bms_interface = \"can1\"\npile_interface = \"can0\"",
                "interface = \"can0\"",
            )
            .replace("[cloud]", "[cloud]\nenabled = false");
        let c = load(&text, &[]).expect("loads");
        assert_eq!(
            c.can.interfaces,
            CanInterfaces::SingleBus {
                interface: "can0".into()
            }
        );
        assert!(!c.cloud.enabled);
        let e = err(&text.replace("interface = \"can0\"", ""), &[]);
        assert!(
            e.contains("can.interface") && e.contains("single-bus"),
            "{e}"
        );
    }

    /// An override is judged as an override: named, not blamed on the
    /// file, with the same spelling the file allows.
    #[test]
    fn environment_errors_name_the_variable_and_not_the_file() {
        let e = err(MINIMAL, &[("BMSGW__CLOUD__PORT", "70000")]);
        assert!(
            e.starts_with("environment variable BMSGW__CLOUD__PORT=\"70000\""),
            "{e}"
        );
        assert!(!e.contains("bmsgw.toml"), "{e}");
        let e = err(MINIMAL, &[("BMSGW__CLOUD__PORTT", "1")]);
        assert!(
            e.contains("BMSGW__CLOUD__PORTT") && e.contains("unknown field `portt`"),
            "{e}"
        );
        assert!(!e.contains("bmsgw.toml"), "{e}");
        let e = err(MINIMAL, &[("BMSGW__SESSION__AUTH_TIMEOUT", "1h")]);
        assert!(
            e.contains("BMSGW__SESSION__AUTH_TIMEOUT=\"1h\" (`session.auth_timeout`)"),
            "{e}"
        );
        // 0xF4 as TOML writes it, and as the environment gives it.
        let c =
            load(&MINIMAL.replace("[can]", "[can]\naddress = 0xF3"), &[]).expect("hex in the file");
        assert_eq!(c.can.address, Address(0xF3));
        let c =
            load(MINIMAL, &[("BMSGW__CAN__ADDRESS", "0xF3")]).expect("hex from the environment");
        assert_eq!(c.can.address, Address(0xF3));
        let c =
            load(MINIMAL, &[("BMSGW__CAN__ADDRESS", "243")]).expect("decimal from the environment");
        assert_eq!(c.can.address, Address(0xF3));
        // File errors say nothing of the environment.
        let e = err("[vehicle\n", &[]);
        assert!(
            e.contains("bmsgw.toml") && e.contains("TOML parse error"),
            "{e}"
        );
        assert!(!e.contains("BMSGW__") && !e.contains('\n'), "{e}");
    }

    #[test]
    fn empty_huge_and_wrongly_shaped_files_get_plain_words() {
        let e = err("", &[]);
        assert!(e.contains("the file is empty"), "{e}");
        let e = err("  \n\t\n", &[]);
        assert!(e.contains("the file is empty"), "{e}");
        let e = err("vehicle = 5\n", &[]);
        assert!(e.contains("a [vehicle] table") && !e.contains("Raw"), "{e}");
        let e = err("[can]\nmode = \"bridge\"\n", &[]);
        assert!(e.contains("the [vehicle] section is missing"), "{e}");
        let huge = " ".repeat(MAX_CONFIG_LEN + 1);
        let e = err(&huge, &[]);
        assert!(e.contains("over 1048576 bytes"), "{e}");
    }

    #[test]
    fn interop_profiles_default_to_field_and_are_set_per_side() {
        let c = load(MINIMAL, &[]).expect("loads");
        assert_eq!(c.interop, InteropConfig::default());
        assert_eq!(
            (c.interop.bms, c.interop.pile),
            (Profile::Field, Profile::Field)
        );
        let c = load(
            &format!("{MINIMAL}\n[interop]\nbms = \"strict\"\n"),
            &[("BMSGW__INTEROP__PILE", "strict")],
        )
        .expect("loads");
        assert_eq!(
            (c.interop.bms, c.interop.pile),
            (Profile::Strict, Profile::Strict)
        );
        let e = err(&format!("{MINIMAL}\n[interop]\npile = \"lenient\"\n"), &[]);
        assert!(
            e.contains("interop.pile")
                && e.contains("lenient")
                && e.contains("\"field\" or \"strict\""),
            "{e}"
        );
    }

    #[test]
    fn garbage_is_refused_with_the_file_name() {
        let e = err("this is [not toml", &[]);
        assert!(e.contains("bmsgw.toml"), "{e}");
        let e = match Config::load(Path::new("/nonexistent/bmsgw.toml")) {
            Ok(_) => panic!("loaded a missing file"),
            Err(e) => e.to_string(),
        };
        assert!(
            e.contains("/nonexistent/bmsgw.toml") && e.contains("cannot read"),
            "{e}"
        );
    }

    #[test]
    fn the_shipped_example_config_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/bmsgw.toml");
        let c = Config::load_with_env(&path, std::iter::empty()).expect("config/bmsgw.toml loads");
        assert_eq!(c.store.path, PathBuf::from("/var/lib/bmsgw/state.redb"));
    }
}
