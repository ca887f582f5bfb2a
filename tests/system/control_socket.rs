//! The control socket end to end: a real `ControlServer` on a socket in a
//! temporary directory with a test handler that opens tickets with a
//! vehicle's real keys, driven by the library client, by raw bytes, and by
//! the `bmsgw status` / `bmsgw ticket import` / `bmsgw sim cloud-issue`
//! binaries.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bmsgw::auth::{RootKey, SystemRng};
use bmsgw::cloud::envelope::{KeyPair, PublicKey};
use bmsgw::cloud::exchange::VehicleKeys;
use bmsgw::cloud::ticket_file::TicketFile;
use bmsgw::cloud::topics::VehicleId;
use bmsgw::service::control::{
    self, ControlError, ControlHandler, ControlServer, ImportReport, MAX_CONNECTIONS,
    MAX_REQUEST_LEN,
};
use bmsgw::service::status::{CloudStatus, Status, VoucherCount};
use bmsgw::sim::cloud::{
    ApprovalPolicy, CloudService, CloudSettings, Output, PileEntry, Registry, VehicleEntry,
};
use bmsgw::sim::pki::{DevPki, DevPkiOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::oneshot;

const DEADLINE: Duration = Duration::from_secs(10);
const CHARGER: u32 = 1;

/// Answers from the vehicle's keys, as the daemon would.
struct TestHandler {
    keys: VehicleKeys,
    status: Status,
    imported: AtomicUsize,
}

impl ControlHandler for TestHandler {
    async fn status(&self) -> Status {
        let mut s = self.status.clone();
        s.vouchers = vec![VoucherCount {
            charger_number: CHARGER,
            remaining: self.imported.load(Ordering::SeqCst),
        }];
        s
    }

    async fn import_ticket(&self, ticket: TicketFile) -> Result<ImportReport, String> {
        let push = ticket
            .open(&self.keys)
            .map_err(|e| format!("ticket refused: {e}"))?;
        let report = ImportReport::of(&push);
        self.imported.fetch_add(report.vouchers, Ordering::SeqCst);
        Ok(report)
    }
}

fn status() -> Status {
    Status {
        version: "test".into(),
        mode: "bridge".into(),
        uptime_s: 42,
        cloud: CloudStatus {
            enabled: true,
            state: "connected".into(),
            connects: 1,
            ..CloudStatus::default()
        },
        firewall: Some(serde_json::json!({"dropped_not_allowed": 2})),
        ..Status::default()
    }
}

/// A running server; dropping `stop` (or sending on it) ends it.
struct Server {
    path: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), ControlError>>,
    handler: Arc<TestHandler>,
}

impl Server {
    fn start(dir: &Path, keys: VehicleKeys) -> Server {
        let path = dir.join("control.sock");
        let server = ControlServer::bind(&path, None).expect("bind");
        let handler = Arc::new(TestHandler {
            keys,
            status: status(),
            imported: AtomicUsize::new(0),
        });
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(Arc::clone(&handler), async {
            let _ = stopped.await;
        }));
        Server {
            path,
            stop: Some(stop),
            task,
            handler,
        }
    }

    async fn shutdown(mut self) {
        drop(self.stop.take());
        tokio::time::timeout(DEADLINE, &mut self.task)
            .await
            .expect("server stops")
            .expect("server task")
            .expect("server result");
        assert!(!self.path.exists(), "socket removed on exit");
    }
}

/// A cloud with vehicle `veh-a` and pile 1 in memory, and veh-a's keys.
struct World {
    cloud: CloudService,
    keys: VehicleKeys,
}

fn world() -> World {
    let cloud_keys = KeyPair::generate(&mut SystemRng);
    let own = KeyPair::generate(&mut SystemRng);
    let vehicle_id = VehicleId::parse("veh-a").expect("id");
    let mut registry = Registry::default();
    registry.insert_vehicle(VehicleEntry {
        id: vehicle_id.clone(),
        hpke_public: *own.public(),
        owner_public: None,
        approval: ApprovalPolicy::None,
        revoked: false,
    });
    registry.insert_pile(PileEntry {
        charger_number: CHARGER,
        root: RootKey::from_bytes([7; 32]),
        key_offset: 0,
    });
    let keys = VehicleKeys {
        vehicle_id,
        own,
        cloud: *cloud_keys.public(),
    };
    World {
        cloud: CloudService::new(registry, cloud_keys, CloudSettings::default()),
        keys,
    }
}

