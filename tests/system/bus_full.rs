//! A bus that takes no frame (its transmit queue stays full: no ACK, or
//! stuck bus-off) must not hold up the daemon (issue 16, deliverable 3):
//! the other bus keeps flowing and the daemon stops on request. The CAN
//! loop never waits for a bus; what a bus cannot take waits in that bus's
//! own bounded queue (`service::daemon::tx_queue`).

use std::time::Duration;

use crate::fault_support::{Rig, no_faults};
use bmsgw::can::fault::FaultyBus;
use bmsgw::can::{BusEvent, CanBus, CanFrame};
use bmsgw::j1939::{Address, J1939Id, Pgn, Priority};

const BMS: u8 = 0xF4;
const PILE: u8 = 0x56;

fn frame(pgn: u32, from: u8, to: u8, data: &[u8]) -> CanFrame {
    let id = J1939Id::new(
        Priority::new(6).expect("priority"),
        Pgn::new(pgn).expect("pgn"),
        Address(from),
        Address(to),
    );
    CanFrame::new(id.to_can_id(), data).expect("frame")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pile_bus_that_takes_nothing_holds_up_neither_the_bms_bus_nor_the_stop() {
    let mut rig = Rig::new(None);
    let pile_node = FaultyBus::new(rig.pile.node(), no_faults()).refusing_sends();
    let refused = pile_node.counters();
    rig.start_daemon_on(FaultyBus::new(rig.bms.node(), no_faults()), pile_node);
    rig.daemon_ready().await.expect("ready");

    let mut sniffer = rig.bms.node();
    let mut pile = rig.pile.node();
    let mut bms = rig.bms.node();
    // The pile's CHM every 50 ms for 2 s, towards the BMS; the BMS's BHM
    // every 5 ms, towards the pile, whose bus takes nothing.
    let chm = frame(0x2600, PILE, BMS, &[0x01, 0x01, 0x00]);
    let bhm = frame(0x2700, BMS, PILE, &[0x88, 0x13]);
    let drive = async {
        for i in 0..400u32 {
            if i % 10 == 0 {
                pile.send(&chm).await.expect("pile sends");
            }
            bms.send(&bhm).await.expect("BMS sends");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let count = async {
        let mut n = 0u32;
        loop {
            match tokio::time::timeout(Duration::from_millis(500), sniffer.recv()).await {
                Ok(Ok(BusEvent::Frame(f))) => {
                    let id = J1939Id::from_can_id(f.id()).expect("J1939");
                    if id.pgn.raw() == 0x2600 && id.source == Address(PILE) {
                        n += 1;
                    }
                }
                Ok(_) => {}
                Err(_) => return n,
            }
        }
    };
    let ((), forwarded) = tokio::join!(drive, count);
    let refused = refused.stats().refused;
    assert!(refused > 0, "the pile bus was never asked to take a frame");
    // Every CHM crossed to the BMS while the pile's bus refused the
    // gateway's frames (allow the first one or two, before READY's bus
    // state settled).
    assert!(
        forwarded >= 38,
        "only {forwarded} of 40 CHM reached the BMS"
    );
    tokio::time::timeout(Duration::from_secs(5), rig.stop_daemon())
        .await
        .expect("the daemon stops promptly with a full bus")
        .expect("clean stop");
}
