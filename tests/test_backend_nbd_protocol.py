"""The NBD protocol core without sockets: exact bytes, every validation, and fuzzing.

The fuzz invariant (h11's): whatever the server sends either parses or raises
NbdProtocolError (or, in the handshake, the NbdOptionError a refusal means).
"""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devices.storvsc.backends import nbd_protocol as p

HANDLE = 0x1122334455667788


# --- server-side encoders (test only) ---------------------------------------------------


def greeting(flags: int = p.NBD_FLAG_FIXED_NEWSTYLE | p.NBD_FLAG_NO_ZEROES) -> bytes:
    return struct.pack(">QQH", p.NBD_MAGIC, p.NBD_OPTS_MAGIC, flags)


def opt_reply(option: int, rtype: int, data: bytes = b"") -> bytes:
    return struct.pack(">QIII", p.NBD_REP_MAGIC, option, rtype, len(data)) + data


def info_export(size: int = 1 << 20, flags: int = 0x1ED) -> bytes:
    return opt_reply(p.NBD_OPT_GO, p.NBD_REP_INFO, struct.pack(">HQH", 0, size, flags))


def info_block(minimum: int, preferred: int, maximum: int) -> bytes:
    return opt_reply(
        p.NBD_OPT_GO, p.NBD_REP_INFO, struct.pack(">HIII", 3, minimum, preferred, maximum)
    )


def full_handshake(structured: bool = True) -> bytes:
    rtype = p.NBD_REP_ACK if structured else p.NBD_REP_ERR_UNSUP
    return (
        greeting()
        + opt_reply(p.NBD_OPT_STRUCTURED_REPLY, rtype)
        + info_export()
        + info_block(512, 4096, 1 << 20)
        + opt_reply(p.NBD_OPT_GO, p.NBD_REP_ACK)
    )


def simple(handle: int, error: int = 0, data: bytes = b"") -> bytes:
    return struct.pack(">IIQ", p.NBD_SIMPLE_REPLY_MAGIC, error, handle) + data


def chunk(handle: int, ctype: int, payload: bytes = b"", done: bool = True) -> bytes:
    flags = p.NBD_REPLY_FLAG_DONE if done else 0
    header = struct.pack(">IHHQI", p.NBD_STRUCTURED_REPLY_MAGIC, flags, ctype, handle, len(payload))
    return header + payload


