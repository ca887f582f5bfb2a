//! `bmsgw check-config F`: validate a configuration and the files it names
//! without starting anything, as an integrator does before `systemctl
//! start`. Each check prints one line; any failure makes the command fail.

use std::path::Path;

use super::config::{CanInterfaces, Config, ConfigError};
use crate::cloud::envelope::{KeyPair, PublicKey};
use crate::cloud::tls::{TlsFiles, client_config};

/// One check and how it went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckLine {
    pub ok: bool,
    pub what: String,
    /// What was found, or what is wrong and what to do.
    pub detail: String,
}

/// Every check made.
#[derive(Clone, Debug, Default)]
pub struct CheckReport {
    pub lines: Vec<CheckLine>,
}

impl CheckReport {
    pub fn passed(&self) -> bool {
        self.lines.iter().all(|l| l.ok)
    }

    fn push(&mut self, what: impl Into<String>, result: Result<String, String>) {
        let (ok, detail) = match result {
            Ok(d) => (true, d),
            Err(d) => (false, d),
        };
        self.lines.push(CheckLine {
            ok,
            what: what.into(),
            detail,
        });
    }

    /// One line per check: `ok   what: detail` or `FAIL what: detail`.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for l in &self.lines {
            let mark = if l.ok { "ok  " } else { "FAIL" };
            out.push_str(&format!("{mark} {}: {}\n", l.what, l.detail));
        }
        out
    }
}

/// Load `path` (with the process environment's overrides) and check the
/// files it names. `Err` only when the configuration itself is refused.
pub fn check(path: &Path) -> Result<CheckReport, ConfigError> {
    let config = Config::load(path)?;
    Ok(check_files(&config))
}

/// The file checks of a loaded configuration.
pub fn check_files(config: &Config) -> CheckReport {
    let mut r = CheckReport::default();
    r.push(
        "config",
        Ok(format!(
            "{}: vehicle {}, {}",
            config.path.display(),
            config.vehicle.id,
            match &config.can.interfaces {
                CanInterfaces::SingleBus { interface } => format!("single-bus mode on {interface}"),
                CanInterfaces::Bridge { bms, pile } =>
                    format!("bridge mode (BMS on {bms}, pile on {pile})"),
            }
        )),
    );
    r.push(
        "vehicle.hpke_key",
        KeyPair::load(&config.vehicle.hpke_key)
            .map(|_| {
                format!(
                    "{}: X25519 key, mode 0600",
                    config.vehicle.hpke_key.display()
                )
            })
            .map_err(|e| e.to_string()),
    );
    r.push(
        "vehicle.cloud_public_key",
        PublicKey::load(&config.vehicle.cloud_public_key)
            .map(|_| {
                format!(
                    "{}: X25519 public key",
                    config.vehicle.cloud_public_key.display()
                )
            })
            .map_err(|e| e.to_string()),
    );
    if config.cloud.enabled {
        let files = TlsFiles {
            ca: config.cloud.ca.clone(),
            cert: config.cloud.cert.clone(),
            key: config.cloud.key.clone(),
        };
        r.push(
            "cloud TLS (ca, cert, key)",
            client_config(&files)
                .map(|_| {
                    format!(
                        "certificates parse, key matches and is 0600; broker {}:{}",
                        config.cloud.host, config.cloud.port
                    )
                })
                .map_err(|e| e.to_string()),
        );
    } else {
        r.push(
            "cloud",
            Ok("disabled: vouchers and imported tickets only".into()),
        );
    }
    let wallet = &config.store.wallet_key;
    r.push(
        "store.wallet_key",
        if wallet.exists() {
            super::keyfile::load_key(wallet)
                .map(|_| format!("{}: 32-byte key, mode 0600", wallet.display()))
                .map_err(|e| e.to_string())
        } else {
            writable_dir(wallet).map(|d| {
                format!(
                    "{} will be created at first start, in {d}",
                    wallet.display()
                )
            })
        },
    );
    r.push(
        "store.path",
        if config.store.path.exists() {
            Ok(format!(
                "{} exists (opened and checked at start)",
                config.store.path.display()
            ))
        } else {
            writable_dir(&config.store.path)
                .map(|d| format!("{} will be created in {d}", config.store.path.display()))
        },
    );
    r.push(
        "control.socket",
        writable_dir(&config.control.socket).map(|d| {
            format!(
                "{} in {d}{}",
                config.control.socket.display(),
                config
                    .control
                    .group
                    .as_ref()
                    .map_or(String::new(), |g| format!(", group {g}"))
            )
        }),
    );
    r
}

/// The directory `path` would be created in, if it exists (under systemd,
/// StateDirectory and RuntimeDirectory create theirs at start).
fn writable_dir(path: &Path) -> Result<String, String> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(dir.display().to_string()),
        Ok(_) => Err(format!("{} is not a directory", dir.display())),
        Err(_) => Ok(format!(
            "{} (not there yet: systemd's StateDirectory/RuntimeDirectory or bmsgw run creates it)",
            dir.display()
        )),
    }
}

#[cfg(all(test, feature = "sim"))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_dev_pki_config_passes_and_a_loose_key_fails_with_the_fix() {
        let dir = tempfile::tempdir().expect("temp dir");
        let pki = crate::sim::pki::DevPki::generate(&crate::sim::pki::DevPkiOptions::new(
            dir.path().join("pki"),
        ))
        .expect("pki");
        let path = pki
            .write_gateway_toml(
                "veh-a",
                &crate::sim::pki::GatewayTomlOptions {
                    broker_port: 8883,
                    can: CanInterfaces::Bridge {
                        bms: "vcan0".into(),
                        pile: "vcan1".into(),
                    },
                    state_dir: dir.path().join("state"),
                    control_socket: dir.path().join("run/control.sock"),
                    request_timeout: std::time::Duration::from_secs(2),
                },
            )
            .expect("gateway toml");
        let config = Config::load_with_env(&path, std::iter::empty()).expect("loads");
        let report = check_files(&config);
        assert!(report.passed(), "{}", report.render());
        assert!(report.render().contains("will be created"));

        let key = pki.vehicle("veh-a").key;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let report = check_files(&config);
        assert!(!report.passed());
        let text = report.render();
        assert!(
            text.contains("FAIL cloud TLS") && text.contains("chmod"),
            "{text}"
        );

        std::fs::write(&pki.cloud_hpke_pub, "not a key\n").expect("write");
        let text = check_files(&config).render();
        assert!(text.contains("FAIL vehicle.cloud_public_key"), "{text}");
    }
}
