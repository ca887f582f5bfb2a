"""GB/T 27930-2015 pieces shared by the two peers: the message table, field
helpers, a readable one-line description of each message, and Peer, the
event loop both roles run on (periodic sends, receive deadlines, logging,
exit status)."""

import argparse
import sys
import time

from j1939 import CanBus, Node

BMS_ADDRESS = 0xF4
CHARGER_ADDRESS = 0x56

# name: (PGN, priority). Periods live with the roles that send them.
MESSAGES = {
    "CHM": (0x2600, 6), "BHM": (0x2700, 6), "CRM": (0x0100, 6), "BRM": (0x0200, 7),
    "BCP": (0x0600, 7), "CTS": (0x0700, 6), "CML": (0x0800, 6), "BRO": (0x0900, 4),
    "CRO": (0x0A00, 4), "BCL": (0x1000, 6), "BCS": (0x1100, 7), "CCS": (0x1200, 6),
    "BSM": (0x1300, 6), "BMV": (0x1500, 7), "BMT": (0x1600, 7), "BSP": (0x1700, 7),
    "BST": (0x1900, 4), "CST": (0x1A00, 4), "BSD": (0x1C00, 6), "CSD": (0x1D00, 6),
    "BEM": (0x1E00, 2), "CEM": (0x1F00, 2),
}
KIND_BY_PGN = {pgn: kind for kind, (pgn, _) in MESSAGES.items()}

# Receive timeouts (seconds): 5 s, except the 1 s of the charging loop.
TIMEOUT = 5.0
TIMEOUT_FAST = 1.0


def u16(data, i):
    return data[i] | data[i + 1] << 8


def le16(value):
    value = max(0, min(0xFFFF, int(round(value))))
    return bytes((value & 0xFF, value >> 8))


def current_raw(amps, positive=False):
    """0.1 A/bit with a -400 A offset. The standard counts charging current
    negative (100 A in = 3000); a `positive` peer counts it positive (5000)."""
    return 4000 + 10 * amps if positive else 4000 - 10 * amps


def charging_amps(raw):
    """The standard reading of a current field: amps into the battery."""
    return (4000 - raw) / 10.0