def data_chunk(handle: int, offset: int, data: bytes, done: bool = False) -> bytes:
    return chunk(handle, p.NBD_REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", offset) + data, done)


def hole_chunk(handle: int, offset: int, size: int, done: bool = False) -> bytes:
    return chunk(handle, p.NBD_REPLY_TYPE_OFFSET_HOLE, struct.pack(">QI", offset, size), done)


def error_chunk(handle: int, error: int, msg: bytes = b"", offset: int | None = None) -> bytes:
    payload = struct.pack(">IH", error, len(msg)) + msg
    ctype = p.NBD_REPLY_TYPE_ERROR
    if offset is not None:
        payload += struct.pack(">Q", offset)
        ctype = p.NBD_REPLY_TYPE_ERROR_OFFSET
    return chunk(handle, ctype, payload, done=False)


def none_chunk(handle: int) -> bytes:
    return chunk(handle, p.NBD_REPLY_TYPE_NONE)


# --- handshake -------------------------------------------------------------------------


def test_handshake_go_with_block_sizes_and_structured_replies() -> None:
    hs = p.NbdHandshake("disk0")
    hs.receive_data(greeting())
    out = hs.data_to_send()
    # client flags, then NBD_OPT_STRUCTURED_REPLY with no data
    assert out[:4] == struct.pack(">I", p.NBD_FLAG_C_FIXED_NEWSTYLE | p.NBD_FLAG_C_NO_ZEROES)
    assert out[4:] == struct.pack(">QII", p.NBD_OPTS_MAGIC, p.NBD_OPT_STRUCTURED_REPLY, 0)
    hs.receive_data(opt_reply(p.NBD_OPT_STRUCTURED_REPLY, p.NBD_REP_ACK))
    go = hs.data_to_send()
    # GO: name length, name, one info request (NBD_INFO_BLOCK_SIZE)
    body = struct.pack(">I", 5) + b"disk0" + struct.pack(">HH", 1, p.NBD_INFO_BLOCK_SIZE)
    assert go == struct.pack(">QII", p.NBD_OPTS_MAGIC, p.NBD_OPT_GO, len(body)) + body
    # NAME info is ignored; INFO replies may come in any order
    name = opt_reply(p.NBD_OPT_GO, p.NBD_REP_INFO, struct.pack(">H", 1) + b"disk0")
    hs.receive_data(name + info_block(1, 4096, 1 << 25) + info_export(1 << 30, 0x12D))
    assert not hs.done
    hs.receive_data(opt_reply(p.NBD_OPT_GO, p.NBD_REP_ACK))
    assert hs.done and hs.bytes_wanted == 0
    assert hs.result == p.ExportInfo(1 << 30, 0x12D, 1, 4096, 1 << 25, True)
    assert hs.result.has(p.NBD_FLAG_CAN_MULTI_CONN) and not hs.result.read_only


def test_handshake_byte_by_byte() -> None:
    hs = p.NbdHandshake()
    for b in full_handshake():
        hs.receive_data(bytes([b]))
    assert hs.done and hs.result.structured_replies and hs.result.min_block == 512


def test_structured_replies_refused_is_fine() -> None:
    hs = p.NbdHandshake()
    hs.receive_data(full_handshake(structured=False))
    assert hs.done and not hs.result.structured_replies


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_fallback_to_export_name_when_go_unsupported(no_zeroes: bool) -> None:
    flags = p.NBD_FLAG_FIXED_NEWSTYLE | (p.NBD_FLAG_NO_ZEROES if no_zeroes else 0)
    hs = p.NbdHandshake("x", structured_replies=False)
    hs.receive_data(greeting(flags))
    hs.data_to_send()
    hs.receive_data(opt_reply(p.NBD_OPT_GO, p.NBD_REP_ERR_UNSUP, b"old server"))
    sent = hs.data_to_send()
    assert sent == struct.pack(">QII", p.NBD_OPTS_MAGIC, p.NBD_OPT_EXPORT_NAME, 1) + b"x"
    hs.receive_data(struct.pack(">QH", 4096, 3))
    assert hs.done == no_zeroes
    if not no_zeroes:
        hs.receive_data(bytes(p.EXPORT_NAME_ZEROES))
    assert hs.result == p.ExportInfo(4096, 3, 0, 0, 0, False) and hs.result.read_only


def test_plain_newstyle_server_gets_export_name_directly() -> None:
    hs = p.NbdHandshake("x")
    hs.receive_data(greeting(0))
    sent = hs.data_to_send()
    assert sent[:4] == bytes(4)  # no client flags we may not set
    assert sent[4:] == struct.pack(">QII", p.NBD_OPTS_MAGIC, p.NBD_OPT_EXPORT_NAME, 1) + b"x"


def test_unknown_export_is_an_option_error() -> None:
    hs = p.NbdHandshake("nope")
    hs.receive_data(greeting() + opt_reply(p.NBD_OPT_STRUCTURED_REPLY, p.NBD_REP_ACK))
    with pytest.raises(p.NbdOptionError) as info:
        hs.receive_data(opt_reply(p.NBD_OPT_GO, p.NBD_REP_ERR_UNKNOWN, b"no such export"))
    assert info.value.reply_type == p.NBD_REP_ERR_UNKNOWN
    assert "no such export" in str(info.value)


@pytest.mark.parametrize(
    "stream",
    [
        struct.pack(">QQH", 0x1234, p.NBD_OPTS_MAGIC, 1),  # bad magic
        struct.pack(">QQH", p.NBD_MAGIC, p.NBD_CLISERV_MAGIC, 1),  # oldstyle
        struct.pack(">QQH", p.NBD_MAGIC, 0x55, 1),  # bad newstyle magic
        greeting() + struct.pack(">QIII", 0x99, 8, 1, 0),  # bad option reply magic
        greeting() + opt_reply(p.NBD_OPT_GO, p.NBD_REP_ACK),  # reply to the wrong option
        greeting() + struct.pack(">QIII", p.NBD_REP_MAGIC, 8, 1, p.MAX_OPTION_REPLY_LENGTH + 1),
        greeting() + opt_reply(8, p.NBD_REP_ACK) + opt_reply(7, p.NBD_REP_ACK),  # no export
        greeting() + opt_reply(8, p.NBD_REP_ACK) + opt_reply(7, p.NBD_REP_SERVER, b"\0" * 4),
        greeting() + opt_reply(8, 1) + opt_reply(7, 3, b"\0"),  # info shorter than its type
        greeting() + opt_reply(8, 1) + opt_reply(7, 3, struct.pack(">HQ", 0, 1)),  # short export
        greeting() + opt_reply(8, 1) + info_block(3, 4096, 4096),  # min not a power of two
        greeting() + opt_reply(8, 1) + info_block(1 << 17, 1 << 17, 1 << 20),  # min too big
        greeting() + opt_reply(8, 1) + info_block(4096, 512, 1 << 20),  # preferred < min
        greeting() + opt_reply(8, 1) + info_block(512, 4096, 1000),  # max not a multiple
        greeting() + opt_reply(8, 1) + info_export() * (p.MAX_OPTION_REPLIES + 1),
        greeting() + opt_reply(8, 7),  # a non-error, non-ACK reply to STRUCTURED_REPLY
    ],
)
def test_handshake_rejects_broken_servers(stream: bytes) -> None:
    hs = p.NbdHandshake()
    with pytest.raises(p.NbdProtocolError):
        hs.receive_data(stream)


def test_export_name_limits() -> None:
    with pytest.raises(p.NbdLocalProtocolError):
        p.NbdHandshake("x" * (p.MAX_STRING + 1))
    with pytest.raises(p.NbdLocalProtocolError):
        p.NbdHandshake("a\0b")
    with pytest.raises(p.NbdLocalProtocolError):
        _ = p.NbdHandshake().result


@given(st.binary(max_size=400))
def test_handshake_fuzz_parses_or_raises_protocol_error(data: bytes) -> None:
    hs = p.NbdHandshake("e")
    try:
        hs.receive_data(data)
    except (p.NbdProtocolError, p.NbdOptionError):
        return


@given(st.data())
def test_handshake_fuzz_mutated_valid_stream(data: st.DataObject) -> None:
    stream = bytearray(full_handshake())
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(stream) - 1))
        stream[i] = data.draw(st.integers(0, 255))
    hs = p.NbdHandshake()
    try:
        hs.receive_data(bytes(stream))
    except (p.NbdProtocolError, p.NbdOptionError):
        return
    if hs.done:
        info = hs.result
        assert info.min_block == 0 or info.min_block <= p.MAX_BLOCK_SIZE_MINIMUM


