"""The attach protocol: how a VMM and vmbusd talk (docs/attach-protocol.md).

Two layers, h11 style:

* a sans-IO message layer -- ``encode_message`` / ``decode_message`` turn frozen
  dataclasses into one msgpack datagram plus a list of fds and back, checking every
  field against a named bound, so the peer's mistakes all end in one exception
  (``AttachProtocolError``) and never leak an fd;
* a small trio transport -- ``AttachConnection`` over an AF_UNIX SOCK_SEQPACKET
  socket, ``connect``, ``listen`` / ``Listener.accept`` (0600 socket file,
  SO_PEERCRED allow-list) and ``handshake``.

The session logic (what to do with a ``bind`` or a ``post``) lives elsewhere.
"""

from __future__ import annotations

import array
import contextlib
import itertools
import logging
import os
import re
import socket as _stdsocket
import stat
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, fields
from typing import Any, Literal, Self

import msgpack
import trio

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- bounds

PROTOCOL_VERSION = 1
"""The major version we speak; a peer with another one gets ``error`` and a close."""

MAX_DATAGRAM = 64 * 1024
"""Largest datagram either side may send (the receive buffer is one byte larger)."""
MAX_FDS_PER_MESSAGE = 64
"""SCM_RIGHTS fds per datagram; the kernel's own cap (SCM_MAX_FD) is 253."""
MAX_REGIONS = 64
"""Guest RAM regions per ``memory`` message (each carries one fd)."""
MAX_PAYLOAD = 240
"""HV_MESSAGE_PAYLOAD_BYTE_COUNT: a SynIC message payload, VMBus header included."""
MAX_VM_ID_LEN = 128
MAX_SOFTWARE_LEN = 128
MAX_FEATURES = 32
MAX_FEATURE_LEN = 64
MAX_ERROR_CODE_LEN = 32
MAX_ERROR_MESSAGE_LEN = 1024
MAX_VCPUS = 4096
"""vCPU indices are < MAX_VCPUS (KVM's x86 limit)."""
MAX_RELID = 2047
"""A relid is also the channel's bit in a 2048-bit event-flags slot; bit 0 is unused."""
CONNECTION_ID_MASK = 0x00FF_FFFF
"""HV_CONNECTION_ID_MASK: connection ids are 24 bits."""
MIN_CHANNEL_CONNECTION_ID = 5
"""Ids 1-4 are the bus's fixed ids (spec 4.2); a channel's id is above them."""
MESSAGE_CONNECTION_IDS = frozenset({1, 4})
"""The HvPostMessage connection ids vmbusd owns; the VMM answers any other itself."""
SINT_COUNT = 16
VMBUS_MESSAGE_SINT = 2
PAGE_SIZE = 4096
MAX_GPA = 1 << 52
"""Regions end at or below 2**52 (the x86-64 architectural physical-address limit)."""
MAX_FILE_OFFSET = (1 << 63) - 1
"""offset + size must fit an off_t."""
MAX_EPOCH = (1 << 32) - 1
HANDSHAKE_TIMEOUT_S = 10.0
"""How long a peer has, from connect to its ``hello`` (and any admission check), before
it gets ``error`` ``timeout`` and a close. Read at call time, so a test may lower it."""
MAX_PENDING_HANDSHAKES_PER_UID = 8
"""Accepted connections of one peer uid that have not finished their handshake; the
next one from that uid gets ``error`` ``resource`` at once."""
FEATURE_SAVED_STATE = "saved-state"
"""Protocol 1.1 (docs/attach-protocol.md#restart): vmbusd hands the VMM a saved-state
blob (``state``) and the VMM gives it back on reconnect (``resume``), so vmbusd can
restart under a running guest. Both ends must name it in their ``hello``."""
MAX_RESUME_CHANNELS = (MAX_FDS_PER_MESSAGE - 2) // 2
"""Channels whose eventfds one ``resume`` can return (two fds each, after the blob
and in-flight fds); vmbusd gives any other open channel fresh eventfds (``bind``)."""
MAX_APPLIED = (1 << 32) - 1

_U64 = (1 << 64) - 1
_TOKEN = re.compile(r"[a-z0-9][a-z0-9._-]*")

Role = Literal["vmm", "vmbusd"]
ROLES: tuple[Role, Role] = ("vmm", "vmbusd")


class ErrorCode:
    """The ``code`` strings of ``error`` messages we send. Receivers accept any token."""

    PROTOCOL = "protocol"  # a malformed or unexpected message
    VERSION = "version"  # hello: unsupported major version
    ROLE = "role"  # hello: both ends claim the same role
    VM_ID = "vm-id"  # hello: not the VM this end expected
    DENIED = "denied"  # SO_PEERCRED uid not allowed
    RESOURCE = "resource"  # a well-formed request we cannot satisfy (bad memory fd, ...)
    TIMEOUT = "timeout"  # hello: not received within the handshake deadline
    INTERNAL = "internal"  # a bug on the sender's side
    SHUTDOWN = "shutdown"  # the sender is going away


# --------------------------------------------------------------------------- errors


class AttachError(Exception):
    """Base of everything this module raises on purpose."""


class AttachProtocolError(AttachError):
    """The peer broke the attach protocol; ``code`` is what to put in our ``error``."""

    def __init__(self, message: str, code: str = ErrorCode.PROTOCOL) -> None:
        super().__init__(message)
        self.code = code


