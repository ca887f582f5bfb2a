"""SAE J1939-21 over raw SocketCAN, just enough for GB/T 27930 peers.

Written from the standards for the VM lane's independent peers
(tests/vcan/peers/README.md); it deliberately shares no code with bmsgw, so
that a misreading in one is not silently the other's.

- Bus: one CAN_RAW socket, 29-bit ids only.
- Transport: connection-mode TP (RTS/CTS, EndOfMsgAck, Abort) as sender and
  receiver, one connection per direction to the single peer, as GB/T 27930
  needs. Hooks let a peer put field deviations into the CTS it sends and
  read the CTS it receives its own way.
- Node: demultiplexes frames from the peer into whole messages.

Everything is polled from one loop (Node.run_once); nothing blocks for longer
than the next timer, so a peer always stays bounded in time.
"""

import select
import socket
import struct
import time

# struct can_frame: id u32, dlc u8, 3 pad bytes, 8 data bytes.
CAN_FRAME = struct.Struct("=IB3x8s")
CAN_EFF_FLAG = 0x80000000
CAN_RTR_FLAG = 0x40000000
CAN_ERR_FLAG = 0x20000000
CAN_EFF_MASK = 0x1FFFFFFF

PGN_TP_CM = 0xEC00
PGN_TP_DT = 0xEB00
TP_PRIORITY = 7
CTRL_RTS, CTRL_CTS, CTRL_EOMA, CTRL_BAM, CTRL_ABORT = 16, 17, 19, 32, 255
ABORT_TIMEOUT = 3
ABORT_BAD_SEQUENCE = 7
ABORT_OTHER = 250
MAX_TP_LEN = 255 * 7

# J1939-21 timers, in seconds.
T1 = 0.75   # receiver: between data packets
T2 = 1.25   # receiver: from its CTS to the first data packet
T3 = 1.25   # sender: from the last packet sent to CTS or EndOfMsgAck
T4 = 1.05   # sender: after a hold (CTS with 0 packets)


def make_id(priority, pgn, source, destination):
    """29-bit id of a PDU1 (addressed) PGN: P | PF | DA | SA."""
    pf = (pgn >> 8) & 0xFF
    return ((priority & 7) << 26) | ((pgn >> 16) & 3) << 24 | pf << 16 | destination << 8 | source


def split_id(can_id):
    """(priority, pgn, source, destination); PDU2 frames get destination 0xFF."""
    priority = (can_id >> 26) & 7
    dp = (can_id >> 24) & 3
    pf = (can_id >> 16) & 0xFF
    ps = (can_id >> 8) & 0xFF
    source = can_id & 0xFF
    if pf < 240:
        return priority, (dp << 16) | (pf << 8), source, ps
    return priority, (dp << 16) | (pf << 8) | ps, source, 0xFF


def pgn_bytes(pgn):
    return bytes((pgn & 0xFF, (pgn >> 8) & 0xFF, (pgn >> 16) & 0xFF))


def pgn_from(data):
    return data[5] | data[6] << 8 | data[7] << 16