fn now_ms() -> u64 {
    u64::from(bmsgw::time::unix_now()) * 1000
}

fn ticket_from(cloud: &CloudService, count: usize) -> TicketFile {
    let vehicle = VehicleId::parse("veh-a").expect("id");
    let out = cloud
        .push_vouchers(&vehicle, CHARGER, count, now_ms(), &mut SystemRng)
        .expect("push");
    let Output::Push {
        vehicle,
        topic,
        payload,
    } = out
    else {
        panic!("push_vouchers returns a push");
    };
    TicketFile::new(vehicle, topic, payload).expect("ticket file")
}

/// Send raw bytes, read the whole answer.
async fn raw(path: &Path, bytes: Vec<u8>) -> serde_json::Value {
    let stream = UnixStream::connect(path).await.expect("connect");
    let (mut rd, mut wr) = stream.into_split();
    // Write and read at once: the server may answer before reading it all.
    // Then close the write half (which also ends a line without newline).
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&bytes).await;
        let _ = wr.shutdown().await;
    });
    let mut answer = Vec::new();
    tokio::time::timeout(DEADLINE, rd.read_to_end(&mut answer))
        .await
        .expect("an answer in time")
        .expect("read");
    let _ = writer.await;
    assert_eq!(answer.last(), Some(&b'\n'), "one line");
    serde_json::from_slice(&answer).expect("the answer is JSON")
}

fn error_of(v: &serde_json::Value) -> &str {
    assert_eq!(v["ok"], false, "{v}");
    v["error"].as_str().expect("an error text")
}

#[tokio::test]
async fn status_and_import_through_the_library_client() {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = world();
    let server = Server::start(dir.path(), w.keys.clone());

    let mode = std::fs::metadata(&server.path)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o660);

    let s = control::request_status(&server.path).await.expect("status");
    assert_eq!(s.version, "test");
    assert_eq!(s.cloud.state, "connected");
    assert_eq!(
        s.firewall,
        Some(serde_json::json!({"dropped_not_allowed": 2}))
    );
    assert_eq!(s.vouchers[0].remaining, 0);

    let ticket = ticket_from(&w.cloud, 3);
    let report = control::import_ticket(&server.path, &ticket)
        .await
        .expect("imported");
    assert_eq!(
        report,
        ImportReport {
            vouchers: 3,
            charger_numbers: vec![CHARGER],
            revoked: 0
        }
    );
    let s = control::request_status(&server.path).await.expect("status");
    assert_eq!(s.vouchers[0].remaining, 3);

    // Well-formed for veh-a, but sealed by another cloud key (a forger's)
    // to another key pair: the daemon cannot open it.
    let other = world();
    let forged = ticket_from(&other.cloud, 1);
    let e = control::import_ticket(&server.path, &forged)
        .await
        .expect_err("forged ticket refused");
    let ControlError::Refused(msg) = &e else {
        panic!("refused by the daemon, got {e}");
    };
    assert!(
        msg.contains("ticket refused") && msg.contains("authentication failed"),
        "{msg}"
    );
    assert_eq!(server.handler.imported.load(Ordering::SeqCst), 3);

    server.shutdown().await;
    let e = control::request_status(&dir.path().join("control.sock"))
        .await
        .expect_err("no daemon");
    assert!(
        matches!(e, ControlError::Connect { .. }) && e.to_string().contains("is bmsgw running"),
        "{e}"
    );
}