class ConnectionClosed(AttachError):
    """The peer closed the connection (EOF, reset, or EPIPE on send)."""


class PeerError(AttachError):
    """The peer sent ``error`` (and is about to close) where we expected something else."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"peer error {code}: {message}")
        self.code = code
        self.message = message


# --------------------------------------------------------------------------- field checks
# Used both when we build a message (ValueError/TypeError: our bug) and when we
# decode one (converted into AttachProtocolError: the peer's bug).


def _int(name: str, v: object, lo: int, hi: int) -> None:
    # bool is an int subclass and msgpack has a real bool type: refuse it.
    if type(v) is not int:
        raise TypeError(f"{name} must be an int, not {type(v).__name__}")
    if not lo <= v <= hi:
        raise ValueError(f"{name}={v} out of range [{lo}, {hi}]")


def _str(name: str, v: object, max_len: int, *, token: bool = False, empty: bool = True) -> None:
    if type(v) is not str:
        raise TypeError(f"{name} must be a str, not {type(v).__name__}")
    if len(v) > max_len:
        raise ValueError(f"{name} longer than {max_len}")
    if not v and not empty:
        raise ValueError(f"{name} must not be empty")
    # Peer strings end up in log lines: no control characters, ever.
    if token and v and not _TOKEN.fullmatch(v):
        raise ValueError(f"{name} must match {_TOKEN.pattern}")
    if not v.isprintable():
        raise ValueError(f"{name} has non-printable characters")


def _fd(name: str, v: object) -> None:
    if type(v) is not int or v < 0:
        raise TypeError(f"{name} must be an fd (int >= 0)")


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class Hello:
    """The first message each way: who we are and what we speak."""

    T = "hello"
    version: int
    role: Role
    vm_id: str
    vcpus: int
    features: tuple[str, ...] = ()
    software: str = ""

    def __post_init__(self) -> None:
        _int("version", self.version, 0, 0xFFFF)
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}")
        _str("vm_id", self.vm_id, MAX_VM_ID_LEN)
        _int("vcpus", self.vcpus, 0, MAX_VCPUS)
        if isinstance(self.features, list):
            object.__setattr__(self, "features", tuple(self.features))
        if type(self.features) is not tuple:
            raise TypeError("features must be a list of str")
        if len(self.features) > MAX_FEATURES:
            raise ValueError(f"more than {MAX_FEATURES} features")
        for f in self.features:
            _str("feature", f, MAX_FEATURE_LEN, token=True, empty=False)
        _str("software", self.software, MAX_SOFTWARE_LEN)
        if self.role == "vmm":
            # The VMM is the authority on its VM; vmbusd may not know it yet.
            _str("vm_id", self.vm_id, MAX_VM_ID_LEN, empty=False)
            _int("vcpus", self.vcpus, 1, MAX_VCPUS)

    def fds(self) -> list[int]:
        return []


@dataclass(frozen=True, slots=True)
class MemoryRegion:
    """One guest RAM region: ``size`` bytes at ``gpa`` are ``fd`` from ``offset`` on."""

    gpa: int
    size: int
    fd: int
    offset: int

    def __post_init__(self) -> None:
        _int("gpa", self.gpa, 0, MAX_GPA - PAGE_SIZE)
        _int("size", self.size, PAGE_SIZE, MAX_GPA - self.gpa)
        _int("offset", self.offset, 0, MAX_FILE_OFFSET - self.size)
        for name in ("gpa", "size", "offset"):
            if getattr(self, name) % PAGE_SIZE:
                raise ValueError(f"region {name} not a multiple of {PAGE_SIZE}")
        _fd("fd", self.fd)


@dataclass(frozen=True, slots=True)
class MemoryRegions:
    """``memory``: regions of guest RAM to add (sent again on hot-plug)."""

    T = "memory"
    regions: tuple[MemoryRegion, ...]

    def __post_init__(self) -> None:
        if isinstance(self.regions, list):
            object.__setattr__(self, "regions", tuple(self.regions))
        if type(self.regions) is not tuple or not all(
            type(r) is MemoryRegion for r in self.regions
        ):
            raise TypeError("regions must be a list of MemoryRegion")
        if not 1 <= len(self.regions) <= MAX_REGIONS:
            raise ValueError(f"need 1..{MAX_REGIONS} regions")
        spans = sorted((r.gpa, r.gpa + r.size) for r in self.regions)
        for (_, end), (start, _) in itertools.pairwise(spans):
            if start < end:
                raise ValueError(f"regions overlap at gpa {start:#x}")

    def fds(self) -> list[int]:
        return [r.fd for r in self.regions]


@dataclass(frozen=True, slots=True)
class PostFromGuest:
    """``post`` VMM -> vmbusd: the guest's HvPostMessage on a connection id vmbusd owns."""

    T = "post"
    connection_id: int
    vcpu: int
    payload: bytes

    def __post_init__(self) -> None:
        _int("connection_id", self.connection_id, 0, CONNECTION_ID_MASK)
        if self.connection_id not in MESSAGE_CONNECTION_IDS:
            raise ValueError(f"connection_id {self.connection_id} is not 1 or 4")
        _int("vcpu", self.vcpu, 0, MAX_VCPUS - 1)
        _payload(self.payload)

    def fds(self) -> list[int]:
        return []


