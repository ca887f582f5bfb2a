//! The README's provisioning and configuration steps, followed literally:
//! every `bmsgw pki dev` and `bmsgw check-config` line of its shell blocks
//! that works on relative paths, in the README's order, in a fresh
//! temporary working directory, with the binary `cargo test` built. A step
//! that fails, or a README that no longer has the steps, fails the test:
//! the README and the code cannot drift apart unnoticed.
#![cfg(feature = "sim")]

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
