//! `bmsgw demo` end to end, in process: the daemon (`service::daemon`) in
//! bridge mode with the embedded broker, the reference cloud, the BMS and a
//! pile that requires authentication, through every scenario: online, owner
//! approval, broker down (voucher, record uploaded later), and the attacks
//! (forged grant, replayed AuthRequest, fake pile, frames injected towards
//! the BMS). Each scenario checks its own outcome; this test fails if any
//! did not behave as expected.

use bmsgw::sim::demo::{DemoOptions, run};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_demo_scenario_behaves_as_expected() {
    let mut out = Vec::new();
    let result = run(DemoOptions::default(), &mut out, std::future::pending()).await;
    let text = String::from_utf8_lossy(&out);
    let report = match result {
        Ok(report) => report,
        Err(e) => panic!("demo failed: {e}\n{text}"),
    };
    let names: Vec<&str> = report.scenarios.iter().map(|s| s.name).collect();
    assert_eq!(names, ["a", "b", "c", "d1", "d2", "d3", "d4"]);
    assert!(report.all_passed(), "{text}");
    let online = &report.scenarios[0];
    assert_eq!(online.credential, Some("online"));
    assert!(online.request_to_recognized.is_some(), "{text}");
    let offline = &report.scenarios[2];
    assert_eq!(offline.credential, Some("voucher"));
    assert!(text.contains("summary"), "{text}");
    // Written for a newcomer: every heading ends the same way, and no
    // message names a GB/T message to explain something else.
    for heading in text.lines().filter(|l| l.starts_with("── ")) {
        assert!(heading.ends_with("───"), "{heading:?}");
    }
    assert!(!text.contains("CSD's"), "{text}");
}