@dataclass(frozen=True, slots=True)
class PostToGuest:
    """``post`` vmbusd -> VMM: a message for the SINT slot of a vCPU's message page."""

    T = "post"
    vcpu: int
    payload: bytes
    sint: int = VMBUS_MESSAGE_SINT
    epoch: int = 0

    def __post_init__(self) -> None:
        _int("sint", self.sint, 0, SINT_COUNT - 1)
        _int("vcpu", self.vcpu, 0, MAX_VCPUS - 1)
        _payload(self.payload)
        _int("epoch", self.epoch, 0, MAX_EPOCH)

    def fds(self) -> list[int]:
        return []


def _payload(v: object) -> None:
    if type(v) is not bytes:
        raise TypeError("payload must be bytes (msgpack bin)")
    if len(v) > MAX_PAYLOAD:
        raise ValueError(f"payload longer than {MAX_PAYLOAD}")


@dataclass(frozen=True, slots=True)
class Bind:
    """``bind``: wire a channel's signals. kick: guest -> vmbusd; call: vmbusd -> guest."""

    T = "bind"
    relid: int
    connection_id: int
    vcpu: int
    kick: int
    call: int
    epoch: int = 0
    # Sessions below VMBus 2.4 (WIN7) signal the guest through its interrupt page, not
    # the SynIC event flags: its GPA (page-aligned), or 0 for the event-flags page.
    interrupt_page: int = 0

    def __post_init__(self) -> None:
        _int("relid", self.relid, 1, MAX_RELID)
        _int("connection_id", self.connection_id, MIN_CHANNEL_CONNECTION_ID, CONNECTION_ID_MASK)
        _int("vcpu", self.vcpu, 0, MAX_VCPUS - 1)
        _fd("kick", self.kick)
        _fd("call", self.call)
        if self.kick == self.call:
            raise ValueError("kick and call must be different eventfds")
        _int("epoch", self.epoch, 0, MAX_EPOCH)
        _int("interrupt_page", self.interrupt_page, 0, MAX_GPA - PAGE_SIZE)
        if self.interrupt_page % PAGE_SIZE:
            raise ValueError("interrupt_page must be page-aligned")

    def fds(self) -> list[int]:
        return [self.kick, self.call]


@dataclass(frozen=True, slots=True)
class Unbind:
    """``unbind``: the channel is closed; stop signalling and close both eventfds."""

    T = "unbind"
    relid: int
    epoch: int = 0

    def __post_init__(self) -> None:
        _int("relid", self.relid, 1, MAX_RELID)
        _int("epoch", self.epoch, 0, MAX_EPOCH)

    def fds(self) -> list[int]:
        return []


@dataclass(frozen=True, slots=True)
class Reset:
    """``reset``: the guest rebooted; ``epoch`` fences off vmbusd messages sent before."""

    T = "reset"
    epoch: int

    def __post_init__(self) -> None:
        _int("epoch", self.epoch, 1, MAX_EPOCH)

    def fds(self) -> list[int]:
        return []


@dataclass(frozen=True, slots=True)
class Error:
    """``error``: why the sender is about to close the connection."""

    T = "error"
    code: str
    message: str = ""

    def __post_init__(self) -> None:
        _str("code", self.code, MAX_ERROR_CODE_LEN, token=True, empty=False)
        _str("message", self.message, MAX_ERROR_MESSAGE_LEN)

    @classmethod
    def make(cls, code: str, message: object) -> Error:
        """Build an error from any text (an exception, say): cleaned and truncated."""
        text = "".join(c if c.isprintable() else " " for c in str(message))
        return cls(code, text[:MAX_ERROR_MESSAGE_LEN])

    def fds(self) -> list[int]:
        return []


@dataclass(frozen=True, slots=True)
class State:
    """``state`` vmbusd -> VMM (feature ``saved-state``): the saved-state blob to hold.

    ``blob`` is a sealed, read-only memfd holding it (docs: restart); ``posts``, how
    many of the VMM's ``post``s vmbusd has handled (the VMM may forget those); ``inflight``,
    the first time only, the session's in-flight region (a sealed memfd vmbusd
    writes). The VMM keeps the newest blob and the region, and gives both back in
    ``resume`` when it reconnects.
    """

    T = "state"
    blob: int
    posts: int = 0
    inflight: int | None = None

    def __post_init__(self) -> None:
        _fd("blob", self.blob)
        _int("posts", self.posts, 0, _U64)
        if self.inflight is not None:
            _fd("inflight", self.inflight)
            if self.inflight == self.blob:
                raise ValueError("blob and inflight must be different fds")

    def fds(self) -> list[int]:
        return [self.blob] if self.inflight is None else [self.blob, self.inflight]


@dataclass(frozen=True, slots=True)
class ResumeChannel:
    """One bound channel whose eventfds the VMM keeps using across the restart."""

    relid: int
    kick: int
    call: int

    def __post_init__(self) -> None:
        _int("relid", self.relid, 1, MAX_RELID)
        _fd("kick", self.kick)
        _fd("call", self.call)
        if self.kick == self.call:
            raise ValueError("kick and call must be different eventfds")