/// The largest pushes the cloud makes (a full voucher batch, a revocation
/// of the most tickets) fit one request line.
#[tokio::test]
async fn the_largest_pushes_fit_a_request() {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = world();
    let server = Server::start(dir.path(), w.keys.clone());
    let full = ticket_from(&w.cloud, bmsgw::cloud::messages::MAX_VOUCHERS);
    let report = control::import_ticket(&server.path, &full)
        .await
        .expect("imported");
    assert_eq!(report.vouchers, bmsgw::cloud::messages::MAX_VOUCHERS);

    let vehicle = VehicleId::parse("veh-a").expect("id");
    let ids = (0..bmsgw::cloud::messages::MAX_REVOKED)
        .map(|i| {
            let mut id = [0u8; 12];
            id[..8].copy_from_slice(&(i as u64).to_be_bytes());
            id
        })
        .collect();
    let Output::Push {
        vehicle,
        topic,
        payload,
    } = w
        .cloud
        .revoke(&vehicle, 1, ids, now_ms(), &mut SystemRng)
        .expect("revocation")
    else {
        panic!("revoke returns a push");
    };
    let revocation = TicketFile::new(vehicle, topic, payload).expect("ticket file");
    let report = control::import_ticket(&server.path, &revocation)
        .await
        .expect("imported");
    assert_eq!(report.revoked, bmsgw::cloud::messages::MAX_REVOKED);
    server.shutdown().await;
}

#[tokio::test]
async fn bad_requests_get_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = world();
    let server = Server::start(dir.path(), w.keys.clone());
    let p = &server.path;

    let v = raw(p, b"hello\n".to_vec()).await;
    assert!(
        error_of(&v).contains("bad request: request is not JSON"),
        "{v}"
    );
    let v = raw(p, b"\xff\xfe\x00\x01\n".to_vec()).await;
    assert!(error_of(&v).contains("not JSON"), "{v}");
    let v = raw(p, b"{\"request\":\"format_disk\"}\n".to_vec()).await;
    assert!(
        error_of(&v).contains("unknown variant `format_disk`"),
        "{v}"
    );
    let v = raw(p, b"\n".to_vec()).await;
    assert!(error_of(&v).contains("empty request"), "{v}");
    let v = raw(
        p,
        br#"{"request":"import_ticket","ticket":{"format":"bmsgw-sealed-push/1","vehicle_id":"veh-a","topic":"bmsgw/v1/veh-a/vouchers","payload":"00"}}"#
            .to_vec(),
    )
    .await;
    assert!(
        error_of(&v).contains("ticket file `payload` is 1 bytes"),
        "{v}"
    );

    // Over the limit, with or without a newline at the end.
    let mut big = vec![b'a'; MAX_REQUEST_LEN + 10];
    let v = raw(p, big.clone()).await;
    assert!(error_of(&v).contains("longer than 65536 bytes"), "{v}");
    big.push(b'\n');
    let v = raw(p, big).await;
    assert!(error_of(&v).contains("longer than 65536 bytes"), "{v}");

    // A valid request ended by closing the write half (no newline).
    let v = raw(p, br#"{"request":"status"}"#.to_vec()).await;
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["status"]["mode"], "bridge");

    // The server is still fine.
    control::request_status(p).await.expect("status");
    server.shutdown().await;
}

#[tokio::test]
async fn silent_clients_time_out_and_the_ninth_connection_is_told_busy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = world();
    let server = Server::start(dir.path(), w.keys.clone());
    let mut silent = Vec::new();
    for _ in 0..MAX_CONNECTIONS {
        let mut s = UnixStream::connect(&server.path).await.expect("connect");
        // Half a request, never finished.
        s.write_all(b"{\"request\":").await.expect("write");
        silent.push(s);
    }
    let v = raw(&server.path, b"{\"request\":\"status\"}\n".to_vec()).await;
    assert!(error_of(&v).starts_with("busy"), "{v}");
    for mut s in silent {
        let mut answer = String::new();
        tokio::time::timeout(DEADLINE, s.read_to_string(&mut answer))
            .await
            .expect("answered after the read timeout")
            .expect("read");
        assert!(
            answer.contains("no complete request line within 2 s"),
            "{answer}"
        );
    }
    // Permits are back.
    control::request_status(&server.path).await.expect("status");
    server.shutdown().await;
}

#[test]
fn socket_group_is_set() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Our own group: the only one a non-root test may give the socket to.
    let gid = std::fs::metadata(dir.path()).expect("dir").gid();
    let path = dir.path().join("g.sock");
    let server = ControlServer::bind(&path, Some(&gid.to_string())).expect("bind");
    let meta = std::fs::metadata(&path).expect("socket");
    assert_eq!(meta.gid(), gid);
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(server.path(), path);
    drop(server);
    assert!(!path.exists());
}