class CanBus:
    """A CAN_RAW socket bound to one interface (or any datagram socket that
    carries struct can_frame records, which the offline self-test uses)."""

    def __init__(self, iface=None, sock=None):
        if sock is None:
            sock = socket.socket(socket.AF_CAN, socket.SOCK_RAW, socket.CAN_RAW)
            sock.bind((iface,))
        self.sock = sock
        self.sock.setblocking(False)

    def send(self, can_id, data):
        frame = CAN_FRAME.pack(can_id | CAN_EFF_FLAG, len(data), bytes(data).ljust(8, b"\0"))
        for _ in range(50):
            try:
                self.sock.send(frame)
                return
            except (BlockingIOError, InterruptedError):
                # The interface queue is full (txqueuelen): wait for room.
                select.select([], [self.sock], [], 0.01)
            except OSError as e:
                # ENOBUFS: same thing on a real interface.
                if e.errno != 105:
                    raise
                time.sleep(0.002)
        raise OSError("CAN send queue stayed full for 0.5 s")

    def recv(self, timeout):
        """One 29-bit data frame as (id, data), or None after `timeout`."""
        end = time.monotonic() + max(0.0, timeout)
        while True:
            left = end - time.monotonic()
            r, _, _ = select.select([self.sock], [], [], max(0.0, left))
            if not r:
                return None
            try:
                raw = self.sock.recv(64)
            except (BlockingIOError, InterruptedError):
                continue
            if len(raw) < CAN_FRAME.size:
                continue
            can_id, dlc, data = CAN_FRAME.unpack(raw[:CAN_FRAME.size])
            # Standard ids (e.g. the lane's candump marker), remote and error
            # frames are nothing to a J1939 node.
            if not can_id & CAN_EFF_FLAG or can_id & (CAN_RTR_FLAG | CAN_ERR_FLAG):
                continue
            return can_id & CAN_EFF_MASK, data[:min(dlc, 8)]


class TpSender:
    """Our outgoing RTS/CTS connection to the peer (one at a time).

    `read_interval(cts_data)` returns the gap in seconds to leave between
    data packets after that CTS; the standard reading is 0 (bytes 4-5 are
    reserved), a deviating BMS reads them as milliseconds."""

    IDLE, WAIT_CTS, SENDING, WAIT_EOMA = "idle", "wait-cts", "sending", "wait-eoma"

    def __init__(self, node, read_interval=None):
        self.node = node
        self.read_interval = read_interval or (lambda data: 0.0)
        self.state = self.IDLE
        self.queue = []  # (pgn, priority, data), at most one per PGN

    def busy_with(self, pgn):
        return (self.state != self.IDLE and self.pgn == pgn) or any(q[0] == pgn for q in self.queue)

    def send(self, pgn, priority, data, now):
        """Queue a multi-packet message. A PGN already queued or in transfer
        is not queued twice: periodic messages simply skip a period."""
        if len(data) > MAX_TP_LEN or self.busy_with(pgn):
            return False
        self.queue.append((pgn, priority, bytes(data)))
        self._start_next(now)
        return True

    def _start_next(self, now):
        if self.state != self.IDLE or not self.queue:
            return
        self.pgn, _, self.data = self.queue.pop(0)
        self.packets = (len(self.data) + 6) // 7
        self.next_seq = 1
        self.granted = 0
        self.interval = 0.0
        rts = bytes((CTRL_RTS, len(self.data) & 0xFF, len(self.data) >> 8, self.packets, 0xFF)) + pgn_bytes(self.pgn)
        self.node.send_cm(rts)
        self.state, self.deadline = self.WAIT_CTS, now + T3

    def _end(self, ok, why, now):
        pgn = self.pgn
        self.state = self.IDLE
        self.node.on_tp_sent(pgn, ok, why)
        self._start_next(now)

    def on_cm(self, data, now):
        if self.state == self.IDLE:
            return
        ctrl = data[0]
        if pgn_from(data) != self.pgn:
            # A CTS/EOMA for another PGN (or with no PGN at all) is not ours.
            if ctrl != CTRL_ABORT:
                self.node.note("tp-foreign-cm", "TP: ignoring %s for PGN %06X while sending %06X: %s"
                               % (cm_name(ctrl), pgn_from(data), self.pgn, data.hex(" ")))
            return
        if ctrl == CTRL_ABORT:
            self._end(False, "receiver aborted (reason %d)" % data[1], now)
        elif ctrl == CTRL_EOMA and self.state == self.WAIT_EOMA:
            self._end(True, "", now)
        elif ctrl == CTRL_CTS and self.state in (self.WAIT_CTS, self.WAIT_EOMA):
            count, nxt = data[1], data[2]
            if count == 0:
                self.state, self.deadline = self.WAIT_CTS, now + T4
                return
            if not 1 <= nxt <= self.packets:
                self.node.send_cm(bytes((CTRL_ABORT, ABORT_OTHER, 0xFF, 0xFF, 0xFF)) + pgn_bytes(self.pgn))
                self._end(False, "CTS asks for packet %d of %d" % (nxt, self.packets), now)
                return
            self.next_seq, self.granted = nxt, min(count, self.packets - nxt + 1)
            self.interval = self.read_interval(data)
            self.state, self.next_dt_at = self.SENDING, now

    def poll(self, now):
        if self.state == self.SENDING:
            while self.granted > 0 and now >= self.next_dt_at:
                seq = self.next_seq
                chunk = self.data[(seq - 1) * 7:seq * 7]
                self.node.send_dt(bytes((seq,)) + chunk.ljust(7, b"\xff"))
                self.next_seq += 1
                self.granted -= 1
                self.next_dt_at = now + self.interval
                if self.interval > 0:
                    break
            if self.granted == 0:
                done = self.next_seq > self.packets
                self.state = self.WAIT_EOMA if done else self.WAIT_CTS
                self.deadline = now + T3
        elif self.state != self.IDLE and now >= self.deadline:
            self.node.send_cm(bytes((CTRL_ABORT, ABORT_TIMEOUT, 0xFF, 0xFF, 0xFF)) + pgn_bytes(self.pgn))
            self._end(False, "timed out in state %s" % self.state, now)

    def next_wakeup(self):
        if self.state == self.SENDING:
            return self.next_dt_at
        return self.deadline if self.state != self.IDLE else None