def bcd(n):
    return ((n // 10) << 4) | (n % 10)


def flags2(fields, width):
    """Packs 2-bit fields from bit 1 upward into `width` bytes; the bits no
    field covers stay 1, as the standard fills reserved bits."""
    word = (1 << (8 * width)) - 1
    for i, value in enumerate(fields):
        word &= ~(3 << (2 * i))
        word |= (value & 3) << (2 * i)
    return word.to_bytes(width, "little")


def describe(kind, data):
    """A short reading of a message, for the log. Never raises."""
    try:
        d = data
        if kind == "CHM":
            return "version %d.%d" % (d[0], u16(d, 1))
        if kind == "BHM":
            return "max charging voltage %.1f V" % (u16(d, 0) / 10)
        if kind == "CRM":
            return "%02X charger %d region %r" % (d[0], int.from_bytes(d[1:5], "little"), bytes(d[5:8]).decode("ascii", "replace"))
        if kind == "BRM":
            return "%d bytes, version %d.%d, VIN %r" % (len(d), d[0], u16(d, 1), bytes(d[24:41]).decode("ascii", "replace"))
        if kind == "BCP":
            return "max cell %.2f V, max current raw %d (%.1f A), max %.1f V, SOC %.1f %%, %.1f V" % (
                u16(d, 0) / 100, u16(d, 2), charging_amps(u16(d, 2)), u16(d, 6) / 10, u16(d, 9) / 10, u16(d, 11) / 10)
        if kind == "CTS":
            return "time %02x:%02x:%02x %02x.%02x.%02x%02x" % (d[2], d[1], d[0], d[3], d[4], d[6], d[5])
        if kind == "CML":
            text = "%d bytes, %.1f-%.1f V, max current raw %d (%.1f A)" % (
                len(d), u16(d, 2) / 10, u16(d, 0) / 10, u16(d, 4), charging_amps(u16(d, 4)))
            return text + (", min current raw %d" % u16(d, 6) if len(d) >= 8 else "")
        if kind in ("BRO", "CRO"):
            return "%02X" % d[0]
        if kind == "BCL":
            return "%.1f V, current raw %d (%.1f A), mode %02X" % (u16(d, 0) / 10, u16(d, 2), charging_amps(u16(d, 2)), d[4])
        if kind == "BCS":
            return "%d bytes, %.1f V, current raw %d (%.1f A), SOC %d %%" % (
                len(d), u16(d, 0) / 10, u16(d, 2), charging_amps(u16(d, 2)), d[6])
        if kind == "CCS":
            return "%.1f V, current raw %d (%.1f A), permitted bits %d" % (
                u16(d, 0) / 10, u16(d, 2), charging_amps(u16(d, 2)), d[6] & 3 if len(d) > 6 else -1)
        if kind == "CSD":
            return "%d min, %.1f kWh, charger %d" % (u16(d, 0), u16(d, 2) / 10, int.from_bytes(d[4:8], "little"))
        if kind == "BSD":
            return "SOC %d %%" % d[0]
        return data.hex(" ")
    except (IndexError, TypeError):
        return "%d bytes: %s" % (len(data), bytes(data).hex(" "))


def parse_deviations(text, known):
    """'all', 'none' or a comma-separated list of names from `known`."""
    text = text.strip()
    if text == "all":
        return set(known)
    if text in ("", "none"):
        return set()
    names = {n.strip() for n in text.split(",") if n.strip()}
    unknown = names - set(known)
    if unknown:
        raise argparse.ArgumentTypeError("unknown deviation(s) %s; known: %s"
                                         % (", ".join(sorted(unknown)), ", ".join(known)))
    return names


def arg_parser(prog, description, known):
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--can", default="vcan0", help="SocketCAN interface (default vcan0)")
    p.add_argument("--deviations", default="none", metavar="LIST",
                   type=lambda t: parse_deviations(t, known),
                   help="all, none, or a comma-separated list of: " + ", ".join(known))
    p.add_argument("--timeout", type=float, default=60.0, help="overall deadline in seconds (default 60)")
    return p


class Peer:
    """The loop one role runs on. A role sets `self.sending` (what goes out
    periodically) and `self.waiting` (the one message it waits for, with a
    deadline), and implements build(kind, now) -> bytes and
    handle(kind, data, now)."""

    name = "peer"
    local = peer = 0
    periods = {}

    def __init__(self, args, bus=None, stream=None):
        self.args = args
        # One stream for everything (the self-test's threads), or stdout for
        # the log and stderr for a failure.
        self.out = stream or sys.stdout
        self.err = stream or sys.stderr
        self.deviations = args.deviations
        self.t0 = time.monotonic()
        self.node = Node(bus or CanBus(args.can), self.local, self.peer, self,
                         read_interval=self.read_cts_interval, make_cts=self.make_cts)
        self.sending = {}       # kind -> next due time
        self.waiting = None     # (kind, deadline)
        self.phase = "start"
        self.result = None      # (exit code, final line)
        self.ending = None      # (time, reason): sending an error message until then
        self.logged = {}
        self.notes = set()

    # -- hooks a role may override
    read_cts_interval = None
    make_cts = None

    # -- logging: one line per change, so a 50 ms message does not flood
    def log(self, line):
        print("[%7.3f] %s: %s" % (time.monotonic() - self.t0, self.name, line), file=self.out, flush=True)

    def note(self, key, line):
        if key not in self.notes:
            self.notes.add(key)
            self.log(line)

    def _log_change(self, direction, kind, data):
        text = describe(kind, data)
        if self.logged.get((direction, kind)) != text:
            self.logged[(direction, kind)] = text
            self.log("%s %s %s" % (direction, kind, text))

    # -- state helpers
    def enter(self, phase, kinds, now):
        """A new phase: exactly these messages go out periodically, starting now."""
        if phase != self.phase:
            self.log("phase %s -> %s" % (self.phase, phase))
        self.phase = phase
        self.sending = {k: now for k in kinds}

    def wait_for(self, kind, now, secs=TIMEOUT):
        self.waiting = (kind, now + secs)

    def transmit(self, kind, data, now):
        pgn, priority = MESSAGES[kind]
        if self.node.send(pgn, priority, data, now):
            self._log_change("tx", kind, data)

    def fail(self, reason, error_kind=None, error_data=None, now=None):
        """Ends the session: with an error message (BEM/CEM) sent for 1 s
        first, as the standard has the side that gives up tell the other."""
        if self.result or self.ending:
            return
        if error_kind is None:
            self.result = (1, reason)
            return
        self.log("giving up: %s; sending %s %s" % (reason, error_kind, error_data.hex(" ")))
        self.error = (error_kind, error_data)
        self.sending = {error_kind: now}
        self.waiting = None
        self.ending = (now + 1.0, reason)

    def complete(self):
        self.result = (0, "session completed")

    # -- the loop
    def on_message(self, pgn, data, now):
        kind = KIND_BY_PGN.get(pgn)
        if kind is None:
            self.note("unknown-%X" % pgn, "rx unknown PGN %04X: %s (ignored)" % (pgn, bytes(data).hex(" ")))
            return
        self._log_change("rx", kind, data)
        if self.result or self.ending:
            return
        try:
            self.handle(kind, data, now)
        except (IndexError, ValueError) as e:
            # A message too short for its fields: ignored like a lost frame.
            self.note("bad-" + kind, "rx %s unreadable (%s): %s" % (kind, e, bytes(data).hex(" ")))

    def tick(self, now):
        if self.ending and now >= self.ending[0]:
            self.result = (1, self.ending[1])
            return
        if self.waiting and now >= self.waiting[1] and not self.ending:
            self.on_timeout(self.waiting[0], now)
        for kind, due in list(self.sending.items()):
            if now < due or kind not in self.sending:
                continue
            data = self.error[1] if self.ending else self.build(kind, now)
            # Not later than one period from now, even after a long stall.
            period = self.periods.get(kind, 0.25)
            if kind in self.sending:
                self.sending[kind] = max(due + period, now)
            if data is not None:
                self.transmit(kind, data, now)

    def run(self):
        end = self.t0 + self.args.timeout
        try:
            while not self.result:
                wakeup = min(self.sending.values(), default=None)
                if self.waiting:
                    wakeup = min(wakeup or self.waiting[1], self.waiting[1])
                now = self.node.run_once(wakeup)
                if now >= end:
                    self.result = (1, "no complete session within %g s (phase %s%s)" % (
                        self.args.timeout, self.phase,
                        ", waiting for %s" % self.waiting[0] if self.waiting else ""))
                    break
                self.tick(now)
        except KeyboardInterrupt:
            self.result = (1, "interrupted")
        except OSError as e:
            self.result = (1, "CAN error: %s" % e)
        code, line = self.result
        print("%s: %s" % (self.name, line), file=self.out if code == 0 else self.err, flush=True)
        return code