fn bmsgw(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_bmsgw"))
        .args(args)
        .env_remove("BMSGW_SOCKET")
        .output()
        .expect("bmsgw runs")
}

fn text(out: &std::process::Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `bmsgw sim cloud-issue` seals vouchers with a dev PKI's cloud;
/// `bmsgw ticket import` hands them to the daemon; `bmsgw status` shows the
/// result. Damaged files are refused by the CLI before the daemon.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_issue_import_and_status() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = DevPki::generate(&DevPkiOptions {
        vehicles: vec!["veh-a".into()],
        approval_required: vec![],
        chargers: vec![CHARGER],
        ..DevPkiOptions::new(dir.path().join("pki"))
    })
    .expect("dev PKI");
    let keys = VehicleKeys {
        vehicle_id: VehicleId::parse("veh-a").expect("id"),
        own: KeyPair::load(&pki.vehicle("veh-a").hpke_key).expect("vehicle key"),
        cloud: PublicKey::load(&pki.cloud_hpke_pub).expect("cloud key"),
    };
    let server = Server::start(dir.path(), keys);
    let sock = server.path.to_str().expect("utf-8 path").to_owned();
    let ticket = dir.path().join("ticket.json");
    let ticket_s = ticket.to_str().expect("utf-8 path").to_owned();
    let cloud_toml = pki.cloud_toml.to_str().expect("utf-8 path").to_owned();

    let run = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            bmsgw(&args)
        })
    };
    let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();

    let out = run(args(&[
        "sim",
        "cloud-issue",
        "--config",
        &cloud_toml,
        "--vehicle",
        "veh-a",
        "--charger",
        "1",
        "--count",
        "3",
        "--out",
        &ticket_s,
    ]))
    .await
    .expect("join");
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("3 vouchers for charger 1"), "{stdout}");
    TicketFile::load(&ticket).expect("a valid ticket file");

    // Never overwrites.
    let out = run(args(&[
        "sim",
        "cloud-issue",
        "--config",
        &cloud_toml,
        "--vehicle",
        "veh-a",
        "--charger",
        "1",
        "--out",
        &ticket_s,
    ]))
    .await
    .expect("join");
    assert!(!out.status.success());
    assert!(text(&out).1.contains("already exists"), "{:?}", text(&out));

    let out = run(args(&["ticket", "import", &ticket_s, "--socket", &sock]))
        .await
        .expect("join");
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("3 vouchers added (charger 1), 0 tickets revoked"),
        "{stdout}"
    );

    let out = run(args(&["status", "--socket", &sock]))
        .await
        .expect("join");
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("mode bridge") && stdout.contains("charger 1           3 left"),
        "{stdout}"
    );
    let out = run(args(&["status", "--json", "--socket", &sock]))
        .await
        .expect("join");
    let s: Status = serde_json::from_slice(&out.stdout).expect("status JSON");
    assert_eq!(s.vouchers[0].remaining, 3);

    // A damaged file: refused by the CLI itself, with one line naming it.
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, br#"{"format":"bmsgw-sealed-push/1"}"#).expect("write");
    let out = run(args(&[
        "ticket",
        "import",
        bad.to_str().expect("utf-8"),
        "--socket",
        "/nonexistent.sock",
    ]))
    .await
    .expect("join");
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("bad.json") && stderr.contains("no `vehicle_id` field"),
        "{stderr}"
    );

    // A well-formed file the daemon refuses: the reason reaches the user.
    let other = world();
    ticket_from(&other.cloud, 1)
        .write_new(&dir.path().join("forged.json"))
        .expect("write");
    let forged = dir.path().join("forged.json");
    let out = run(args(&[
        "ticket",
        "import",
        forged.to_str().expect("utf-8"),
        "--socket",
        &sock,
    ]))
    .await
    .expect("join");
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(
        stderr.contains("the daemon refused: ticket refused"),
        "{stderr}"
    );

    // No daemon: a clear one-line reason.
    let out = run(args(&["status", "--socket", "/nonexistent/control.sock"]))
        .await
        .expect("join");
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(
        stderr.starts_with("bmsgw: status: cannot connect") && stderr.contains("is bmsgw running"),
        "{stderr}"
    );

    server.shutdown().await;
}