class TpReceiver:
    """The peer's incoming RTS/CTS connection to us.

    `make_cts(pgn, count, next_seq)` builds the CTS we answer with, so that
    a deviating charger can fill bytes 4-8 its own way."""

    def __init__(self, node, make_cts=None):
        self.node = node
        self.make_cts = make_cts or standard_cts
        self.active = False

    def on_rts(self, data, now):
        size, packets, max_per_cts, pgn = data[1] | data[2] << 8, data[3], data[4], pgn_from(data)
        if self.active:
            # J1939-21: a new RTS from the same sender replaces its old connection.
            self.node.note("tp-restart", "TP: RTS for %06X while receiving %06X: starting over" % (pgn, self.pgn))
        if size > MAX_TP_LEN or size <= 8 or packets != (size + 6) // 7:
            self.active = False
            self.node.send_cm(bytes((CTRL_ABORT, ABORT_OTHER, 0xFF, 0xFF, 0xFF)) + pgn_bytes(pgn))
            return
        self.active = True
        self.pgn, self.size, self.packets = pgn, size, packets
        self.per_cts = packets if max_per_cts in (0, 0xFF) else min(packets, max_per_cts)
        self.buf = bytearray()
        self._grant(1, now)

    def _grant(self, nxt, now):
        self.expect = nxt
        self.window_end = min(self.packets, nxt + self.per_cts - 1)
        self.node.send_cm(self.make_cts(self.pgn, self.window_end - nxt + 1, nxt))
        self.deadline = now + T2

    def on_dt(self, data, now):
        if not self.active or len(data) < 2:
            return
        seq = data[0]
        if seq == self.expect - 1:
            return  # a repeated packet: harmless
        if seq != self.expect:
            self._abort(ABORT_BAD_SEQUENCE, "packet %d where %d was due" % (seq, self.expect))
            return
        self.buf += data[1:8]
        self.expect += 1
        self.deadline = now + T1
        if seq == self.packets:
            self.active = False
            eoma = bytes((CTRL_EOMA, self.size & 0xFF, self.size >> 8, self.packets, 0xFF)) + pgn_bytes(self.pgn)
            self.node.send_cm(eoma)
            self.node.on_tp_received(self.pgn, bytes(self.buf[:self.size]))
        elif seq == self.window_end:
            self._grant(seq + 1, now)

    def on_abort(self, data):
        if self.active and pgn_from(data) == self.pgn:
            self.active = False
            self.node.note("tp-abort-in", "TP: sender aborted %06X (reason %d)" % (self.pgn, data[1]))

    def _abort(self, reason, why):
        self.active = False
        self.node.send_cm(bytes((CTRL_ABORT, reason, 0xFF, 0xFF, 0xFF)) + pgn_bytes(self.pgn))
        self.node.note("tp-abort-out", "TP: receiving %06X aborted: %s" % (self.pgn, why))

    def poll(self, now):
        if self.active and now >= self.deadline:
            self._abort(ABORT_TIMEOUT, "timed out")

    def next_wakeup(self):
        return self.deadline if self.active else None


