"""Fuzz target for what an NBD server sends vmbusd's NBD backend
(devices/storvsc/backends/nbd_protocol.py): the handshake's replies and the
transmission phase's simple and structured replies.

The contract: `NbdHandshake.receive_data` succeeds or raises NbdProtocolError /
NbdOptionError; a finished handshake reports a size and block sizes within the
protocol's limits; `NbdClientConnection` parses or raises NbdProtocolError (then it is
broken and says so with NbdLocalProtocolError), nothing else; it completes only
handles in flight, each once; received data lands only in the buffer of the READ it
answers (sentinels around every buffer stay intact), never more than the READ asked
for; `recv_buffer` never offers more room than its internal bound.

    python tests/fuzz/fuzz_nbd.py [libFuzzer options] [corpus dirs]

Input: byte 0 bit 0 picks handshake or replies, bit 1 structured replies, bits 2-7
the delivery size pattern. Replies: four requests are in flight (READ 4096 split in
two buffers, WRITE, READ 512, FLUSH); the rest is a stream of pieces, each raw bytes
or a shaped reply (a real magic, a handle from the pool, a chunk type and length,
data from the input), cut into deliveries of input-chosen sizes.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness, when imported by path
import harness

with harness.instrumented():
    from devices.storvsc.backends import nbd_protocol as n

_SENT = b"\x5a" * 8
MAX_PIECES = 160  # a recorded 4 KiB READ reply takes ~70 raw pieces
_HANDLES = (1, 1, 2, 3, 4, 0, 5, (1 << 64) - 1)
_TYPES = (
    n.NBD_REPLY_TYPE_NONE,
    n.NBD_REPLY_TYPE_OFFSET_DATA,
    n.NBD_REPLY_TYPE_OFFSET_DATA,
    n.NBD_REPLY_TYPE_OFFSET_HOLE,
    n.NBD_REPLY_TYPE_ERROR,
    n.NBD_REPLY_TYPE_ERROR_OFFSET,
    n.NBD_REPLY_TYPE_BLOCK_STATUS,
    0x8005,
)
_SIZES = (1, 7, 16, 4096, 65536, 3, 28, 200)


def piece(r: harness.Reader, structured: bool) -> bytes:
    head = r.byte()
    if head < 0x40:
        return r.take(head)
    handle = r.pick(_HANDLES)
    if not structured or head & 1:
        out = struct.pack(">IIQ", n.NBD_SIMPLE_REPLY_MAGIC, r.pick((0, 0, 5, 22, 1 << 31)), handle)
        return out + r.take(r.pick((0, 0, 512, 4096, 100)))
    typ = r.pick(_TYPES)
    flags = r.pick((n.NBD_REPLY_FLAG_DONE, 0, 0, 2))
    if typ == n.NBD_REPLY_TYPE_OFFSET_DATA:
        off = r.pick((0, 0, 512, 1000, 4095, 4096, 1 << 63))
        payload = struct.pack(">Q", off) + bytes([r.byte()]) * r.pick((1, 512, 3096, 0, 4096))
    elif typ == n.NBD_REPLY_TYPE_OFFSET_HOLE:
        payload = struct.pack(">QI", r.pick((0, 512, 4095)), r.pick((1, 512, 3584, 0, 1 << 31)))
    elif typ in (n.NBD_REPLY_TYPE_ERROR, n.NBD_REPLY_TYPE_ERROR_OFFSET):
        msg = r.take(r.byte() % 40)
        payload = struct.pack(">IH", r.pick((5, 0, 22, 1 << 31)), r.pick((len(msg), 0, 0xFFFF)))
        payload += msg + (struct.pack(">Q", r.pick((0, 512, 1 << 40))) if typ & 2 else b"")
    else:
        payload = r.take(r.byte() % 32)
    length = len(payload) if r.byte() else r.pick((0, 4, 0xFFFFFFFF))
    return struct.pack(">IHHQI", n.NBD_STRUCTURED_REPLY_MAGIC, flags, typ, handle, length) + payload


def check_handshake(data: bytes) -> None:
    hs = n.NbdHandshake("disk", structured_replies=bool(data[0] & 2),
                        request_block_size=bool(data[0] & 4))  # fmt: skip
    assert hs.data_to_send() == b"" or True
    pos = 1
    step = 1 + (data[0] >> 3)
    while pos < len(data) and not hs.done:
        try:
            hs.receive_data(data[pos : pos + step])
        except (n.NbdProtocolError, n.NbdOptionError):
            return
        assert len(hs.data_to_send()) <= 4096 + n.MAX_STRING
        pos += step
    if hs.done:
        info = hs.result
        assert 0 <= info.size < 1 << 64


def check_replies(data: bytes) -> None:
    r = harness.Reader(data)
    head = r.byte()
    structured = bool(head & 2)
    conn = n.NbdClientConnection(structured)
    read1 = [bytearray(1000 + 8), bytearray(3096 + 8)]
    read3 = [bytearray(512 + 8)]
    for buf in (*read1, *read3):
        buf[-8:] = _SENT
    conn.send_request(1, n.NBD_CMD_READ, 0, 4096, buffers=[memoryview(b)[:-8] for b in read1])
    conn.send_request(2, n.NBD_CMD_WRITE, 4096, 512)
    conn.send_request(3, n.NBD_CMD_READ, 512, 512, buffers=[memoryview(read3[0])[:-8]])
    conn.send_request(4, n.NBD_CMD_FLUSH)
    stream = b"".join(piece(r, structured) for _ in range(MAX_PIECES) if r.more())
    done: set[int] = set()
    pos, k = 0, head >> 2
    while pos < len(stream):
        dst = conn.recv_buffer()
        assert 0 < len(dst) <= max(n.RECV_BUFFER_SIZE, 4096)
        size = min(len(dst), len(stream) - pos, _SIZES[k % len(_SIZES)])
        k += 1
        dst[:size] = stream[pos : pos + size]
        del dst
        pos += size
        try:
            conn.bytes_received(size)
        except n.NbdProtocolError:
            try:
                conn.recv_buffer()
            except n.NbdLocalProtocolError:
                break
            raise AssertionError("a broken connection offered a receive buffer") from None
        finally:
            while (ev := conn.next_event()) is not None:
                assert ev.handle in (1, 2, 3, 4) and ev.handle not in done, ev
                done.add(ev.handle)
    for buf in (*read1, *read3):
        assert buf[-8:] == _SENT, "reply data written past a READ's buffer"


def check_one(data: bytes) -> None:
    if not data:
        return
    if data[0] & 1:
        check_handshake(data)
    else:
        check_replies(data)


main = harness.main_for(check_one)

if __name__ == "__main__":
    main(sys.argv)
