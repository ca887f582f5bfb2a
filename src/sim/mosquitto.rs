//! The shipped broker config (`config/mosquitto/mosquitto.conf`) run for
//! real by the tests and `bmsgw bench cloud`: finding the binary, and the
//! file with only its paths and port replaced, so that everything that
//! shapes the traffic (TLS 1.3, mutual TLS, identities bound to
//! certificates, the dynamic-security ACLs, persistence, queues,
//! `set_tcp_nodelay`) is what an integrator deploys.

use std::path::{Path, PathBuf};

use crate::sim::pki::DevPki;

/// The mosquitto binary to use instead of the one on PATH.
pub const BINARY_ENV: &str = "BMSGW_MOSQUITTO";
/// The dynamic-security plugin to use instead of the one found.
pub const DYNSEC_ENV: &str = "BMSGW_MOSQUITTO_DYNSEC";
/// The plugin's file name in mosquitto's packages.
const DYNSEC_PLUGIN: &str = "mosquitto_dynamic_security.so";

/// `config/mosquitto/mosquitto.conf` as shipped.
pub const SHIPPED_CONF: &str = include_str!("../../config/mosquitto/mosquitto.conf");

/// The lines [`shipped_config`] replaces: each must be in the file once.
const REPLACED: [&str; 7] = [
    "plugin",
    "plugin_opt_config_file",
    "persistence_location",
    "listener",
    "cafile",
    "certfile",
    "keyfile",
];

/// The shipped file no longer has the lines [`shipped_config`] replaces.
#[derive(Debug, thiserror::Error)]
#[error(
    "expected {} lines to replace ({}), found {found}",
    REPLACED.len(),
    REPLACED.join(", ")
)]
pub struct ShapeError {
    pub found: usize,
}

/// The mosquitto binary: `$BMSGW_MOSQUITTO` if set, else on PATH or in
/// Debian's /usr/sbin (not on a normal user's PATH).
pub fn find_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(BINARY_ENV) {
        let path = PathBuf::from(path);
        return path.is_file().then_some(path);
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|d| d.join("mosquitto"))
        .find(|p| p.is_file())
}

/// mosquitto's dynamic-security plugin: `$BMSGW_MOSQUITTO_DYNSEC` if set,
/// else where Debian, Ubuntu and source builds install it.
pub fn find_dynsec_plugin() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(DYNSEC_ENV) {
        let path = PathBuf::from(path);
        return path.is_file().then_some(path);
    }
    let multiarch = std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join(DYNSEC_PLUGIN));
    multiarch
        .chain(
            ["/usr/lib", "/usr/local/lib", "/usr/lib64"]
                .into_iter()
                .map(|d| Path::new(d).join(DYNSEC_PLUGIN)),
        )
        .find(|p| p.is_file())
}

/// `shipped` with the PKI's TLS files, the dynamic-security file `dynsec`,
/// the plugin found on this machine (the shipped path when none is),
/// `data_dir` and a listener on 127.0.0.1:`port`, run as the current user
/// (as root mosquitto would switch to user `mosquitto`, which cannot read
/// the PKI's 0600 keys).
pub fn shipped_config(
    shipped: &str,
    pki: &DevPki,
    dynsec: &Path,
    data_dir: &Path,
    port: u16,
) -> Result<String, ShapeError> {
    let plugin = find_dynsec_plugin();
    let p = |path: &Path| path.display().to_string();
    let mut found = 0;
    let mut out: Vec<String> = shipped
        .lines()
        .map(|line| {
            let mut words = line.split_whitespace();
            let key = words.next().unwrap_or("");
            let value = match key {
                "plugin" => plugin
                    .as_deref()
                    .map_or_else(|| words.collect::<Vec<_>>().join(" "), p),
                "plugin_opt_config_file" => p(dynsec),
                "persistence_location" => format!("{}/", data_dir.display()),
                "listener" => format!("{port} 127.0.0.1"),
                "cafile" => p(&pki.ca_cert),
                "certfile" => p(&pki.broker_cert),
                "keyfile" => p(&pki.broker_key),
                _ => return line.to_owned(),
            };
            found += 1;
            format!("{key} {value}")
        })
        .collect();
    if found != REPLACED.len() {
        return Err(ShapeError { found });
    }
    out.push(
        "# Stay the current user: as root, mosquitto would switch to user\n\
         # `mosquitto`, which cannot read these 0600 keys."
            .into(),
    );
    out.push("user root".into());
    Ok(out.join("\n") + "\n")
}