@dataclass(frozen=True, slots=True)
class Resume:
    """``resume`` VMM -> vmbusd (feature ``saved-state``): pick up where the last
    vmbusd left off. Sent once, after ``memory`` and before any ``post``.

    ``blob``/``inflight``: what the last ``state`` handed over; ``applied``: how
    many ``post``/``bind``/``unbind`` the VMM applied after that ``state``;
    ``posts``: how many ``post``s and ``reset``s the VMM has sent in all (its next
    is number ``posts``); ``channels``: the bindings the VMM kept, with their
    eventfds.
    """

    T = "resume"
    blob: int
    inflight: int
    applied: int
    posts: int
    channels: tuple[ResumeChannel, ...] = ()

    def __post_init__(self) -> None:
        _fd("blob", self.blob)
        _fd("inflight", self.inflight)
        _int("applied", self.applied, 0, MAX_APPLIED)
        _int("posts", self.posts, 0, _U64)
        if isinstance(self.channels, list):
            object.__setattr__(self, "channels", tuple(self.channels))
        if type(self.channels) is not tuple or not all(
            type(c) is ResumeChannel for c in self.channels
        ):
            raise TypeError("channels must be a list of ResumeChannel")
        if len(self.channels) > MAX_RESUME_CHANNELS:
            raise ValueError(f"more than {MAX_RESUME_CHANNELS} channels")
        relids = [c.relid for c in self.channels]
        if len(set(relids)) != len(relids):
            raise ValueError("a relid is listed twice")

    def fds(self) -> list[int]:
        return [self.blob, self.inflight] + [fd for c in self.channels for fd in (c.kick, c.call)]


Message = (
    Hello
    | MemoryRegions
    | PostFromGuest
    | PostToGuest
    | Bind
    | Unbind
    | Reset
    | Error
    | State
    | Resume
)

SENT_BY: dict[type, frozenset[str]] = {
    Hello: frozenset(ROLES),
    MemoryRegions: frozenset({"vmm"}),
    PostFromGuest: frozenset({"vmm"}),
    PostToGuest: frozenset({"vmbusd"}),
    Bind: frozenset({"vmbusd"}),
    Unbind: frozenset({"vmbusd"}),
    Reset: frozenset({"vmm"}),
    Error: frozenset(ROLES),
    State: frozenset({"vmbusd"}),
    Resume: frozenset({"vmm"}),
}
"""Which role may send each message type (the DESIGN.md table)."""


_TYPES = frozenset(str(getattr(cls, "T")) for cls in SENT_BY)  # noqa: B009


