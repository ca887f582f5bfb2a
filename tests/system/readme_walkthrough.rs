//! The README's provisioning and configuration steps, followed literally:
//! every `bmsgw pki dev` and `bmsgw check-config` line of its shell blocks
//! that works on relative paths, in the README's order, in a fresh
//! temporary working directory, with the binary `cargo test` built. A step
//! that fails, or a README that no longer has the steps, fails the test:
//! the README and the code cannot drift apart unnoticed.

use std::path::Path;
use std::process::Command;

/// The command lines of the README's ```sh blocks that start with `prefix`,
/// comments and trailing spaces removed.
fn readme_commands(prefix: &str) -> Vec<(usize, String)> {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    let mut in_shell = false;
    let mut out = Vec::new();
    for (i, line) in readme.lines().enumerate() {
        let t = line.trim();
        if t.starts_with("```") {
            in_shell = !in_shell && t == "```sh";
            continue;
        }
        if !in_shell {
            continue;
        }
        let command = t.split(" #").next().unwrap_or("").trim();
        if command.starts_with(prefix) {
            out.push((i + 1, command.to_string()));
        }
    }
    out
}

/// Runs a README line (`bmsgw …`, split on spaces: the README's lines have
/// no quoting) in `dir`: its output, or why it failed.
fn run(dir: &Path, line: usize, command: &str) -> String {
    let mut words = command.split_whitespace();
    assert_eq!(words.next(), Some("bmsgw"));
    let out = Command::new(env!("CARGO_BIN_EXE_bmsgw"))
        .args(words)
        .current_dir(dir)
        .output()
        .expect("bmsgw runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "README.md line {line}: `{command}` failed ({}):\n{text}",
        out.status
    );
    text
}

#[test]
fn the_readme_provisioning_steps_produce_a_config_that_checks_out() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = readme_commands("bmsgw pki dev");
    assert!(!pki.is_empty(), "README.md has no `bmsgw pki dev` step");
    // The first provisioning step; later copies of it (the bench section)
    // would refuse to overwrite the keys.
    let (line, command) = &pki[0];
    run(dir.path(), *line, command);
    let checks: Vec<_> = readme_commands("bmsgw check-config")
        .into_iter()
        .filter(|(_, c)| !c.contains(" /"))
        .collect();
    assert!(
        !checks.is_empty(),
        "README.md has no `bmsgw check-config` of a relative path (the generated config)"
    );
    for (line, command) in checks {
        let text = run(dir.path(), line, &command);
        assert!(
            !text.contains("FAIL"),
            "README.md line {line}: `{command}`:\n{text}"
        );
    }
}

/// The README's bench lines for the broker and the cloud, from its
/// provisioning step (with a free port for its 8883): mosquitto starts on
/// `pki dev`'s `mosquitto.conf` (the shipped production config) and the
/// reference cloud connects to it as `bmsgw-cloud-1`. Skipped with a notice
/// without mosquitto, unless `BMSGW_REQUIRE_MOSQUITTO=1`.
#[test]
fn the_readme_broker_and_cloud_lines_run_on_the_dev_keys() {
    let Some(binary) = bmsgw::sim::mosquitto::find_binary() else {
        assert!(
            std::env::var("BMSGW_REQUIRE_MOSQUITTO").as_deref() != Ok("1"),
            "mosquitto not installed, and BMSGW_REQUIRE_MOSQUITTO=1 requires it"
        );
        eprintln!("SKIPPED: mosquitto not installed (apt-get install mosquitto)");
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let (line, pki) = readme_commands("bmsgw pki dev")
        .into_iter()
        .next()
        .expect("README.md has a `bmsgw pki dev` step");
    assert!(
        pki.contains("--broker-port 8883"),
        "README.md line {line}: {pki}"
    );
    run(
        dir.path(),
        line,
        &pki.replace("--broker-port 8883", &format!("--broker-port {port}")),
    );
    let (line, broker) = readme_commands("mosquitto -c")
        .into_iter()
        .next()
        .expect("README.md has a `mosquitto -c` line");
    let log = dir.path().join("mosquitto.log");
    let out = std::fs::File::create(&log).expect("log file");
    let mut broker_proc = Command::new(&binary)
        .args(broker.split_whitespace().skip(1))
        .current_dir(dir.path())
        .stdout(out.try_clone().expect("log handle"))
        .stderr(out)
        .spawn()
        .expect("mosquitto runs");
    let (cloud_line, cloud) = readme_commands("bmsgw sim cloud")
        .into_iter()
        .next()
        .expect("README.md has a `bmsgw sim cloud` line");
    let mut words = cloud.split_whitespace().skip(1);
    let mut cloud_proc = Command::new(env!("CARGO_BIN_EXE_bmsgw"))
        .args(&mut words)
        .current_dir(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("bmsgw sim cloud runs");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let connected = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains(" as bmsgw-cloud-1 ") {
            break Ok(());
        }
        if let Ok(Some(status)) = broker_proc.try_wait() {
            break Err(format!(
                "README.md line {line}: `{broker}` exited ({status})"
            ));
        }
        if let Ok(Some(status)) = cloud_proc.try_wait() {
            break Err(format!(
                "README.md line {cloud_line}: `{cloud}` exited ({status})"
            ));
        }
        if std::time::Instant::now() > deadline {
            break Err("the cloud did not connect within 20 s".to_owned());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let _ = cloud_proc.kill();
    let _ = broker_proc.kill();
    let _ = cloud_proc.wait();
    let _ = broker_proc.wait();
    if let Err(why) = connected {
        panic!(
            "{why}\nmosquitto's log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
}
