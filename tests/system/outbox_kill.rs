//! The outbox loses nothing it acknowledged when its process is killed with
//! SIGKILL mid-write (issue 4, deliverable 3).
//!
//! 20 cycles on one store file: spawn `bmsgw store-writer`, which pushes
//! session records forever and prints `committed <seq> <id>` after each push
//! returned and `removed <id>` after each removal (every record whose seq is
//! a multiple of 3) returned; read its stdout until a varying number of
//! commits has been seen; SIGKILL it; reopen the store and check it against
//! everything the writer reported.
//!
//! The number of commits per cycle comes from a seed printed at the start;
//! set `BMSGW_KILL_SEED` to replay a run.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use bmsgw::store::{EntryKind, OutboxEntry, OutboxPolicy, Store};

const CYCLES: u64 = 20;
/// Bounds the whole test; not a performance assertion.
const DEADLINE: Duration = Duration::from_secs(600);
const SIGKILL: i32 = 9;

/// The writer's payload for `seq`, written independently of
/// `bmsgw::store::writer::payload` so that a change to either shows.
fn expected_payload(seq: u64) -> Vec<u8> {
    let mut p = seq.to_be_bytes().to_vec();
    for i in 0..(seq % 97) as u8 {
        p.push((seq as u8).wrapping_mul(31).wrapping_add(i));
    }
    p
}

/// The seq a payload claims to be for (its first 8 bytes).
fn payload_seq(payload: &[u8]) -> Option<u64> {
    payload.first_chunk::<8>().map(|b| u64::from_be_bytes(*b))
}

enum Report {
    Committed { seq: u64, id: u64 },
    Removed { id: u64 },
}

fn parse(line: &str) -> Report {
    let words: Vec<&str> = line.split_whitespace().collect();
    let num = |s: &str| {
        s.parse::<u64>()
            .unwrap_or_else(|_| panic!("bad number in writer line {line:?}"))
    };
    match words.as_slice() {
        ["committed", seq, id] => Report::Committed {
            seq: num(seq),
            id: num(id),
        },
        ["removed", id] => Report::Removed { id: num(id) },
        _ => panic!("unexpected writer line {line:?}"),
    }
}

/// A small LCG: varied, reproducible commit counts.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % below
    }
}

fn spawn_writer(path: &Path, start: u64) -> Child {
    Command::new(env!("CARGO_BIN_EXE_bmsgw"))
        .arg("store-writer")
        .arg("--store")
        .arg(path)
        .arg("--start")
        .arg(start.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn bmsgw store-writer")
}

/// Run the writer until it reported `commits` commits, SIGKILL it, and
/// return every complete line it wrote.
fn run_and_kill(
    path: &Path,
    start: u64,
    commits: u64,
    deadline: Instant,
    cycle: u64,
) -> Vec<String> {
    let mut child = spawn_writer(path, start);
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        let mut stdout = BufReader::new(stdout);
        loop {
            let mut line = String::new();
            match stdout.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                // A line cut short by the kill is not a report.
                Ok(_) if !line.ends_with('\n') => break,
                Ok(_) => {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            }
        }
    });

    let mut lines = Vec::new();
    let mut seen = 0;
    while seen < commits {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => {
                seen += u64::from(line.starts_with("committed "));
                lines.push(line);
            }
            Err(RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("cycle {cycle}: overall deadline passed after {seen} of {commits} commits");
            }
            Err(RecvTimeoutError::Disconnected) => {
                let status = child.wait().expect("wait");
                let mut stderr = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.read_to_string(&mut stderr);
                }
                panic!("cycle {cycle}: the writer stopped by itself ({status}): {stderr}");
            }
        }
    }
    child.kill().expect("SIGKILL the writer");
    let status = child.wait().expect("reap the writer");
    assert_eq!(
        status.signal(),
        Some(SIGKILL),
        "cycle {cycle}: the writer must have died of our SIGKILL, not exited ({status})"
    );
    reader.join().expect("reader thread");
    // Lines written between the last one read and the kill count too.
    lines.extend(rx.try_iter());
    lines
}