def close_fds(fds: list[int]) -> None:
    """Close fds we own, ignoring ones already gone: cleanup must not raise."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


# --------------------------------------------------------------------------- codec


def encode_message(msg: Message) -> tuple[bytes, list[int]]:
    """Return the datagram and the fds to attach (still owned by the caller)."""
    fds: list[int] = []

    def ref(fd: int) -> int:
        fds.append(fd)
        return len(fds) - 1

    body: dict[str, Any] = {"t": msg.T}
    if isinstance(msg, MemoryRegions):
        body["regions"] = [
            {"gpa": r.gpa, "size": r.size, "fd": ref(r.fd), "offset": r.offset} for r in msg.regions
        ]
    elif isinstance(msg, Bind):
        body.update(
            relid=msg.relid,
            connection_id=msg.connection_id,
            vcpu=msg.vcpu,
            kick=ref(msg.kick),
            call=ref(msg.call),
            epoch=msg.epoch,
        )
        if msg.interrupt_page:  # only pre-2.4 sessions carry it
            body["interrupt_page"] = msg.interrupt_page
    elif isinstance(msg, Hello):
        body.update({f.name: getattr(msg, f.name) for f in fields(msg)})
        body["features"] = list(msg.features)
    elif isinstance(msg, State):
        body["blob"] = ref(msg.blob)
        body["posts"] = msg.posts
        if msg.inflight is not None:
            body["inflight"] = ref(msg.inflight)
    elif isinstance(msg, Resume):
        body.update(
            blob=ref(msg.blob),
            inflight=ref(msg.inflight),
            applied=msg.applied,
            posts=msg.posts,
            channels=[
                {"relid": c.relid, "kick": ref(c.kick), "call": ref(c.call)} for c in msg.channels
            ],
        )
    elif isinstance(msg, Message):
        body.update({f.name: getattr(msg, f.name) for f in fields(msg)})
    else:
        raise TypeError(f"not an attach message: {msg!r}")
    data = msgpack.packb(body, use_bin_type=True)
    if len(data) > MAX_DATAGRAM:
        raise ValueError(f"encoded message is {len(data)} bytes, more than {MAX_DATAGRAM}")
    if len(fds) > MAX_FDS_PER_MESSAGE:
        raise ValueError(f"more than {MAX_FDS_PER_MESSAGE} fds")
    return data, fds


def decode_message(
    data: bytes, fds: list[int], *, sender: Role | None = None, vcpus: int | None = None
) -> Message:
    """Parse one datagram. On success the message owns ``fds``; on error they are closed.

    ``sender``, when known, is the peer's role: a message that role may not send
    is rejected too. ``vcpus``, when known, is the VM's vCPU count (the VMM's
    ``hello``): a message naming a vCPU at or above it is rejected.
    """
    try:
        msg = _decode(data, fds)
        if sender is not None and sender not in SENT_BY[type(msg)]:
            raise AttachProtocolError(f"{msg.T!r} may not be sent by {sender}")
        vcpu = getattr(msg, "vcpu", None)
        if vcpus is not None and vcpu is not None and vcpu >= vcpus:
            raise AttachProtocolError(f"{msg.T!r}: vcpu {vcpu} but the VM has {vcpus} vCPUs")
        return msg
    except BaseException:
        close_fds(fds)
        raise


def _decode(data: bytes, fds: list[int]) -> Message:
    if len(data) > MAX_DATAGRAM:
        raise AttachProtocolError(f"datagram of {len(data)} bytes, more than {MAX_DATAGRAM}")
    if len(fds) > MAX_FDS_PER_MESSAGE:
        raise AttachProtocolError(f"{len(fds)} fds, more than {MAX_FDS_PER_MESSAGE}")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except Exception as e:  # msgpack raises a zoo of types for bad input
        raise AttachProtocolError(f"not msgpack: {type(e).__name__}: {str(e)[:80]}") from None
    if type(obj) is not dict:
        raise AttachProtocolError("datagram is not a msgpack map")
    t = obj.get("t")
    if type(t) is not str:
        raise AttachProtocolError("message has no string 't'")
    if t not in _TYPES:
        raise AttachProtocolError(f"unknown message type {t[:32]!r}")
    used: set[int] = set()

    def get(key: str) -> Any:
        try:
            return obj[key]
        except KeyError:
            raise AttachProtocolError(f"{t!r}: missing field {key!r}") from None

    def fd_at(where: dict[str, Any], key: str) -> int:
        idx = where.get(key) if type(where) is dict else None
        if type(idx) is not int or not 0 <= idx < len(fds):
            raise AttachProtocolError(f"{t!r}: {key} is not an index into the {len(fds)} fds")
        if idx in used:
            raise AttachProtocolError(f"{t!r}: fd index {idx} used twice")
        used.add(idx)
        return fds[idx]

    try:
        msg: Message
        if t == "hello":
            features = get("features")
            if type(features) is not list:
                raise TypeError("features must be a list")
            msg = Hello(
                version=get("version"),
                role=get("role"),
                vm_id=get("vm_id"),
                vcpus=get("vcpus"),
                features=tuple(features),
                software=get("software"),
            )
        elif t == "memory":
            regions = get("regions")
            if type(regions) is not list or not 1 <= len(regions) <= MAX_REGIONS:
                raise ValueError(f"regions must be a list of 1..{MAX_REGIONS} maps")
            out = []
            for r in regions:
                if type(r) is not dict:
                    raise TypeError("a region must be a map")
                for key in ("gpa", "size", "offset"):
                    if key not in r:
                        raise ValueError(f"region missing {key!r}")
                out.append(MemoryRegion(r["gpa"], r["size"], fd_at(r, "fd"), r["offset"]))
            msg = MemoryRegions(tuple(out))
        elif t == "post":
            if ("connection_id" in obj) == ("sint" in obj):
                raise ValueError("post needs exactly one of connection_id (to vmbusd) or sint")
            if "connection_id" in obj:
                msg = PostFromGuest(get("connection_id"), get("vcpu"), get("payload"))
            else:
                msg = PostToGuest(
                    vcpu=get("vcpu"), payload=get("payload"), sint=get("sint"), epoch=get("epoch")
                )
        elif t == "bind":
            msg = Bind(
                relid=get("relid"),
                connection_id=get("connection_id"),
                vcpu=get("vcpu"),
                kick=fd_at(obj, "kick"),
                call=fd_at(obj, "call"),
                epoch=get("epoch"),
                interrupt_page=obj.get("interrupt_page", 0),
            )
        elif t == "unbind":
            msg = Unbind(get("relid"), get("epoch"))
        elif t == "reset":
            msg = Reset(get("epoch"))
        elif t == "state":
            msg = State(
                fd_at(obj, "blob"),
                get("posts"),
                fd_at(obj, "inflight") if "inflight" in obj else None,
            )
        elif t == "resume":
            chans = get("channels")
            if type(chans) is not list or len(chans) > MAX_RESUME_CHANNELS:
                raise ValueError(f"channels must be a list of at most {MAX_RESUME_CHANNELS} maps")
            got = []
            for c in chans:
                if type(c) is not dict or "relid" not in c:
                    raise TypeError("a channel must be a map with a relid")
                got.append(ResumeChannel(c["relid"], fd_at(c, "kick"), fd_at(c, "call")))
            msg = Resume(
                blob=fd_at(obj, "blob"),
                inflight=fd_at(obj, "inflight"),
                applied=get("applied"),
                posts=get("posts"),
                channels=tuple(got),
            )
        else:
            msg = Error(get("code"), get("message"))
    except (TypeError, ValueError) as e:
        raise AttachProtocolError(f"{t!r}: {e}") from None
    if len(used) != len(fds):
        raise AttachProtocolError(f"{t!r}: {len(fds) - len(used)} fds attached but not used")
    return msg


# --------------------------------------------------------------------------- transport

_ANCBUF = _stdsocket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * array.array("i").itemsize)
_SEND_ERROR_TIMEOUT = 1.0
"""How long a farewell ``error`` may take to send before we close anyway."""
_DISCARD_LIMIT = 256
"""Unread datagrams dropped before a close (see ``AttachConnection._discard_unread``)."""


class AttachConnection:
    """One attach session's socket: whole messages in and out, fds by SCM_RIGHTS.

    Sends are serialised by a lock (so any task may send); only one task may
    receive at a time, since two readers would split the message stream.
    """

    def __init__(self, sock: trio.socket.SocketType, *, peer_role: Role | None = None) -> None:
        if sock.family != _stdsocket.AF_UNIX or sock.type != _stdsocket.SOCK_SEQPACKET:
            raise ValueError("attach connections are AF_UNIX SOCK_SEQPACKET")
        self.socket = sock
        self.peer_role: Role | None = peer_role
        """Set by ``handshake``; from then on ``receive`` enforces message direction."""
        self.vcpus: int | None = None
        """The VM's vCPU count, set by ``handshake``; ``receive`` refuses higher vCPUs."""
        self.handshake_timeout: float | None = None
        """Deadline for ``handshake`` (None: ``HANDSHAKE_TIMEOUT_S``); set by ``Listener``."""
        self.admit: Callable[[Hello], str | None] | None = None
        """Called by ``handshake`` with the peer's good ``hello``: a reason to refuse the
        peer (sent as ``error`` ``resource``), or None. Set by whoever accepts."""
        self.peer_sent_error = False
        """The peer sent ``error``: it is closing, and per protocol gets none back."""
        self._on_handshake_done: Callable[[], None] | None = None  # Listener's pending count
        self._send_lock = trio.Lock()
        self._receiving = False

    async def send(self, msg: Message) -> None:
        """Send one message; its fds stay ours (the kernel dups them for the peer)."""
        data, fds = encode_message(msg)
        anc = []
        if fds:
            anc = [(_stdsocket.SOL_SOCKET, _stdsocket.SCM_RIGHTS, array.array("i", fds))]
        async with self._send_lock:
            try:
                n = await self.socket.sendmsg([data], anc, _stdsocket.MSG_NOSIGNAL)
            except (BrokenPipeError, ConnectionResetError) as e:
                raise ConnectionClosed(f"peer went away: {e}") from None
        if n != len(data):  # cannot happen on SEQPACKET; never send half a message silently
            raise AttachError(f"short send: {n} of {len(data)} bytes")

    async def receive(self) -> Message:
        """Receive one message. Raises ConnectionClosed on EOF, AttachProtocolError
        (with every fd that came along closed) on a bad datagram."""
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving")
        self._receiving = True
        try:
            try:
                data, anc, flags, _ = await self.socket.recvmsg(
                    MAX_DATAGRAM + 1, _ANCBUF, _stdsocket.MSG_CMSG_CLOEXEC
                )
            except ConnectionResetError:
                raise ConnectionClosed("connection reset by peer") from None
        finally:
            self._receiving = False
        fds: list[int] = []
        bad_cmsg = False
        for level, kind, cdata in anc:
            if level == _stdsocket.SOL_SOCKET and kind == _stdsocket.SCM_RIGHTS:
                fds.extend(array.array("i", cdata[: len(cdata) - len(cdata) % 4]))
            else:
                bad_cmsg = True
        try:
            if not data and not anc:
                raise ConnectionClosed("peer closed the connection")
            if flags & _stdsocket.MSG_TRUNC or len(data) > MAX_DATAGRAM:
                raise AttachProtocolError(f"datagram longer than {MAX_DATAGRAM} bytes")
            if flags & _stdsocket.MSG_CTRUNC:
                raise AttachProtocolError(f"more than {MAX_FDS_PER_MESSAGE} fds attached")
            if bad_cmsg:
                raise AttachProtocolError("unexpected control message")
        except AttachError as e:
            close_fds(fds)
            if isinstance(e, AttachProtocolError):
                log.warning("attach: rejected datagram from %s: %s", self._who(), e)
            raise
        try:
            msg = decode_message(data, fds, sender=self.peer_role, vcpus=self.vcpus)
        except AttachProtocolError as e:
            log.warning("attach: rejected message from %s: %s", self._who(), e)
            raise
        if isinstance(msg, Error):
            self.peer_sent_error = True
        return msg

    def peer_credentials(self) -> tuple[int, int, int]:
        """(pid, uid, gid) of the peer process as the kernel saw it at connect()."""
        fmt = "3i"
        raw = self.socket.getsockopt(
            _stdsocket.SOL_SOCKET, _stdsocket.SO_PEERCRED, struct.calcsize(fmt)
        )
        pid, uid, gid = struct.unpack(fmt, raw)
        return pid, uid, gid

    async def abort(self, code: str, message: object, *, quiet: bool = False) -> None:
        """Send ``error`` (best effort, bounded in time), then close.

        quiet: the reason was logged already (a rejected message), so the close is
        logged at debug level: one line per rejection. A peer that sent ``error``
        itself gets nothing back (neither side answers an ``error``): just the close.
        """
        level = logging.DEBUG if quiet else logging.WARNING
        if code == ErrorCode.SHUTDOWN and not quiet:  # a planned detach (SIGTERM) is routine
            level = logging.INFO
        log.log(
            level,
            "attach: closing connection to %s: %s: %s",
            self._who(),
            code,
            message,
        )
        if self.peer_sent_error:
            await self.aclose()
            return
        with trio.move_on_after(_SEND_ERROR_TIMEOUT):
            try:
                await self.send(Error.make(code, message))
            except (AttachError, OSError, trio.ClosedResourceError):
                pass
        self._discard_unread()
        await self.aclose()

    def _discard_unread(self) -> None:
        """Drop what the peer sent that we will never read, closing its fds.

        Closing an AF_UNIX socket with unread data makes the peer's next recv fail
        with ECONNRESET before it sees the ``error`` queued for it: the farewell
        would be lost exactly when it matters (a peer refused before its hello was
        read). Bounded: at most ``_DISCARD_LIMIT`` datagrams, never waiting.
        """
        fd = self.socket.fileno()
        if fd < 0:  # already closed
            return
        raw = _stdsocket.socket(fileno=fd)
        try:
            for _ in range(_DISCARD_LIMIT):
                try:
                    data, anc, _, _ = raw.recvmsg(
                        MAX_DATAGRAM + 1,
                        _ANCBUF,
                        _stdsocket.MSG_DONTWAIT | _stdsocket.MSG_CMSG_CLOEXEC,
                    )
                except OSError:  # nothing left (EAGAIN), or the peer is gone
                    return
                for level, kind, cdata in anc:
                    if level == _stdsocket.SOL_SOCKET and kind == _stdsocket.SCM_RIGHTS:
                        close_fds(list(array.array("i", cdata[: len(cdata) - len(cdata) % 4])))
                if not data and not anc:  # EOF
                    return
        finally:
            raw.detach()  # the fd stays the trio socket's

    async def aclose(self) -> None:
        self.socket.close()
        self._handshake_finished()
        await trio.lowlevel.checkpoint()

    def _handshake_finished(self) -> None:
        """Give back the Listener's pending-handshake slot (once)."""
        done, self._on_handshake_done = self._on_handshake_done, None
        if done is not None:
            done()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _who(self) -> str:
        try:
            pid, uid, _ = self.peer_credentials()
        except (OSError, trio.ClosedResourceError):
            return "a closed peer"
        return f"pid {pid} uid {uid}"


