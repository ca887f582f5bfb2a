//! Every subcommand that reads a file, given every kind of bad file: a
//! missing one, a directory, an empty file, garbage, a huge file, a secret
//! readable by others, and one full of terminal control sequences. Each
//! must exit non-zero with one `bmsgw: …` line naming the file, never
//! panic, never echo a control character, and stay within 512 MiB of
//! address space (the run is under `ulimit -v`, so a file read whole into
//! memory would abort it).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The address-space limit, KiB. `BMSGW_CLI_MATRIX_VMEM_KIB` raises it
/// for a 32-bit target under qemu-user, which reserves the guest's whole
/// 4 GiB address space up front (the limit then bounds qemu, not bmsgw:
/// the native and the aarch64 runs show the bound).
fn vmem_limit_kib() -> u64 {
    std::env::var("BMSGW_CLI_MATRIX_VMEM_KIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512 * 1024)
}

/// The binary, run under `ulimit -v`.
fn bmsgw(args: &[String]) -> (Option<i32>, String) {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -v {} && exec \"$0\" \"$@\"",
            vmem_limit_kib()
        ))
        .arg(env!("CARGO_BIN_EXE_bmsgw"))
        .args(args)
        .env_remove("BMSGW_SOCKET")
        .output()
        .expect("sh runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// How a command takes its file `f`; `dir` for any other file it writes.
struct Case {
    name: &'static str,
    /// Whether the file is a secret (a key, a credential): those are also
    /// refused when others can read them.
    secret: bool,
    args: fn(f: &str, dir: &str) -> Vec<String>,
}

fn owned(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

const CASES: &[Case] = &[
    Case {
        name: "run --config",
        secret: false,
        args: |f, _| owned(&["run", "--config", f]),
    },
    Case {
        name: "check-config",
        secret: false,
        args: |f, _| owned(&["check-config", f]),
    },
    Case {
        name: "check-config --config",
        secret: false,
        args: |f, _| owned(&["check-config", "--config", f]),
    },
    Case {
        name: "status --config",
        secret: false,
        args: |f, _| owned(&["status", "--config", f]),
    },
    Case {
        name: "decode",
        secret: false,
        args: |f, _| owned(&["decode", f]),
    },
    Case {
        name: "ticket import",
        secret: false,
        args: |f, dir| owned(&["ticket", "import", f, "--socket", &format!("{dir}/no.sock")]),
    },
    Case {
        name: "pki broker-acl --vehicles",
        secret: false,
        args: |f, _| owned(&["pki", "broker-acl", "--vehicles", f]),
    },
    Case {
        name: "sim cloud --config",
        secret: false,
        args: |f, _| owned(&["sim", "cloud", "--config", f]),
    },
    Case {
        name: "sim cloud-issue --config",
        secret: false,
        args: |f, dir| {
            owned(&[
                "sim",
                "cloud-issue",
                "--config",
                f,
                "--vehicle",
                "veh-a",
                "--charger",
                "1",
                "--out",
                &format!("{dir}/ticket.json"),
            ])
        },
    },
    Case {
        name: "sim pile --root-key-file",
        secret: true,
        args: |f, _| {
            owned(&[
                "sim",
                "pile",
                "--can",
                "nocan0",
                "--require-auth",
                "--root-key-file",
                f,
                "--key-offset",
                "0",
            ])
        },
    },
    Case {
        name: "sim ticket --root-key-file",
        secret: true,
        args: |f, dir| {
            owned(&[
                "sim",
                "ticket",
                "--root-key-file",
                f,
                "--key-offset",
                "0",
                "--charger-number",
                "1",
                "--out",
                &format!("{dir}/credential"),
            ])
        },
    },
    Case {
        name: "sim vehicle --credential",
        secret: true,
        args: |f, _| owned(&["sim", "vehicle", "--can", "nocan0", "--credential", f]),
    },
];

/// The bad files, by what is wrong with them.
fn bad_files(dir: &Path) -> Vec<(&'static str, PathBuf)> {
    let write = |name: &str, bytes: &[u8], mode: u32| {
        let p = dir.join(name);
        std::fs::write(&p, bytes).expect("write");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
        p
    };
    let sub = dir.join("a-directory");
    std::fs::create_dir(&sub).expect("mkdir");
    let garbage: Vec<u8> = (0..4096u32).map(|i| (i * 7919 % 251) as u8).collect();
    vec![
        ("missing", dir.join("no-such-file")),
        ("a directory", sub),
        ("empty", write("empty", b"", 0o600)),
        ("garbage", write("garbage", &garbage, 0o600)),
        ("huge", write("huge", &vec![b'x'; 8 << 20], 0o600)),
        (
            "control characters",
            write(
                "control",
                b"\x1b]0;pwned\x07\x1b[31m[vehicle]\r\nid = \"\x1b[2J\"\n",
                0o600,
            ),
        ),
        ("readable by others", write("loose", &[b'a'; 64], 0o644)),
        // Endless: a file read whole would take all memory.
        ("endless", PathBuf::from("/dev/zero")),
    ]
}

#[test]
fn every_file_argument_refuses_every_bad_file_clearly() {
    let dir = tempfile::tempdir().expect("temp dir");
    let files = bad_files(dir.path());
    let scratch = dir.path().display().to_string();
    let mut problems = Vec::new();
    for case in CASES {
        for (what, path) in &files {
            if *what == "readable by others" && !case.secret {
                continue;
            }
            // decode streams its input (`candump -L can0 | bmsgw decode -`):
            // an endless one is read for ever, in bounded memory.
            if *what == "endless" && case.name == "decode" {
                continue;
            }
            let f = path.display().to_string();
            let (code, stderr) = bmsgw(&(case.args)(&f, &scratch));
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("?");
            let last = stderr.lines().last().unwrap_or("");
            let mut wrong = Vec::new();
            match code {
                None => wrong.push("killed by a signal (memory limit, or a crash)".to_string()),
                Some(0) => wrong.push("exit 0".to_string()),
                Some(_) => {}
            }
            if stderr.contains("panicked") {
                wrong.push("panicked".into());
            }
            if stderr.contains(['\u{1b}', '\u{7}', '\r']) {
                wrong.push("a raw control character on stderr".into());
            }
            if !last.starts_with("bmsgw: ") || !last.contains(name) {
                wrong.push(format!("the last line does not name {name}"));
            }
            if *what == "readable by others" && !last.contains("chmod 600") {
                wrong.push("no `chmod 600` for a loose secret".into());
            }
            if !wrong.is_empty() {
                problems.push(format!(
                    "{} with a file that is {what}: {} — stderr: {:?}",
                    case.name,
                    wrong.join(", "),
                    stderr.chars().take(300).collect::<String>()
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// What a config says is printed escaped too: `check-config` reports the
/// broker's host name, here one that would set the terminal's title.
#[test]
fn check_config_never_prints_a_control_character_from_the_config() {
    let dir = tempfile::tempdir().expect("temp dir");
    let run = |args: &[&str], env: Option<(&str, &str)>| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_bmsgw"));
        c.args(args).current_dir(dir.path());
        if let Some((k, v)) = env {
            c.env(k, v);
        }
        c.output().expect("bmsgw runs")
    };
    assert!(run(&["pki", "dev", "--out", "keys"], None).status.success());
    let out = run(
        &["check-config", "keys/gateway-veh-a.toml"],
        Some(("BMSGW__CLOUD__HOST", "broker\u{1b}]0;pwned\u{7}.example")),
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("pwned"), "the host is reported: {text}");
    assert!(!text.contains(['\u{1b}', '\u{7}']), "{text:?}");
}
