//! The control-socket protocol, server side: whatever a local client sends
//! (one JSON request line, or anything else) through the same code that
//! serves each accepted socket, with a handler that opens imported tickets
//! with the vehicle's keys as the daemon does.
#![no_main]

use std::sync::OnceLock;

use bmsgw::cloud::ticket_file::TicketFile;
use bmsgw::service::control::{ControlHandler, ImportReport, serve_connection};
use bmsgw::service::status::Status;
use bmsgw_fuzz::{CloudWorld, cloud_world};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Handler(&'static CloudWorld);

impl ControlHandler for Handler {
    async fn status(&self) -> Status {
        Status::default()
    }

    async fn import_ticket(&self, ticket: TicketFile) -> Result<ImportReport, String> {
        ticket
            .open(&self.0.vehicle)
            .map(|push| ImportReport::of(&push))
            .map_err(|e| e.to_string())
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            // Timeouts pass as soon as nothing else can run.
            .start_paused(true)
            .build()
            .expect("a current-thread runtime builds")
    })
}

fuzz_target!(|data: &[u8]| {
    let handler = Handler(cloud_world());
    let answer = runtime().block_on(async {
        let (mut client, server) = tokio::io::duplex(16 * 1024);
        let client_side = async {
            // The server may answer and close before reading everything
            // (an over-long line); a failed write is then expected.
            let _ = client.write_all(data).await;
            let _ = client.shutdown().await;
            let mut answer = Vec::new();
            client.read_to_end(&mut answer).await.map(|_| answer)
        };
        let (_, answer) = tokio::join!(serve_connection(server, &handler), client_side);
        answer
    });
    let answer = answer.expect("the client reads the answer");
    // Exactly one JSON object on one line, with `ok`; a refusal says why.
    let line = answer.strip_suffix(b"\n").unwrap_or_else(|| {
        panic!(
            "answer {:?} is not one line",
            String::from_utf8_lossy(&answer)
        )
    });
    assert!(!line.contains(&b'\n'));
    let value: serde_json::Value = serde_json::from_slice(line).expect("the answer is JSON");
    match value.get("ok") {
        Some(serde_json::Value::Bool(true)) => {}
        Some(serde_json::Value::Bool(false)) => {
            assert!(value.get("error").is_some_and(|e| e.is_string()), "{value}");
        }
        _ => panic!("answer without `ok`: {value}"),
    }
});
