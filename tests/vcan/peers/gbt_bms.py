#!/usr/bin/env python3
"""An independent GB/T 27930-2015 BMS on raw SocketCAN, with the deviations
field BMSs show, each switchable (see README.md in this directory).

    gbt_bms.py --can vcan0 --deviations none|all|NAME[,NAME...]

Exit 0 once statistics are exchanged (CSD received), else 1 with a one-line
reason on stderr.
"""

import sys
import time

from gbt import (BMS_ADDRESS, CHARGER_ADDRESS, TIMEOUT, TIMEOUT_FAST, Peer, arg_parser,
                 current_raw, flags2, le16)

DEVIATIONS = [
    # Reads TP.CM_CTS bytes 4-5 (reserved, 0xFFFF) as the gap in ms between
    # data packets: 0xFFFF stalls a transfer for 65 s.
    "cts-interval-reader",
    # BHM carries the protocol version bytes 01 01 instead of the voltage.
    "bhm-version-bytes",
    # BRM in its 41-byte form, without the software version.
    "brm-41",
    # BCP once, right after the first BRM, not in answer to CRM(0xAA).
    "bcp-once-early",
    # No BCL until the charger's first CCS (while the charger waits for BCL).
    "bcl-waits-for-ccs",
    # One BEM "CCS timeout" at the start of charging, before any CCS is due.
    "early-bem-ccs",
    # Charging current counted positive: 4000 + 10 x A.
    "positive-current",
    # BCS as one 8-byte frame (remaining time's low byte only), not 9 bytes over TP.
    "bcs-single-frame",
]

BMS_MAX_VOLTAGE = 420.0      # V, BHM and BCP
DEMAND_VOLTAGE = 400.0       # V, BCL
DEMAND_CURRENT = 50.0        # A, BCL (constant current)
MAX_CURRENT = 200.0          # A, BCP
BATTERY_VOLTAGE = 380.0      # V
SOC_START = 50.0             # %
BST_AFTER_CST = 3