# --- transmission ----------------------------------------------------------------------


def test_request_header_bytes() -> None:
    c = p.NbdClientConnection(True)
    hdr = c.send_request(HANDLE, p.NBD_CMD_WRITE, 4096, 512, p.NBD_CMD_FLAG_FUA)
    assert hdr == bytes.fromhex("25609513000100011122334455667788") + struct.pack(">QI", 4096, 512)
    assert p.encode_disconnect() == bytes.fromhex("25609513 0000 0002") + bytes(20)
    assert c.in_flight == 1


def read_conn(structured: bool, length: int = 16, splits: tuple[int, ...] = (5, 11)):
    """A connection with one read of `length` bytes into buffers split at `splits`."""
    backing = bytearray(length)
    cuts = [0, *splits, length]
    bufs = [memoryview(backing)[a:b] for a, b in itertools.pairwise(cuts)]
    c = p.NbdClientConnection(structured)
    c.send_request(HANDLE, p.NBD_CMD_READ, 1000, length, 0, bufs)
    return c, backing


def test_simple_read_lands_in_scattered_buffers() -> None:
    c, backing = read_conn(False)
    c.receive_data(simple(HANDLE, 0, bytes(range(16))))
    assert c.next_event() == p.ReplyDone(HANDLE, 0)
    assert backing == bytes(range(16)) and c.in_flight == 0 and c.next_event() is None


