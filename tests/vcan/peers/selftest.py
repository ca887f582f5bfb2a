#!/usr/bin/env python3
"""The two peers against each other without SocketCAN (for machines whose
kernel has no CAN, like the lane's hosts): an in-process bus of socket
pairs carrying struct can_frame, a thread per peer.

    python3 tests/vcan/peers/selftest.py [-v]

Checks that the standard pair completes, that each deviation shows in the
frames where it should, and that the pairings that must fail do.
"""

import io
import select
import socket
import sys
import threading

import gbt_bms
import gbt_charger
from j1939 import CAN_FRAME, CanBus, split_id

VERBOSE = "-v" in sys.argv


class Hub:
    """A CAN bus: every frame one node sends reaches all the others, and
    the log (id, data) records it."""

    def __init__(self, nodes):
        self.ends = []
        self.buses = []
        for _ in range(nodes):
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            self.ends.append(a)
            self.buses.append(CanBus(sock=b))
        self.log = []
        self.stopped = False
        threading.Thread(target=self.run, daemon=True).start()

    def run(self):
        while not self.stopped:
            r, _, _ = select.select(self.ends, [], [], 0.05)
            for s in r:
                try:
                    raw = s.recv(64)
                except OSError:
                    continue
                can_id, dlc, data = CAN_FRAME.unpack(raw)
                self.log.append((can_id & 0x1FFFFFFF, data[:dlc]))
                for other in self.ends:
                    if other is not s:
                        other.send(raw)


def session(bms_dev, charger_dev, timeout=20, charge_secs=1.5):
    hub = Hub(2)
    results, outputs = {}, {}

    def run(key, main, argv, bus):
        out = io.StringIO()
        results[key] = main(argv, bus, out)
        outputs[key] = out.getvalue()

    threads = [
        threading.Thread(target=run, args=("bms", gbt_bms.main, ["--deviations", bms_dev, "--timeout", str(timeout),
                                                                  "--charge-secs", str(charge_secs)], hub.buses[0])),
        threading.Thread(target=run, args=("charger", gbt_charger.main, ["--deviations", charger_dev,
                                                                          "--timeout", str(timeout)], hub.buses[1])),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    hub.stopped = True
    if VERBOSE:
        print(outputs["bms"] + outputs["charger"])
    return results, outputs, hub.log


def frames(log, pgn, source=None):
    return [d for i, d in log if split_id(i)[1] == pgn and (source is None or split_id(i)[2] == source)]


FAILURES = []


def check(what, ok, detail=""):
    print("%s %s%s" % ("ok  " if ok else "FAIL", what, (": " + detail) if detail and not ok else ""))
    if not ok:
        FAILURES.append(what)


def main():
    # Standard against standard: completes, and the wire is standard.
    res, out, log = session("none", "none")
    check("standard pair completes", res == {"bms": 0, "charger": 0}, str(res) + "\n" + out["bms"] + out["charger"])
    cts = [d for d in frames(log, 0xEC00, 0x56) if d[0] == 17]
    check("standard CTS bytes 4-8", cts and all(d[3:5] == b"\xff\xff" and d[5:8] in (b"\x00\x02\x00", b"\x00\x06\x00", b"\x00\x11\x00") for d in cts), str(cts))
    check("standard BCS is 9 bytes over TP", any(d[0] == 16 and d[5:7] == b"\x00\x11" for d in frames(log, 0xEC00, 0xF4)))
    check("standard BCL current is negative-counted", all(d[2] | d[3] << 8 < 4000 for d in frames(log, 0x1000)))

    # The BMS's deviations that do not stall a standard charger.
    res, out, log = session("bhm-version-bytes,brm-41,positive-current,bcs-single-frame,bcp-once-early", "none")
    check("deviating BMS vs standard charger completes", res == {"bms": 0, "charger": 0}, str(res) + out["bms"] + out["charger"])
    check("BHM 01 01", frames(log, 0x2700) and frames(log, 0x2700)[0][:2] == b"\x01\x01")
    check("BRM 41 bytes", any(d[0] == 16 and d[1] == 41 and d[5:7] == b"\x00\x02" for d in frames(log, 0xEC00, 0xF4)))
    check("BCL positive current", frames(log, 0x1000) and all(d[2] | d[3] << 8 > 4000 for d in frames(log, 0x1000)))
    check("BCS single frame", frames(log, 0x1100) and all(len(d) == 8 for d in frames(log, 0x1100)))
    bcp_rts = [d for d in frames(log, 0xEC00, 0xF4) if d[0] == 16 and d[5:7] == b"\x00\x06"]
    check("BCP sent once", len(bcp_rts) == 1, str(bcp_rts))

    # bcl-waits-for-ccs against a charger that waits for BCL: both stall.
    res, out, log = session("bcl-waits-for-ccs", "none", timeout=15)
    check("bcl-waits-for-ccs vs standard charger fails", res["bms"] != 0 and res["charger"] != 0, str(res))
    check("... with no BCL on the wire", not frames(log, 0x1000))

    # early-bem-ccs: the standard charger ends on BEM.
    res, out, log = session("early-bem-ccs", "none", timeout=15)
    bem = frames(log, 0x1E00)
    check("early BEM is F0 F0 F1 FC", bem and bem[0] == b"\xf0\xf0\xf1\xfc", str(bem))
    check("early-bem-ccs vs standard charger fails", res["charger"] != 0, str(res))

    # cts-interval-reader against the standard CTS (FF FF): 65 s gaps, aborts.
    res, out, log = session("cts-interval-reader", "none", timeout=10)
    check("cts-interval-reader vs standard CTS fails", res["bms"] != 0 and res["charger"] != 0, str(res))
    aborts = [d for d in frames(log, 0xEC00, 0x56) if d[0] == 255]
    check("... the receiver aborts on T1", aborts and aborts[0][1] == 3, str(aborts))

    # cts-interval-reader against a 10 ms interval: completes, paced.
    res, out, log = session("cts-interval-reader", "cts-packet-interval,positive-current,cml-6-bytes")
    check("cts-interval-reader vs cts-packet-interval completes", res == {"bms": 0, "charger": 0}, str(res) + out["bms"] + out["charger"])
    cts = [d for d in frames(log, 0xEC00, 0x56) if d[0] == 17]
    check("CTS carries 0A 00", cts and all(d[3:5] == b"\x0a\x00" for d in cts))
    check("CML 6 bytes, positive current", frames(log, 0x0800) and all(len(d) == 6 and d[4] | d[5] << 8 > 4000 for d in frames(log, 0x0800)))
    check("CCS positive current", any(d[2] | d[3] << 8 > 4000 for d in frames(log, 0x1200)))

    # cts-without-pgn: a standard BMS does not take a CTS for no PGN.
    res, out, log = session("none", "cts-without-pgn", timeout=12)
    cts = [d for d in frames(log, 0xEC00, 0x56) if d[0] == 17]
    check("CTS PGN FFFFFF then 000000", len(cts) >= 2 and cts[0][5:8] == b"\xff\xff\xff" and cts[1][5:8] == b"\x00\x00\x00", str(cts))
    check("cts-without-pgn vs standard BMS fails", res["bms"] != 0, str(res))

    print("selftest: %d failed" % len(FAILURES))
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