class Bms(Peer):
    name = "python-bms"
    local, peer = BMS_ADDRESS, CHARGER_ADDRESS
    periods = {"BHM": 0.25, "BRM": 0.25, "BCP": 0.5, "BRO": 0.25, "BCL": 0.05, "BCS": 0.25,
               "BSM": 0.25, "BST": 0.01, "BSD": 0.25, "BEM": 0.25}

    def __init__(self, args, bus=None, stream=None):
        super().__init__(args, bus, stream)
        self.dev = lambda name: name in self.deviations
        self.bcp_early_sent = False
        self.brm_done = False
        self.charging_since = None    # first CCS
        self.ccs_seen = False
        self.early_bem_due = False
        self.cst_seen = False
        self.cro_pending = False
        self.bst_left = BST_AFTER_CST
        self.stop_flags = (1, 0, 0, 0)  # BST byte 1: SOC target reached
        self.log("deviations: %s" % (", ".join(sorted(self.deviations)) or "none"))
        self.phase = "waiting for CHM"

    # -- deviation hook: how the CTS we receive paces our data packets
    def read_cts_interval(self, cts):
        if not self.dev("cts-interval-reader"):
            return 0.0
        ms = cts[3] | cts[4] << 8
        self.note("cts-interval-%d" % ms, "TP: CTS bytes 4-5 = %02X %02X: reading %d ms between packets" % (cts[3], cts[4], ms))
        return ms / 1000.0

    # -- what goes out
    def amps(self, amps):
        return current_raw(amps, self.dev("positive-current"))

    def build(self, kind, now):
        if kind == "BHM":
            return b"\x01\x01" if self.dev("bhm-version-bytes") else le16(BMS_MAX_VOLTAGE * 10)
        if kind == "BRM":
            brm = (bytes((0x01, 0x01, 0x00))          # protocol version 1.1
                   + bytes((0x03,))                   # lithium iron phosphate
                   + le16(1500) + le16(3500)          # 150.0 Ah, 350.0 V
                   + b"PYBM" + bytes((0, 0, 0, 7))    # manufacturer, pack serial
                   + bytes((41, 1, 15))               # 2026-01-15 (year - 1985)
                   + (12).to_bytes(3, "little")       # charge count
                   + bytes((0x01, 0xFF))              # owned; reserved
                   + b"LPYTHONBMSVIN0001")            # VIN, 17 ASCII
            if not self.dev("brm-41"):
                brm += bytes((1, 0, 2, 0x0F, 0x01, 0xEA, 0x07, 0xFF))  # software version, 8 bytes
            return brm
        if kind == "BCP":
            return (le16(420) + le16(self.amps(MAX_CURRENT)) + le16(600) + le16(BMS_MAX_VOLTAGE * 10)
                    + bytes((60 + 50,)) + le16(SOC_START * 10) + le16(BATTERY_VOLTAGE * 10))
        if kind == "BRO":
            return b"\xAA"
        if kind == "BCL":
            return le16(DEMAND_VOLTAGE * 10) + le16(self.amps(DEMAND_CURRENT)) + b"\x02"
        if kind == "BCS":
            body = (le16(BATTERY_VOLTAGE * 10) + le16(self.amps(DEMAND_CURRENT if self.ccs_seen else 0))
                    + le16(375 | 1 << 12) + bytes((int(self.soc()),)))
            remaining = 30
            return body + (bytes((remaining,)) if self.dev("bcs-single-frame") else le16(remaining))
        if kind == "BSM":
            # Max-cell and temperature indices/temperatures, then all normal;
            # charging allowed (byte 7 bits 5-6 = 01).
            return bytes((1, 30 + 50, 3, 25 + 50, 7)) + flags2((0, 0, 0, 0), 1) + flags2((0, 0, 1), 1)
        if kind == "BST":
            if self.cst_seen:
                self.bst_left -= 1
            return flags2(self.stop_flags, 1) + flags2((0,) * 8, 2) + flags2((0, 0), 1)
        if kind == "BSD":
            return bytes((int(self.soc()),)) + le16(372) + le16(376) + bytes((25 + 50, 31 + 50))
        return None

    def soc(self):
        if self.charging_since is None:
            return SOC_START
        return min(100.0, SOC_START + (time.monotonic() - self.charging_since) / 3.0)

    def bem(self, waiting_for):
        # BEM: 2-bit flags; byte 1 CRM(00), CRM(AA); byte 2 CTS/CML, CRO;
        # byte 3 CCS, CST; byte 4 CSD.
        slot = {"CRM00": 0, "CRMAA": 1, "CML": 2, "CRO": 3, "CCS": 4, "CST": 5, "CSD": 6}[waiting_for]
        flags = [0] * 7
        flags[slot] = 1
        return flags2(flags[0:2], 1) + flags2(flags[2:4], 1) + flags2(flags[4:6], 1) + flags2(flags[6:7], 1)

    def on_timeout(self, kind, now):
        self.fail("timed out waiting for %s (phase %s)" % (kind, self.phase), "BEM", self.bem(kind), now)

    # -- what comes in
    def on_tp_sent(self, pgn, ok, why):
        if not ok:
            self.log("TP: sending PGN %04X failed: %s" % (pgn, why))
            return
        if pgn == 0x0200 and not self.brm_done:
            self.brm_done = True
            if self.dev("bcp-once-early") and not self.bcp_early_sent:
                # Right after the first BRM, whatever CRM says by now.
                self.bcp_early_sent = True
                self.transmit("BCP", self.build("BCP", time.monotonic()), time.monotonic())

    def handle(self, kind, data, now):
        if kind == "CEM":
            self.fail("charger sent CEM %s in phase %s" % (data.hex(" "), self.phase))
            return
        phase = self.phase
        if kind == "CHM" and phase == "waiting for CHM":
            self.enter("handshake", ["BHM"], now)
            self.wait_for("CRM00", now)
        elif kind == "CRM" and data[0] == 0x00 and phase in ("waiting for CHM", "handshake"):
            self.enter("recognition", ["BRM"], now)
            self.wait_for("CRMAA", now)
        elif kind == "CRM" and data[0] == 0xAA and phase == "recognition":
            # The standard BMS answers CRM(0xAA) with BCP until CML comes.
            self.enter("configuration", [] if self.dev("bcp-once-early") else ["BCP"], now)
            self.wait_for("CML", now)
        elif kind == "CML" and phase == "configuration":
            self.enter("ready", ["BRO"], now)
            self.wait_for("CRO", now)
        elif kind == "CRO" and data[0] == 0x00 and phase == "ready" and not self.cro_pending:
            # The charger is not ready yet (e.g. insulation check): the
            # standard gives CRO(0xAA) 60 s.
            self.cro_pending = True
            self.wait_for("CRO", now, 60.0)
        elif kind == "CRO" and data[0] == 0xAA and phase == "ready":
            kinds = ["BCS", "BSM"] if self.dev("bcl-waits-for-ccs") else ["BCL", "BCS", "BSM"]
            self.enter("charging", kinds, now)
            self.wait_for("CCS", now, TIMEOUT_FAST)
            if self.dev("early-bem-ccs"):
                # Before any CCS could have come: the BMS's first charging
                # loop reports the CCS it has "missed", then carries on.
                flags = self.bem("CCS")
                self.transmit("BEM", flags, now)
        elif kind == "CCS" and phase == "charging":
            if not self.ccs_seen:
                self.ccs_seen = True
                self.charging_since = now
                if "BCL" not in self.sending:
                    self.sending["BCL"] = now
            self.wait_for("CCS", now, TIMEOUT_FAST)
            if now - self.charging_since >= self.args.charge_secs:
                self.stop(now)
        elif kind == "CST" and phase == "charging":
            self.stop_flags = (0, 0, 0, 1)  # charger stopped
            self.cst_seen = True
            self.stop(now)
        elif kind == "CST" and phase == "stopping":
            self.cst_seen = True
            self.waiting = None
        elif kind == "CSD" and phase == "statistics":
            self.complete()

    def stop(self, now):
        self.enter("stopping", ["BST"], now)
        if self.cst_seen:
            self.waiting = None
        else:
            self.wait_for("CST", now)

    def tick(self, now):
        super().tick(now)
        # A few BSTs after CST, so the charger hears one, then BSD.
        if self.phase == "stopping" and self.bst_left <= 0 and not self.ending:
            self.enter("statistics", ["BSD"], now)
            self.wait_for("CSD", now)


def main(argv=None, bus=None, stream=None):
    p = arg_parser("gbt_bms.py", "An independent GB/T 27930 BMS for the VM lane.", DEVIATIONS)
    p.add_argument("--charge-secs", type=float, default=3.0,
                   help="charge this long after the first CCS, then stop with BST (default 3)")
    args = p.parse_args(argv)
    return Bms(args, bus, stream).run()


if __name__ == "__main__":
    sys.exit(main())