def test_read_payload_goes_straight_into_the_callers_buffer() -> None:
    c, backing = read_conn(False, length=8192, splits=(4096,))
    hdr = simple(HANDLE)
    c.recv_buffer()[: len(hdr)] = hdr
    c.bytes_received(len(hdr))
    target = c.recv_buffer()  # the payload is due and nothing is buffered: the caller's memory
    assert len(target) == 4096
    target[:] = b"a" * 4096
    c.bytes_received(4096)
    assert backing[:4096] == b"a" * 4096
    target = c.recv_buffer()
    target[:100] = b"b" * 100
    c.bytes_received(100)
    assert c.next_event() is None
    c.receive_data(b"c" * (4096 - 100))
    assert c.next_event() == p.ReplyDone(HANDLE, 0)
    assert backing == b"a" * 4096 + b"b" * 100 + b"c" * 3996


def test_structured_read_chunks_out_of_order_with_a_hole() -> None:
    c, backing = read_conn(True)
    backing[:] = b"\xff" * 16
    c.receive_data(
        data_chunk(HANDLE, 1010, b"KLMNOP")
        + hole_chunk(HANDLE, 1004, 6)
        + data_chunk(HANDLE, 1000, b"ABCD")
        + none_chunk(HANDLE)
    )
    assert c.next_event() == p.ReplyDone(HANDLE, 0)
    assert backing == b"ABCD" + bytes(6) + b"KLMNOP"


def test_structured_read_final_data_chunk_is_done() -> None:
    c, backing = read_conn(True)
    c.receive_data(data_chunk(HANDLE, 1000, b"x" * 16, done=True))
    assert c.next_event() == p.ReplyDone(HANDLE, 0) and backing == b"x" * 16


def test_error_chunks_fail_the_request_and_keep_the_connection() -> None:
    c, _ = read_conn(True)
    c.send_request(7, p.NBD_CMD_WRITE, 0, 512)
    c.receive_data(
        error_chunk(HANDLE, p.NBD_EIO, b"bad sector", offset=1008)
        + none_chunk(HANDLE)
        + error_chunk(7, p.NBD_ENOSPC)
        + none_chunk(7)
    )
    assert c.next_event() == p.ReplyDone(HANDLE, p.NBD_EIO, "bad sector", 1008)
    assert c.next_event() == p.ReplyDone(7, p.NBD_ENOSPC, "", None)
    assert p.error_name(p.NBD_EIO) == "EIO" and "123" in p.error_name(123)


def test_unknown_error_type_with_bit_15_is_an_error_not_a_disconnect() -> None:
    c, _ = read_conn(True)
    c.receive_data(chunk(HANDLE, 0x8123, struct.pack(">IH", 5, 0) + b"xx", done=True))
    assert c.next_event() == p.ReplyDone(HANDLE, 5, "", None)


def test_simple_error_reply_to_structured_read_is_accepted() -> None:
    c, _ = read_conn(True)
    c.receive_data(simple(HANDLE, p.NBD_EINVAL))
    assert c.next_event() == p.ReplyDone(HANDLE, p.NBD_EINVAL)


def test_many_requests_matched_by_handle() -> None:
    c = p.NbdClientConnection(False)
    for h in range(1, 65):
        c.send_request(h, p.NBD_CMD_WRITE, h * 512, 512)
    c.receive_data(b"".join(simple(h) for h in reversed(range(1, 65))))
    assert [c.next_event().handle for _ in range(64)] == list(reversed(range(1, 65)))
    with pytest.raises(p.NbdLocalProtocolError):
        c.send_request(1, p.NBD_CMD_READ, 0, 1, 0, [])  # buffers do not match


