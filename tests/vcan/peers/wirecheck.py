#!/usr/bin/env python3
"""Checks that the peers' deviations show on the wire, in a `candump -L`
capture, independently of bmsgw's decoder.

    wirecheck.py CAPTURE NAME...

NAME is a deviation of gbt_bms.py or gbt_charger.py, prefixed bms/ or
charger/ (e.g. bms/brm-41, charger/cts-without-pgn). Prints one line per
name, "visible: ..." or "NOT visible: ...", and exits 1 if any is not
visible. A few deviations can only show through their effect (see
cts-interval-reader); their line says what was seen.
"""

import sys

from j1939 import pgn_from, split_id

BMS, CHARGER = 0xF4, 0x56


def read_capture(path):
    """[(time, pgn, source, data)] of the 29-bit frames."""
    frames = []
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) < 3 or "#" not in parts[2]:
                continue
            ident, _, payload = parts[2].partition("#")
            if len(ident) != 8:
                continue  # standard ids: the lane's capture marker
            try:
                can_id, data = int(ident, 16), bytes.fromhex(payload)
                t = float(parts[0].strip("()"))
            except ValueError:
                continue
            _, pgn, source, _ = split_id(can_id)
            frames.append((t, pgn, source, data))
    return frames


def u16(d, i):
    return d[i] | d[i + 1] << 8


class Capture:
    def __init__(self, frames):
        self.frames = frames

    def of(self, pgn, source):
        return [(t, d) for t, p, s, d in self.frames if p == pgn and s == source]

    def cm(self, source, ctrl, pgn=None):
        return [(t, d) for t, d in self.of(0xEC00, source)
                if len(d) == 8 and d[0] == ctrl and (pgn is None or pgn_from(d) == pgn)]

    def first(self, pgn, source, pred=lambda d: True):
        return next((t for t, d in self.of(pgn, source) if pred(d)), None)


def check(cap, name):
    """(visible, detail)."""
    if name == "bms/bhm-version-bytes":
        bhm = cap.of(0x2700, BMS)
        return bool(bhm) and all(d[:2] == b"\x01\x01" for _, d in bhm), "%d BHM, first %s" % (len(bhm), bhm[0][1].hex() if bhm else "-")
    if name == "bms/brm-41":
        rts = cap.cm(BMS, 16, 0x0200)
        return bool(rts) and all(u16(d, 1) == 41 for _, d in rts), "BRM RTS sizes %s" % sorted({u16(d, 1) for _, d in rts})
    if name == "bms/bcp-once-early":
        rts = cap.cm(BMS, 16, 0x0600)
        crm_aa = cap.first(0x0100, CHARGER, lambda d: d[:1] == b"\xaa")
        early = bool(rts) and (crm_aa is None or rts[0][0] < crm_aa)
        return len(rts) == 1, "%d BCP transfer(s); the first %s CRM(0xAA)" % (
            len(rts), "before" if early else "after" if rts else "-")
    if name == "bms/bcl-waits-for-ccs":
        bcl, ccs = cap.first(0x1000, BMS), cap.first(0x1200, CHARGER)
        cro = cap.first(0x0A00, CHARGER, lambda d: d[:1] == b"\xaa")
        ok = cro is not None and (bcl is None or (ccs is not None and bcl > ccs))
        return ok, "CRO(0xAA) %s, first CCS %s, first BCL %s" % (fmt(cro), fmt(ccs), fmt(bcl))
    if name == "bms/early-bem-ccs":
        bem = [(t, d) for t, d in cap.of(0x1E00, BMS) if d[:4] == b"\xf0\xf0\xf1\xfc"]
        ccs = cap.first(0x1200, CHARGER)
        ok = bool(bem) and (ccs is None or bem[0][0] < ccs)
        return ok, "%d BEM(CCS timeout) frames, the first %s, first CCS %s" % (len(bem), fmt(bem[0][0] if bem else None), fmt(ccs))
    if name == "bms/positive-current":
        bcl = cap.of(0x1000, BMS)
        return bool(bcl) and all(u16(d, 2) > 4000 for _, d in bcl), "BCL current raw %s" % sorted({u16(d, 2) for _, d in bcl})
    if name == "bms/bcs-single-frame":
        single = cap.of(0x1100, BMS)
        rts = cap.cm(BMS, 16, 0x1100)
        return bool(single) and not rts and all(len(d) == 8 for _, d in single), "%d single-frame BCS, %d BCS over TP" % (len(single), len(rts))
    if name == "bms/cts-interval-reader":
        # Only its effect shows: the gap between data packets follows what
        # the charger's CTS says (an Abort from the receiver when it says FFFF).
        cts = cap.cm(CHARGER, 17)
        aborts = cap.cm(CHARGER, 255)
        values = sorted({u16(d, 3) for _, d in cts})
        return True, "charger CTS bytes 4-5 %s; %d aborts from the charger" % (["%04X" % v for v in values], len(aborts))
    if name == "charger/cts-packet-interval":
        cts = cap.cm(CHARGER, 17)
        return bool(cts) and all(d[3:5] == b"\x0a\x00" for _, d in cts), "CTS bytes 4-5 %s" % sorted({d[3:5].hex() for _, d in cts})
    if name == "charger/cts-without-pgn":
        cts = cap.cm(CHARGER, 17)
        fields = [d[5:8].hex() for _, d in cts]
        return "ffffff" in fields, "CTS PGN fields %s" % fields[:6]
    if name == "charger/positive-current":
        cml = cap.of(0x0800, CHARGER)
        return bool(cml) and all(u16(d, 4) > 4000 for _, d in cml), "CML max current raw %s" % sorted({u16(d, 4) for _, d in cml})
    if name == "charger/cml-6-bytes":
        cml = cap.of(0x0800, CHARGER)
        return bool(cml) and all(len(d) == 6 for _, d in cml), "CML lengths %s" % sorted({len(d) for _, d in cml})
    return False, "unknown deviation name"


def fmt(t):
    return "-" if t is None else "%.3f" % t


def main(argv):
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    cap = Capture(read_capture(argv[0]))
    if cap.frames:
        t0 = cap.frames[0][0]
        cap.frames = [(t - t0, p, s, d) for t, p, s, d in cap.frames]
    missing = 0
    for name in argv[1:]:
        ok, detail = check(cap, name)
        print("wirecheck %s: %s: %s" % (name, "visible" if ok else "NOT visible", detail))
        missing += not ok
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
