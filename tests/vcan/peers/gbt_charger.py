#!/usr/bin/env python3
"""An independent GB/T 27930-2015 charger (pile) on raw SocketCAN, with the
deviations field chargers show, each switchable (see README.md here).

    gbt_charger.py --can vcan0 --deviations none|all|NAME[,NAME...]

Exit 0 once statistics are exchanged (BSD received, CSD sent), else 1 with a
one-line reason on stderr.
"""

import sys
import time

from gbt import (BMS_ADDRESS, CHARGER_ADDRESS, TIMEOUT, TIMEOUT_FAST, Peer, arg_parser, bcd,
                 charging_amps, current_raw, flags2, le16, u16)
from j1939 import CTRL_CTS, pgn_bytes

DEVIATIONS = [
    # TP.CM_CTS bytes 4-5 carry a packet interval (10 ms) instead of FF FF.
    "cts-packet-interval",
    # TP.CM_CTS bytes 6-8 carry no PGN: FF FF FF, then 00 00 00 on every other CTS.
    "cts-without-pgn",
    # Output currents (CML, CCS) counted positive: 4000 + 10 x A.
    "positive-current",
    # CML in its 6-byte (2011) form, without the minimum output current.
    "cml-6-bytes",
]

MAX_VOLTAGE, MIN_VOLTAGE = 750.0, 200.0   # V
MAX_CURRENT, MIN_CURRENT = 250.0, 0.0     # A
CHARGER_NUMBER = 27930
REGION = b"310"
CTS_INTERVAL_MS = 10
CSD_COUNT = 3