def test_abandoned_read_is_drained_without_touching_buffers() -> None:
    c, backing = read_conn(True)
    c.abandon(HANDLE)
    c.receive_data(data_chunk(HANDLE, 1000, b"z" * 16, done=True))
    assert c.next_event() == p.ReplyDone(HANDLE, 0) and backing == bytes(16)
    c, backing = read_conn(False)
    c.abandon(HANDLE)
    c.receive_data(simple(HANDLE, 0, b"z" * 16))
    assert c.next_event() == p.ReplyDone(HANDLE, 0) and backing == bytes(16)


def test_zero_length_reads() -> None:
    c = p.NbdClientConnection(False)
    c.send_request(1, p.NBD_CMD_READ, 0, 0, 0, [])
    c.receive_data(simple(1))
    assert c.next_event() == p.ReplyDone(1, 0)
    c = p.NbdClientConnection(True)
    c.send_request(1, p.NBD_CMD_READ, 0, 0, 0, [])
    c.receive_data(none_chunk(1))
    assert c.next_event() == p.ReplyDone(1, 0)


@pytest.mark.parametrize(
    ("structured", "stream"),
    [
        (True, simple(42)),  # unknown handle
        (True, struct.pack(">IIQ", 0xDEADBEEF, 0, HANDLE)),  # bad magic
        (False, data_chunk(HANDLE, 1000, b"x" * 16, done=True)),  # not negotiated
        (True, simple(HANDLE, 0)),  # simple reply with data to a structured read
        (True, data_chunk(HANDLE, 999, b"x" * 16, done=True)),  # before the read
        (True, data_chunk(HANDLE, 1001, b"x" * 16, done=True)),  # past the read
        (True, chunk(HANDLE, 1, struct.pack(">Q", 1000) + b"x" * 17)),  # longer than the read
        (True, chunk(HANDLE, 1, struct.pack(">Q", 1000))),  # data chunk with no data
        (True, data_chunk(HANDLE, 1000, b"x" * 8) + data_chunk(HANDLE, 1004, b"y" * 4)),
        (True, hole_chunk(HANDLE, 1000, 8) + hole_chunk(HANDLE, 999, 2)),  # overlap
        (True, hole_chunk(HANDLE, 1000, 0)),  # empty hole
        (True, chunk(HANDLE, 2, struct.pack(">QI", 1000, 4) + b"x")),  # hole of wrong length
        (True, data_chunk(HANDLE, 1000, b"x" * 8, done=True)),  # done without full coverage
        (True, none_chunk(HANDLE)),  # nothing covered
        (True, chunk(HANDLE, 0, b"", done=False)),  # NONE without DONE
        (True, chunk(HANDLE, 0, b"x")),  # NONE with payload
        (True, chunk(HANDLE, 5, b"\0" * 12)),  # block status never negotiated
        (True, chunk(HANDLE, 77, b"")),  # unknown non-error type
        (True, error_chunk(HANDLE, 0)),  # error 0
        (True, chunk(HANDLE, p.NBD_REPLY_TYPE_ERROR, struct.pack(">IH", 5, 10) + b"abc")),
        (True, chunk(HANDLE, p.NBD_REPLY_TYPE_ERROR, b"\0\0\0")),  # shorter than an error
        (True, error_chunk(HANDLE, 5, offset=999)),  # error offset outside the request
        (True, chunk(HANDLE, p.NBD_REPLY_TYPE_ERROR_OFFSET, struct.pack(">IH", 5, 0))),
        (
            True,
            struct.pack(
                ">IHHQI",
                p.NBD_STRUCTURED_REPLY_MAGIC,
                0,
                p.NBD_REPLY_TYPE_ERROR,
                HANDLE,
                p.MAX_ERROR_CHUNK_LENGTH + 1,
            ),
        ),  # oversized error chunk: refused before any payload is buffered
        (
            True,
            struct.pack(">IHHQI", p.NBD_STRUCTURED_REPLY_MAGIC, 0, 1, HANDLE, 0xFFFFFFFF),
        ),  # a 4 GiB data chunk for a 16-byte read
    ],
)
def test_broken_replies_are_protocol_errors(structured: bool, stream: bytes) -> None:
    c, _ = read_conn(structured)
    with pytest.raises(p.NbdProtocolError):
        c.receive_data(stream)
    with pytest.raises(p.NbdLocalProtocolError):
        c.recv_buffer()  # a broken connection stays broken