def standard_cts(pgn, count, next_seq):
    return bytes((CTRL_CTS, count, next_seq, 0xFF, 0xFF)) + pgn_bytes(pgn)


def cm_name(ctrl):
    return {CTRL_RTS: "RTS", CTRL_CTS: "CTS", CTRL_EOMA: "EOMA", CTRL_BAM: "BAM", CTRL_ABORT: "Abort"}.get(ctrl, "TP.CM %d" % ctrl)


class Node:
    """A J1939 node talking to one peer. The owner supplies:
      on_message(pgn, data, now)   a whole message from the peer
      on_tp_sent(pgn, ok, why)     (optional) an outgoing transfer ended
      note(key, line)              log a line, once per key
    """

    def __init__(self, bus, local, peer, owner, read_interval=None, make_cts=None):
        self.bus, self.local, self.peer, self.owner = bus, local, peer, owner
        self.tx = TpSender(self, read_interval)
        self.rx = TpReceiver(self, make_cts)

    # -- sending
    def send(self, pgn, priority, data, now):
        """A message of any length; False if a transfer of it is still running."""
        if len(data) <= 8:
            self.bus.send(make_id(priority, pgn, self.local, self.peer), data)
            return True
        return self.tx.send(pgn, priority, data, now)

    def send_cm(self, data):
        self.bus.send(make_id(TP_PRIORITY, PGN_TP_CM, self.local, self.peer), data)

    def send_dt(self, data):
        self.bus.send(make_id(TP_PRIORITY, PGN_TP_DT, self.local, self.peer), data)

    # -- callbacks from the transport
    def on_tp_sent(self, pgn, ok, why):
        cb = getattr(self.owner, "on_tp_sent", None)
        if cb:
            cb(pgn, ok, why)

    def on_tp_received(self, pgn, data):
        self.owner.on_message(pgn, data, time.monotonic())

    def note(self, key, line):
        self.owner.note(key, line)

    # -- the loop
    def on_frame(self, can_id, data, now):
        _, pgn, source, destination = split_id(can_id)
        # GB/T 27930 is point to point: only the peer's frames to us count.
        if source != self.peer or destination != self.local:
            return
        if pgn == PGN_TP_CM:
            if len(data) < 8:
                return
            ctrl = data[0]
            if ctrl == CTRL_RTS:
                self.rx.on_rts(data, now)
            elif ctrl in (CTRL_CTS, CTRL_EOMA):
                self.tx.on_cm(data, now)
            elif ctrl == CTRL_ABORT:
                self.rx.on_abort(data)
                self.tx.on_cm(data, now)
        elif pgn == PGN_TP_DT:
            self.rx.on_dt(data, now)
        else:
            self.owner.on_message(pgn, bytes(data), now)

    def run_once(self, wakeup):
        """Waits for one frame or until `wakeup` (monotonic), then runs the
        transport's timers. The wait is capped so the owner's tick stays
        regular."""
        now = time.monotonic()
        times = [t for t in (wakeup, self.tx.next_wakeup(), self.rx.next_wakeup()) if t is not None]
        wait = min(min(times) - now, 0.05) if times else 0.05
        got = self.bus.recv(max(0.0, wait))
        now = time.monotonic()
        if got:
            self.on_frame(got[0], got[1], now)
        self.rx.poll(now)
        self.tx.poll(now)
        return now