class Charger(Peer):
    name = "python-charger"
    local, peer = CHARGER_ADDRESS, BMS_ADDRESS
    periods = {"CHM": 0.25, "CRM": 0.25, "CTS": 0.5, "CML": 0.25, "CRO": 0.25, "CCS": 0.05,
               "CST": 0.01, "CSD": 0.25, "CEM": 0.25}

    def __init__(self, args, bus=None, stream=None):
        super().__init__(args, bus, stream)
        self.dev = lambda name: name in self.deviations
        self.recognized = False
        self.demand = None            # (volts, amps) from BCL
        self.bcs_by = None
        self.charging_since = None
        self.energy_j = 0.0
        self.last_energy_at = None
        self.csd_left = CSD_COUNT
        self.cts_sent = 0
        self.bro_pending = False
        self.log("deviations: %s" % (", ".join(sorted(self.deviations)) or "none"))
        self.enter("handshake", ["CHM"], time.monotonic())

    # -- deviation hook: the CTS we answer an RTS with
    def make_cts(self, pgn, count, next_seq):
        interval = bytes((CTS_INTERVAL_MS, 0)) if self.dev("cts-packet-interval") else b"\xff\xff"
        if self.dev("cts-without-pgn"):
            pgn_field = b"\xff\xff\xff" if self.cts_sent % 2 == 0 else b"\x00\x00\x00"
        else:
            pgn_field = pgn_bytes(pgn)
        self.cts_sent += 1
        return bytes((CTRL_CTS, count, next_seq)) + interval + pgn_field

    # -- what goes out
    def amps(self, amps):
        return current_raw(amps, self.dev("positive-current"))

    def output(self):
        if self.demand is None:
            return 0.0, 0.0
        volts, amps = self.demand
        return min(volts, MAX_VOLTAGE), max(0.0, min(amps, MAX_CURRENT))

    def minutes(self, now):
        return int((now - self.charging_since) // 60) if self.charging_since else 0

    def build(self, kind, now):
        if kind == "CHM":
            return bytes((0x01, 0x01, 0x00))  # version 1.1
        if kind == "CRM":
            return bytes((0xAA if self.recognized else 0x00,)) + CHARGER_NUMBER.to_bytes(4, "little") + REGION
        if kind == "CTS":
            t = time.localtime()
            return bytes(bcd(v) for v in (t.tm_sec, t.tm_min, t.tm_hour, t.tm_mday, t.tm_mon,
                                          t.tm_year % 100, t.tm_year // 100))
        if kind == "CML":
            cml = le16(MAX_VOLTAGE * 10) + le16(MIN_VOLTAGE * 10) + le16(self.amps(MAX_CURRENT))
            return cml if self.dev("cml-6-bytes") else cml + le16(self.amps(MIN_CURRENT))
        if kind == "CRO":
            return b"\xAA"
        if kind == "CCS":
            self.integrate(now)
            volts, amps = self.output()
            # Byte 7: charging permitted (bits 1-2 = 01), the rest reserved.
            return le16(volts * 10) + le16(self.amps(amps)) + le16(self.minutes(now)) + flags2((1,), 1)
        if kind == "CST":
            # Byte 1 bits 7-8: stopped because the BMS stopped.
            return flags2((0, 0, 0, 1), 1) + flags2((0,) * 6, 2) + flags2((0, 0), 1)
        if kind == "CSD":
            self.csd_left -= 1
            return le16(self.minutes(now)) + le16(self.energy_j / 360000.0) + CHARGER_NUMBER.to_bytes(4, "little")
        return None

    def integrate(self, now):
        if self.last_energy_at is not None:
            volts, amps = self.output()
            self.energy_j += volts * amps * (now - self.last_energy_at)
        self.last_energy_at = now

    def cem(self, waiting_for):
        # CEM: 2-bit flags; byte 1 BRM; byte 2 BCP, BRO; byte 3 BCS, BCL,
        # BST; byte 4 BSD.
        slot = {"BRM": 0, "BCP": 1, "BRO": 2, "BCS": 3, "BCL": 4, "BST": 5, "BSD": 6}.get(waiting_for)
        flags = [0] * 7
        if slot is not None:
            flags[slot] = 1
        return flags2(flags[0:1], 1) + flags2(flags[1:3], 1) + flags2(flags[3:6], 1) + flags2(flags[6:7], 1)

    def on_timeout(self, kind, now):
        self.fail("timed out waiting for %s (phase %s)" % (kind, self.phase), "CEM", self.cem(kind), now)

    # -- what comes in
    def on_tp_sent(self, pgn, ok, why):
        if not ok:
            self.log("TP: sending PGN %04X failed: %s" % (pgn, why))

    def handle(self, kind, data, now):
        if kind == "BEM":
            self.fail("BMS sent BEM %s in phase %s" % (data.hex(" "), self.phase))
            return
        phase = self.phase
        if kind == "BST" and phase in ("handshake", "recognition", "configuration", "ready"):
            self.fail("BMS stopped (BST %s) before charging, in phase %s" % (data.hex(" "), phase))
        elif kind == "BHM" and phase == "handshake":
            self.enter("recognition", ["CRM"], now)
            self.wait_for("BRM", now)
        elif kind == "BRM" and phase == "recognition" and not self.recognized:
            if len(data) < 41:
                self.note("short-brm", "BRM of %d bytes is too short: ignored" % len(data))
                return
            self.recognized = True
            self.sending["CRM"] = now  # CRM(0xAA) at once
            self.wait_for("BCP", now)
        elif kind == "BCP" and phase == "recognition" and self.recognized:
            if len(data) < 13:
                return
            self.enter("configuration", ["CTS", "CML"], now)
            self.wait_for("BRO", now)
        elif kind == "BRO" and phase == "configuration" and data[0] == 0x00 and not self.bro_pending:
            # The BMS is not ready yet: the standard gives BRO(0xAA) 60 s.
            self.bro_pending = True
            self.wait_for("BRO", now, 60.0)
        elif kind == "BRO" and phase == "configuration" and data[0] == 0xAA:
            self.enter("ready", ["CRO"], now)
            self.wait_for("BCL", now, TIMEOUT_FAST)
        elif kind == "BCL" and phase in ("ready", "charging") and len(data) >= 5:
            self.integrate(now)
            self.demand = (u16(data, 0) / 10.0, charging_amps(u16(data, 2)))
            if phase == "ready":
                # Like many chargers, output (CCS) starts with the first demand.
                self.enter("charging", ["CCS"], now)
                self.charging_since = self.last_energy_at = now
                self.bcs_by = now + TIMEOUT
            self.wait_for("BCL", now, TIMEOUT_FAST)
        elif kind == "BCS" and phase == "charging" and len(data) >= 8:
            # 9 bytes over TP, or the 8-byte single frame some BMSs send.
            self.bcs_by = now + TIMEOUT
        elif kind == "BST" and phase == "charging":
            self.integrate(now)
            self.demand = None
            self.enter("stopping", ["CST"], now)
            self.wait_for("BSD", now)
        elif kind == "BSD" and phase == "stopping":
            self.enter("statistics", ["CSD"], now)
            self.waiting = None

    def tick(self, now):
        if self.phase == "charging" and self.bcs_by and now >= self.bcs_by and not self.ending:
            self.on_timeout("BCS", now)
        super().tick(now)
        if self.phase == "statistics" and self.csd_left <= 0 and not self.ending:
            self.complete()


def main(argv=None, bus=None, stream=None):
    p = arg_parser("gbt_charger.py", "An independent GB/T 27930 charger for the VM lane.", DEVIATIONS)
    args = p.parse_args(argv)
    return Charger(args, bus, stream).run()


if __name__ == "__main__":
    sys.exit(main())