async def connect(path: str | os.PathLike[str]) -> AttachConnection:
    """Connect to a listening attach socket (a VMM's, or ``vmbusd serve``'s)."""
    sock = trio.socket.socket(_stdsocket.AF_UNIX, _stdsocket.SOCK_SEQPACKET)
    try:
        await sock.connect(os.fspath(path))
    except BaseException:
        sock.close()
        raise
    return AttachConnection(sock)


class Listener:
    """A listening attach socket; ``accept`` hands out only peers whose uid is allowed,
    each with a handshake deadline, and at most ``max_pending_per_uid`` unfinished
    handshakes per uid (so silent connections cannot pile up)."""

    def __init__(
        self,
        sock: trio.socket.SocketType,
        path: str,
        allowed_uids: set[int],
        *,
        handshake_timeout: float | None = None,
        max_pending_per_uid: int = MAX_PENDING_HANDSHAKES_PER_UID,
    ) -> None:
        self.socket = sock
        self.path = path
        self.allowed_uids = frozenset(allowed_uids)
        self.handshake_timeout = handshake_timeout
        self.max_pending_per_uid = max_pending_per_uid
        self.pending: dict[int, int] = {}
        """uid -> accepted connections whose handshake has not finished."""
        st = os.stat(path)
        self._ident = (st.st_dev, st.st_ino)

    async def accept(self) -> AttachConnection:
        """Wait for an allowed peer. Others get ``error`` ``denied``, a close and a log
        line; a uid with too many unfinished handshakes gets ``error`` ``resource``."""
        while True:
            sock, _ = await self.socket.accept()
            conn = AttachConnection(sock)
            try:
                pid, uid, _ = conn.peer_credentials()
            except OSError as e:  # the peer is already gone
                log.warning("attach: dropped a peer whose credentials are unreadable: %s", e)
                await conn.aclose()
                continue
            if uid not in self.allowed_uids:
                await conn.abort(ErrorCode.DENIED, f"uid {uid} (pid {pid}) is not allowed")
                continue
            waiting = self.pending.get(uid, 0)
            if waiting >= self.max_pending_per_uid:
                await conn.abort(
                    ErrorCode.RESOURCE,
                    f"uid {uid} already has {waiting} unfinished attach handshakes",
                )
                continue
            self.pending[uid] = waiting + 1
            conn.handshake_timeout = self.handshake_timeout
            conn._on_handshake_done = lambda uid=uid: self._release(uid)
            return conn

    def _release(self, uid: int) -> None:
        left = self.pending.get(uid, 0) - 1
        if left > 0:
            self.pending[uid] = left
        else:
            self.pending.pop(uid, None)

    async def aclose(self) -> None:
        """Close and remove our socket file (only if it is still ours)."""
        self.socket.close()
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._ident:
                os.unlink(self.path)
        except OSError:
            pass
        await trio.lowlevel.checkpoint()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _remove_stale_socket(path: str) -> None:
    """Unlink ``path`` if it is a socket nobody listens on; refuse anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(f"{path} exists and is not a socket")
    probe = _stdsocket.socket(_stdsocket.AF_UNIX, _stdsocket.SOCK_SEQPACKET)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        log.info("attach: removed stale socket %s", path)
        return
    finally:
        probe.close()
    raise OSError(f"{path} is in use by a listening process")


async def listen(
    path: str | os.PathLike[str],
    allowed_uids: set[int] | None = None,
    *,
    backlog: int = 16,
    handshake_timeout: float | None = None,
    max_pending_per_uid: int = MAX_PENDING_HANDSHAKES_PER_UID,
) -> Listener:
    """Create the attach socket file, mode 0600 from the start.

    The mode is set with fchmod on the unbound socket: Linux creates the file with
    the socket inode's mode (minus umask), so it is never wider than 0600 -- and we
    do not touch the process-wide umask.
    """
    path = os.fspath(path)
    allowed = {os.getuid()} if allowed_uids is None else set(allowed_uids)
    _remove_stale_socket(path)
    raw = _stdsocket.socket(_stdsocket.AF_UNIX, _stdsocket.SOCK_SEQPACKET)
    try:
        os.fchmod(raw.fileno(), 0o600)
        raw.bind(path)
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if mode & 0o177:
            os.unlink(path)
            raise PermissionError(f"{path} came out mode {mode:o}, not 0600")
        raw.listen(backlog)
    except BaseException:
        raw.close()
        raise
    return Listener(
        trio.socket.from_stdlib_socket(raw),
        path,
        allowed,
        handshake_timeout=handshake_timeout,
        max_pending_per_uid=max_pending_per_uid,
    )


async def handshake(conn: AttachConnection, hello: Hello, *, timeout: float | None = None) -> Hello:
    """Exchange ``hello``s (either side): send ours, check theirs, return theirs.

    On a mismatch the peer gets ``error``, the connection is closed and
    AttachProtocolError is raised; a peer's own ``error`` raises PeerError. The
    whole exchange has a deadline (``timeout``, else ``conn.handshake_timeout``,
    else ``HANDSHAKE_TIMEOUT_S``): a peer that stays silent gets ``error``
    ``timeout``. ``conn.admit``, when set, may still refuse a good peer
    (``error`` ``resource``), e.g. because the service is full.
    """
    if timeout is None:
        timeout = conn.handshake_timeout
    if timeout is None:
        timeout = HANDSHAKE_TIMEOUT_S
    try:
        return await _handshake(conn, hello, timeout)
    finally:
        conn._handshake_finished()


async def _handshake(conn: AttachConnection, hello: Hello, timeout: float) -> Hello:
    msg: Message | None = None
    bad: AttachProtocolError | None = None
    with trio.move_on_after(timeout):
        await conn.send(hello)
        try:
            msg = await conn.receive()
        except AttachProtocolError as e:
            bad = e
    if bad is not None:  # a malformed datagram (its fds are closed already)
        await conn.abort(bad.code, bad)
        raise bad
    if msg is None:
        problem = AttachProtocolError(f"no hello within {timeout:g} s", ErrorCode.TIMEOUT)
        await conn.abort(problem.code, problem)
        raise problem
    if isinstance(msg, Error):
        await conn.aclose()
        raise PeerError(msg.code, msg.message)
    if not isinstance(msg, Hello):
        close_fds(msg.fds())  # whatever it carried: the message is rejected
        problem = AttachProtocolError(f"expected hello, got {msg.T!r}")
    elif msg.version != hello.version:
        problem = AttachProtocolError(
            f"version {msg.version} not supported (we speak {hello.version})", ErrorCode.VERSION
        )
    elif msg.role == hello.role:
        problem = AttachProtocolError(f"both ends are {msg.role!r}", ErrorCode.ROLE)
    elif msg.vm_id and hello.vm_id and msg.vm_id != hello.vm_id:
        problem = AttachProtocolError(
            f"peer is VM {msg.vm_id!r}, expected {hello.vm_id!r}", ErrorCode.VM_ID
        )
    else:
        refusal = conn.admit(msg) if conn.admit is not None else None
        if refusal is None:
            conn.peer_role = msg.role
            conn.vcpus = (msg if msg.role == "vmm" else hello).vcpus
            return msg
        problem = AttachProtocolError(refusal, ErrorCode.RESOURCE)
    await conn.abort(problem.code, problem)
    raise problem


def negotiated_features(ours: Hello, theirs: Hello) -> frozenset[str]:
    """The features both ends named: the only ones either may use."""
    return frozenset(ours.features) & frozenset(theirs.features)


RECONNECT_FIRST_DELAY_S = 0.02  # a VMM's backoff between connection attempts: doubles...
RECONNECT_MAX_DELAY_S = 0.5  # ...up to this
NO_SAVED_STATE = "vmbusd came back without saved-state support"


async def reconnect_with_backoff(
    connect: Callable[[], Awaitable[AttachConnection]],
    take_over: Callable[[AttachConnection], Awaitable[bool]],
    timeout: float,
) -> tuple[str | None, bool]:
    """A VMM whose vmbusd went away: connect again (backoff) until `timeout`, and let
    `take_over` say hello and resume (False: vmbusd came back without saved-state
    support; it has aborted the connection). Returns (None, False) when resumed, else
    (why, whether vmbusd simply did not come back). The simulated VM and the KVM VMM
    share it."""
    deadline = trio.current_time() + timeout
    delay = RECONNECT_FIRST_DELAY_S
    last = "no attempt"
    while True:
        conn: AttachConnection | None = None
        try:
            with trio.fail_after(max(0.05, deadline - trio.current_time())):
                conn = await connect()
                if not await take_over(conn):
                    return NO_SAVED_STATE, False
            return None, False
        except PeerError as exc:
            last = str(exc)
            if exc.code == "saved-state":  # vmbusd will not take our state: final
                return f"vmbusd refused the resume: {exc.message}", False
        except (OSError, AttachError, trio.TooSlowError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.aclose()
        left = deadline - trio.current_time()
        if left <= 0:
            return f"vmbusd did not come back within {timeout:g} s (last: {last})", True
        await trio.sleep(min(delay, left))
        delay = min(delay * 2, RECONNECT_MAX_DELAY_S)