#[test]
fn outbox_loses_nothing_across_20_kill_9_cycles() {
    let seed = std::env::var("BMSGW_KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    println!("outbox_kill: BMSGW_KILL_SEED={seed}");
    let mut rng = Lcg(seed);
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("outbox.redb");
    let deadline = Instant::now() + DEADLINE;

    // id → seq of every entry that must be in the store.
    let mut live: BTreeMap<u64, u64> = BTreeMap::new();
    let mut removed: BTreeSet<u64> = BTreeSet::new();
    let mut last_id = 0u64;
    let mut next_seq = 0u64;
    let mut total_commits = 0u64;

    for cycle in 0..CYCLES {
        let commits = 1 + rng.next(60);
        let lines = run_and_kill(&path, next_seq, commits, deadline, cycle);

        // The last record may have been removed without its `removed` line
        // getting out before the kill.
        let mut maybe_removed = None;
        for line in &lines {
            match parse(line) {
                Report::Committed { seq, id } => {
                    assert!(id > last_id, "cycle {cycle}: id {id} after {last_id}");
                    assert_eq!(
                        seq, next_seq,
                        "cycle {cycle}: the writer counts from --start"
                    );
                    last_id = id;
                    next_seq = seq + 1;
                    total_commits += 1;
                    live.insert(id, seq);
                    maybe_removed = (seq % 3 == 0).then_some(id);
                }
                Report::Removed { id } => {
                    assert!(
                        live.remove(&id).is_some(),
                        "cycle {cycle}: removed unknown {id}"
                    );
                    removed.insert(id);
                    maybe_removed = None;
                }
            }
        }

        let store = Store::open(&path)
            .unwrap_or_else(|e| panic!("cycle {cycle}: the store must open after kill -9: {e}"));
        let pending: Vec<OutboxEntry> = store
            .outbox(OutboxPolicy::default())
            .pending(usize::MAX)
            .unwrap_or_else(|e| panic!("cycle {cycle}: pending: {e}"));
        assert!(
            pending.windows(2).all(|w| w[0].id < w[1].id),
            "cycle {cycle}: ids unique and increasing"
        );
        let present: BTreeMap<u64, &OutboxEntry> = pending.iter().map(|e| (e.id, e)).collect();

        if let Some(id) = maybe_removed
            && !present.contains_key(&id)
        {
            live.remove(&id);
            removed.insert(id);
        }
        for (id, seq) in &live {
            let entry = present
                .get(id)
                .unwrap_or_else(|| panic!("cycle {cycle}: committed id {id} (seq {seq}) is lost"));
            assert_eq!(entry.kind, EntryKind::Record);
            assert_eq!(entry.topic, bmsgw::store::writer::TOPIC);
            assert_eq!(
                entry.payload,
                expected_payload(*seq),
                "cycle {cycle}: id {id}"
            );
        }
        for id in &removed {
            assert!(
                !present.contains_key(id),
                "cycle {cycle}: removed id {id} is back"
            );
        }
        // Entries committed after the last report got out: intact too, and
        // from now on they must stay.
        for entry in &pending {
            if live.contains_key(&entry.id) {
                continue;
            }
            assert!(
                entry.id > last_id,
                "cycle {cycle}: unreported old id {}",
                entry.id
            );
            let seq = payload_seq(&entry.payload)
                .unwrap_or_else(|| panic!("cycle {cycle}: id {} has a short payload", entry.id));
            assert_eq!(
                entry.payload,
                expected_payload(seq),
                "cycle {cycle}: id {}",
                entry.id
            );
            live.insert(entry.id, seq);
            last_id = entry.id;
            next_seq = next_seq.max(seq + 1);
        }
        drop(store);
    }
    assert!(total_commits >= CYCLES, "every cycle committed something");
    assert!(!removed.is_empty(), "removals were exercised");
}
