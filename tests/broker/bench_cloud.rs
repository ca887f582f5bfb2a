//! `bmsgw bench cloud` in miniature, against a real mosquitto: two
//! `bmsgw sim cloud` processes on the shared subscription, 20 requests from
//! two vehicles. The bench itself fails the run unless every answer opens
//! as a valid grant for its request; this test adds that both instances
//! served some and that their counts add up. It checks the harness works,
//! not how fast anything is (the figures are for `bench/run.sh`).
//!
//! Skipped, with a printed notice, when mosquitto is not installed (a
//! failure instead with `BMSGW_REQUIRE_MOSQUITTO=1`, as in CI).

use crate::support;

use std::path::PathBuf;

use bmsgw::sim::bench::cloud::{CloudOptions, run};
use support::mosquitto::{Mosquitto, REQUIRE_ENV};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_the_requests_and_every_answer_is_a_grant() {
    if Mosquitto::binary().is_none() {
        let line = format!(
            "SKIPPED: mosquitto not installed (apt-get install mosquitto) — {}",
            support::test_name()
        );
        if std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1") {
            panic!("{line}, and {REQUIRE_ENV}=1 requires it");
        }
        support::notice(&line);
        return;
    }
    let opts = CloudOptions {
        instances: vec![2],
        requests: 20,
        vehicles: 2,
        in_flight: 4,
        repeats: 1,
        // Vouchers too, so the check of a grant's batch is exercised.
        want_vouchers: 2,
        instance_binary: PathBuf::from(env!("CARGO_BIN_EXE_bmsgw")),
    };
    let mut out = Vec::new();
    let report = run(&opts, &mut out)
        .await
        .unwrap_or_else(|e| panic!("bench cloud failed: {e}"));
    let text = String::from_utf8_lossy(&out);
    assert_eq!(report.by_instances.len(), 1, "{text}");
    let runs = &report.by_instances[0].runs;
    assert_eq!(runs.len(), 1, "{text}");
    let granted = &runs[0].granted_per_instance;
    assert_eq!(granted.len(), 2, "{text}");
    assert!(
        granted.iter().all(|&n| n > 0),
        "both instances serve: {granted:?}\n{text}"
    );
    assert_eq!(granted.iter().sum::<u64>(), 20, "{text}");
    assert!(runs[0].grants_per_s > 0.0, "{text}");
    assert!(
        text.contains("cloud run instances=2 requests=20"),
        "one line per run:\n{text}"
    );
    // One instance count only: no ratio to give.
    assert!(report.ratio.is_none(), "{text}");
}