def test_data_chunk_on_a_write_is_a_protocol_error() -> None:
    c = p.NbdClientConnection(True)
    c.send_request(1, p.NBD_CMD_WRITE, 0, 512)
    with pytest.raises(p.NbdProtocolError):
        c.receive_data(data_chunk(1, 0, b"x", done=True))
    c = p.NbdClientConnection(True)
    c.send_request(1, p.NBD_CMD_FLUSH)
    with pytest.raises(p.NbdProtocolError):
        c.receive_data(hole_chunk(1, 0, 1, done=True))


def test_fragment_limit() -> None:
    length = 2 * (p.MAX_REPLY_FRAGMENTS + 1)
    c, _ = read_conn(True, length=length, splits=())
    stream = b"".join(hole_chunk(HANDLE, 1000 + 2 * i, 1) for i in range(p.MAX_REPLY_FRAGMENTS + 1))
    with pytest.raises(p.NbdProtocolError, match="fragments"):
        c.receive_data(stream)


def test_local_misuse() -> None:
    c = p.NbdClientConnection(True)
    with pytest.raises(p.NbdLocalProtocolError):
        c.bytes_received(1)
    with pytest.raises(p.NbdLocalProtocolError):
        c.send_request(1, p.NBD_CMD_READ, 0, p.MAX_REQUEST_LENGTH + 1)
    with pytest.raises(p.NbdLocalProtocolError):
        c.send_request(1, p.NBD_CMD_READ, p.MAX_OFFSET, 2, 0, [memoryview(bytearray(2))])
    c.send_request(1, p.NBD_CMD_FLUSH)
    with pytest.raises(p.NbdLocalProtocolError):
        c.send_request(1, p.NBD_CMD_FLUSH)


def _reply_streams() -> st.SearchStrategy[bytes]:
    """Plausible reply pieces for handles 1..3 (reads of 32 bytes at 0), glued together."""
    handles = st.integers(0, 4)
    piece = st.one_of(
        st.builds(lambda h, e: simple(h, e), handles, st.sampled_from([0, 5])),
        st.builds(
            lambda h, o, n, d: data_chunk(h, o, b"d" * n, d),
            handles,
            st.integers(0, 40),
            st.integers(0, 40),
            st.booleans(),
        ),
        st.builds(
            lambda h, o, n, d: hole_chunk(h, o, n, d),
            handles,
            st.integers(0, 40),
            st.integers(0, 40),
            st.booleans(),
        ),
        st.builds(none_chunk, handles),
        st.builds(lambda h, e: error_chunk(h, e, b"m"), handles, st.integers(0, 6)),
        st.binary(max_size=24),
    )
    return st.lists(piece, max_size=8).map(b"".join)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.booleans(), _reply_streams(), st.integers(1, 64))
def test_reply_fuzz_parses_or_raises_protocol_error(
    structured: bool, stream: bytes, step: int
) -> None:
    c = p.NbdClientConnection(structured)
    backing = bytearray(96)
    for h in (1, 2, 3):
        c.send_request(h, p.NBD_CMD_READ, 0, 32, 0, [memoryview(backing)[(h - 1) * 32 : h * 32]])
    c.send_request(4, p.NBD_CMD_WRITE, 0, 32)
    done = set()
    try:
        for i in range(0, len(stream), step):
            c.receive_data(stream[i : i + step])
            while (ev := c.next_event()) is not None:
                assert ev.handle not in done  # each request completes at most once
                done.add(ev.handle)
    except p.NbdProtocolError:
        return
    assert len(backing) == 96  # never written past the buffers
