"""The VSTOR protocol (storvsc over VMBus), sans-IO: bytes in, events and bytes out.

Layouts and rules from ../shared/spec/storvsc.md sections 1-10 and its errata
(section 14), checked against Linux 6.1 `drivers/scsi/storvsc_drv.c`:

- every packet is a `vstor_packet`: u32 operation, u32 flags, u32 NTSTATUS, then a
  52-byte union; 64 bytes in all from protocol 5.1 (WIN8) on, 48 before (the
  `vmscsi_request` loses its 16-byte WIN8 extension: Linux's old
  `vmscsi_size_delta`). Linux 6.1 always sends 64 bytes, init included.
- init, one packet at a time on the primary channel: BEGIN_INITIALIZATION,
  QUERY_PROTOCOL_VERSION (Linux 6.1 proposes 0x0602, 0x0600, 0x0501; we also take
  the pre-WIN8 0x0402 and 0x0200 that older guests propose and refuse everything
  else with REVISION_MISMATCH, as Hyper-V does), QUERY_PROPERTIES,
  END_INITIALIZATION, then CREATE_SUB_CHANNELS (once per primary open).
- EXECUTE_SRB carries a `vmscsi_request`; the data buffer, if any, is described
  by the GPA-direct ranges of the VMBus packet (the VSP checks those and hands us
  their total length).

`VstorProtocol` holds one controller's negotiated state. `receive()` copies the
guest's packet once, validates the copy and returns an event (`Reply`,
`ExecuteSrb`, `CreateSubChannels`); anything the protocol refuses raises
`vmbus.device.GuestError` with the NTSTATUS to answer (`failure_reply` builds
that answer), or without one when the packet cannot be answered at all (the VSP
resets the channel). Completions are built by `complete_srb` / `srb_failure`.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass
from enum import IntEnum

from vmbus.device import guest_error

SCSI_IF_TYPE = uuid.UUID("ba6163d9-04a1-4d29-b605-72e2ffb1dc7f")
"""The synthetic SCSI controller's interface GUID (spec 1.1)."""

# --- operations, versions, statuses --------------------------------------------------


class VstorOp(IntEnum):
    """`enum vstor_packet_operation` (spec 3.1)."""

    COMPLETE_IO = 1
    REMOVE_DEVICE = 2
    EXECUTE_SRB = 3
    RESET_LUN = 4
    RESET_ADAPTER = 5
    RESET_BUS = 6
    BEGIN_INITIALIZATION = 7
    END_INITIALIZATION = 8
    QUERY_PROTOCOL_VERSION = 9
    QUERY_PROPERTIES = 10
    ENUMERATE_BUS = 11
    FCHBA_DATA = 12
    CREATE_SUB_CHANNELS = 13


VERSION_WIN6 = 0x0200
VERSION_WIN7 = 0x0402
VERSION_WIN8 = 0x0501
VERSION_WIN8_1 = 0x0600
VERSION_WIN10 = 0x0602

LINUX_VERSIONS = (VERSION_WIN10, VERSION_WIN8_1, VERSION_WIN8)
"""What Linux 6.1 proposes, newest first (`protocol_version[]`)."""

SUPPORTED_VERSIONS = frozenset((*LINUX_VERSIONS, VERSION_WIN7, VERSION_WIN6))


class NtStatus(IntEnum):
    """The NTSTATUS values the VSP answers with (spec 3.2)."""

    SUCCESS = 0x00000000
    BUFFER_OVERFLOW = 0x80000005
    DEVICE_BUSY = 0x80000011
    UNSUCCESSFUL = 0xC0000001
    INVALID_PARAMETER = 0xC000000D
    INVALID_DEVICE_REQUEST = 0xC0000010
    REVISION_MISMATCH = 0xC0000059
    DEVICE_NOT_CONNECTED = 0xC000009D
    IO_TIMEOUT = 0xC00000B5
    DEVICE_DOES_NOT_EXIST = 0xC00000C0
    CANCELLED = 0xC0000120
    INVALID_DEVICE_STATE = 0xC0000184
    IO_DEVICE_ERROR = 0xC0000185


class SrbStatus(IntEnum):
    """SRB status codes (low 6 bits of srb_status, spec 4.2)."""

    PENDING = 0x00
    SUCCESS = 0x01
    ABORTED = 0x02
    ERROR = 0x04
    BUSY = 0x05
    INVALID_REQUEST = 0x06
    INVALID_PATH_ID = 0x07
    NO_DEVICE = 0x08
    DATA_OVERRUN = 0x12
    INVALID_LUN = 0x20
    INVALID_TARGET_ID = 0x21


SRB_QUEUE_FROZEN = 0x40
SRB_AUTOSENSE_VALID = 0x80

_SRB_NTSTATUS = {
    SrbStatus.SUCCESS: NtStatus.SUCCESS,
    SrbStatus.DATA_OVERRUN: NtStatus.BUFFER_OVERFLOW,
    SrbStatus.BUSY: NtStatus.DEVICE_BUSY,
    SrbStatus.ABORTED: NtStatus.CANCELLED,
    SrbStatus.INVALID_LUN: NtStatus.DEVICE_DOES_NOT_EXIST,
    SrbStatus.INVALID_TARGET_ID: NtStatus.DEVICE_DOES_NOT_EXIST,
    SrbStatus.NO_DEVICE: NtStatus.DEVICE_DOES_NOT_EXIST,
}


class DataIn(IntEnum):
    """vmscsi_request.data_in: the direction, seen from the guest."""

    WRITE = 0  # guest -> device (SCSI_IOCTL_DATA_OUT)
    READ = 1  # device -> guest
    NONE = 2  # UNKNOWN_TYPE: no data


REQUEST_COMPLETION_FLAG = 0x1
STORAGE_CHANNEL_SUPPORTS_MULTI_CHANNEL = 0x1

# Linux 6.1's transaction ids for its init/reset packets (include/linux/hyperv.h).
VMBUS_RQST_INIT = 0xFFFFFFFFFFFFFFFD
VMBUS_RQST_RESET = 0xFFFFFFFFFFFFFFFC

SCSI_STATUS_GOOD = 0x00
SCSI_STATUS_CHECK_CONDITION = 0x02
SENSE_KEY_ILLEGAL_REQUEST = 0x05

# --- sizes ---------------------------------------------------------------------------

HEADER_SIZE = 12  # operation, flags, status
PACKET_SIZE = 0x40  # vstor_packet, WIN8 and later
PACKET_SIZE_PRE_WIN8 = 0x30
SRB_SIZE = 0x34  # vmscsi_request with the WIN8 extension
SRB_SIZE_PRE_WIN8 = 0x24
SENSE_BUFFER_SIZE = 0x14  # POST_WIN7_STORVSC_SENSE_BUFFER_SIZE
SENSE_BUFFER_SIZE_PRE_WIN8 = 0x12
MAX_CDB_LEN = 16  # Linux max_cmd_len; the union holds 16 CDB bytes
PROPERTIES_SIZE = 24
MAX_SUB_CHANNELS = 0xFFFF  # sub_channel_count is a u16
MAX_TRANSFER_MIN = 4096

_HDR = struct.Struct("<III")
# vmscsi_request without the WIN8 extension: length, srb_status, scsi_status, port,
# path, target, lun, cdb_length, sense_info_length, data_in, reserved,
# data_transfer_length, cdb/sense[20]
_SRB = struct.Struct("<HBBBBBBBBBBI20s")
_SRB_EXT = struct.Struct(
    "<HBBIII"
)  # reserve, queue_tag, queue_action, srb_flags, timeout, sort key
_VERSION = struct.Struct("<HH")
_PROPS = struct.Struct("<IHHIIQ")
_SUBCH = struct.Struct("<H")
assert _SRB.size == SRB_SIZE_PRE_WIN8 and _SRB.size + _SRB_EXT.size == SRB_SIZE
assert _PROPS.size == PROPERTIES_SIZE


def packet_size(version: int) -> int:
    """The vstor_packet size for a negotiated protocol version."""
    return PACKET_SIZE if version >= VERSION_WIN8 else PACKET_SIZE_PRE_WIN8


def sense_buffer_size(version: int) -> int:
    return SENSE_BUFFER_SIZE if version >= VERSION_WIN8 else SENSE_BUFFER_SIZE_PRE_WIN8


def build_packet(
    op: int, body: bytes = b"", *, flags: int = 0, status: int = 0, size: int = 64
) -> bytes:
    """A vstor_packet of `size` bytes: header, body, zero padding (body cut to fit)."""
    out = bytearray(size)
    _HDR.pack_into(out, 0, op, flags, status)
    body = body[: size - HEADER_SIZE]
    out[HEADER_SIZE : HEADER_SIZE + len(body)] = body
    return bytes(out)


# --- the SRB -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Srb:
    """A validated copy of one EXECUTE_SRB's vmscsi_request."""

    port: int
    path_id: int
    target_id: int
    lun: int
    cdb: bytes  # exactly cdb_length bytes
    sense_info_length: int  # what the guest offered, capped by the sense buffer
    data_in: DataIn
    data_transfer_length: int
    srb_flags: int = 0
    time_out_value: int = 0


def encode_srb(
    *,
    path_id: int = 0,
    target_id: int = 0,
    lun: int = 0,
    cdb: bytes = b"",
    data_in: int = DataIn.NONE,
    data_transfer_length: int = 0,
    port: int = 0,
    sense_info_length: int = SENSE_BUFFER_SIZE,
    cdb_length: int | None = None,
    srb_flags: int = 0,
    time_out_value: int = 60,
    queue_tag: int = 0,
    queue_action: int = 0,
    length: int = SRB_SIZE,
    win8: bool = True,
) -> bytes:
    """A vmscsi_request as a guest builds one (what Linux 6.1's queuecommand fills in)."""
    base = _SRB.pack(
        length,
        0,
        0,
        port,
        path_id,
        target_id,
        lun,
        len(cdb) if cdb_length is None else cdb_length,
        sense_info_length,
        data_in,
        0,
        data_transfer_length,
        cdb[:20],
    )
    if not win8:
        return base
    return base + _SRB_EXT.pack(0, queue_tag, queue_action, srb_flags, time_out_value, 0)


@dataclass(frozen=True, slots=True)
class SrbReply:
    """The fields of a completed SRB a guest reads (the VSC's view)."""

    status: int  # NTSTATUS
    srb_status: int
    scsi_status: int
    sense_info_length: int
    data_transfer_length: int
    sense: bytes

    @property
    def success(self) -> bool:
        return self.srb_status == SrbStatus.SUCCESS and self.scsi_status == SCSI_STATUS_GOOD


def decode_srb_reply(payload: bytes) -> tuple[int, SrbReply]:
    """(operation, reply fields) of a completion payload; ValueError if too short.

    Like Linux 6.1, the sense length is clamped to the sense buffer."""
    if len(payload) < HEADER_SIZE + SRB_SIZE_PRE_WIN8:
        raise ValueError(f"a {len(payload)}-byte vstor packet holds no vmscsi_request")
    op, _flags, status = _HDR.unpack_from(payload, 0)
    (_len, srb_status, scsi_status, _p, _pa, _t, _l, _cl, sense_len, _di, _r, dtl, area) = (
        _SRB.unpack_from(payload, HEADER_SIZE)
    )
    sense_len = min(sense_len, SENSE_BUFFER_SIZE)
    return op, SrbReply(status, srb_status, scsi_status, sense_len, dtl, area[:sense_len])


# --- events --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    """Answer the request now with this completion payload."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class ExecuteSrb:
    """Run a SCSI command; answer with `complete_srb` (or `srb_failure`)."""

    srb: Srb


@dataclass(frozen=True, slots=True)
class CreateSubChannels:
    """Make `count` sub-channels exist, then answer with `subchannels_created`."""

    count: int


Event = Reply | ExecuteSrb | CreateSubChannels


class VstorState(IntEnum):
    """The host state machine (spec 6, OpenVMM's model)."""

    BEGIN = 0
    QUERY_VERSION = 1
    QUERY_PROPERTIES = 2
    END_INIT = 3
    READY = 4


class VstorProtocol:
    """One SCSI controller's VSTOR state: what the guest negotiated on the primary.

    `max_sub_channels` is advertised in QUERY_PROPERTIES (with the multi-channel
    flag when non-zero and the version is 5.1 or later); `max_transfer_bytes` too,
    and an SRB moving more is refused.
    """

    def __init__(
        self,
        *,
        max_sub_channels: int = 0,
        max_transfer_bytes: int = 0x40000,
        versions: frozenset[int] = SUPPORTED_VERSIONS,
    ) -> None:
        if not 0 <= max_sub_channels <= MAX_SUB_CHANNELS:
            raise ValueError(f"max_sub_channels must be 0..{MAX_SUB_CHANNELS}")
        if max_transfer_bytes < MAX_TRANSFER_MIN or max_transfer_bytes % 4096:
            raise ValueError("max_transfer_bytes must be a positive multiple of 4096")
        if max_transfer_bytes > 0xFFFFFFFF:
            raise ValueError("max_transfer_bytes must fit in 32 bits")
        self.max_sub_channels = max_sub_channels
        self.max_transfer_bytes = max_transfer_bytes
        self.versions = versions
        self.reset()

    def reset(self) -> None:
        """Forget the negotiation: a new primary open, or a new guest session."""
        self.state = VstorState.BEGIN
        self.version: int | None = None
        self.sub_channels_requested: int | None = None
        self._reply_size = PACKET_SIZE
        self._last_op = 0
        self._last_sense_len = SENSE_BUFFER_SIZE

    # -- restart (docs/attach-protocol.md, "Restart") --

    def save(self) -> list[int]:
        """What the guest negotiated, as plain integers (a saved state, a journal entry)."""
        sub = -1 if self.sub_channels_requested is None else self.sub_channels_requested
        version = -1 if self.version is None else self.version
        return [
            int(self.state),
            version,
            sub,
            self._reply_size,
            self._last_op,
            self._last_sense_len,
        ]

    def restore(self, saved: object) -> None:
        """Take back save()'s list. It comes from the VMM: ValueError, naming the
        field, on anything a negotiation of this controller could not have left."""
        if not (
            isinstance(saved, (list, tuple))
            and len(saved) == 6
            and all(isinstance(v, int) and not isinstance(v, bool) for v in saved)
        ):
            raise ValueError("vstor state: not a list of 6 integers")
        state, version, sub, reply_size, last_op, sense_len = saved
        if state not in VstorState.__members__.values():
            raise ValueError(f"vstor state: state {state}")
        if version != -1 and version not in self.versions:
            raise ValueError(f"vstor state: version {version:#x}")
        if (version == -1) != (state < VstorState.QUERY_PROPERTIES):
            raise ValueError("vstor state: version and state disagree")
        if sub != -1 and not 1 <= sub <= self.max_sub_channels:
            raise ValueError(f"vstor state: {sub} sub-channels")
        if reply_size not in (PACKET_SIZE, PACKET_SIZE_PRE_WIN8):
            raise ValueError(f"vstor state: reply size {reply_size}")
        if not 0 <= last_op <= 0xFFFFFFFF or not 0 <= sense_len <= SENSE_BUFFER_SIZE:
            raise ValueError("vstor state: last operation or sense length")
        self.state = VstorState(state)
        self.version = None if version == -1 else version
        self.sub_channels_requested = None if sub == -1 else sub
        self._reply_size = reply_size
        self._last_op = last_op
        self._last_sense_len = sense_len

    # -- sizes --

    @property
    def ready(self) -> bool:
        return self.state == VstorState.READY

    @property
    def size(self) -> int:
        """The negotiated packet size (64 until a pre-WIN8 version is agreed)."""
        return PACKET_SIZE if self.version is None else packet_size(self.version)

    @property
    def multi_channel(self) -> bool:
        return (
            self.max_sub_channels > 0 and self.version is not None and self.version >= VERSION_WIN8
        )

    # -- guest -> host --

    def receive(
        self, payload: bytes | memoryview, *, primary: bool = True, data_bytes: int = 0
    ) -> Event:
        """Decode one guest packet's payload (copied once here).

        `data_bytes` is the total length the packet's GPA-direct ranges describe
        (0 for an inband packet). Raises GuestError: with an NTSTATUS when the
        protocol has an answer (send `failure_reply(status)`), without one when the
        packet cannot be trusted at all (reset the channel).
        """
        n = len(payload)
        if self.version is None:
            # During init a guest may still be on the pre-WIN8 size (Linux < 5.x,
            # FreeBSD after a pre-WIN8 negotiation): mirror it, as Hyper-V does.
            if n not in (PACKET_SIZE, PACKET_SIZE_PRE_WIN8):
                guest_error(f"vstor packet of {n} bytes (expected 64 or 48 during init)")
            self._reply_size = n
        else:
            if n != self.size:
                guest_error(f"vstor packet of {n} bytes, negotiated {self.size}")
            self._reply_size = self.size
        raw = bytes(payload[:n])
        op, _flags, _status = _HDR.unpack_from(raw, 0)
        self._last_op = op
        body = raw[HEADER_SIZE:]
        if op == VstorOp.EXECUTE_SRB:
            return ExecuteSrb(self._srb(body, data_bytes))
        if data_bytes:
            guest_error(f"operation {op} with a data buffer", status=NtStatus.INVALID_PARAMETER)
        if op in (VstorOp.RESET_LUN, VstorOp.RESET_BUS, VstorOp.RESET_ADAPTER):
            # Linux drains its outstanding I/O after the reply: nothing to do here.
            self._need(VstorState.READY, op)
            return Reply(self._reply())
        if op == VstorOp.CREATE_SUB_CHANNELS:
            return self._create_sub_channels(body, primary)
        if op in (
            VstorOp.BEGIN_INITIALIZATION,
            VstorOp.QUERY_PROTOCOL_VERSION,
            VstorOp.QUERY_PROPERTIES,
            VstorOp.END_INITIALIZATION,
        ):
            if not primary:
                guest_error(
                    f"init operation {op} on a sub-channel", status=NtStatus.INVALID_DEVICE_STATE
                )
            return self._init_step(op, body)
        # FCHBA_DATA: a SCSI controller is not Fibre Channel. COMPLETE_IO,
        # REMOVE_DEVICE, ENUMERATE_BUS are host->guest; anything else is unknown.
        guest_error(
            f"operation {op} is not for this controller", status=NtStatus.INVALID_DEVICE_REQUEST
        )

    def _need(self, state: VstorState, op: int) -> None:
        if self.state != state:
            guest_error(
                f"operation {op} in state {self.state.name}", status=NtStatus.INVALID_DEVICE_STATE
            )

    def _init_step(self, op: int, body: bytes) -> Reply:
        if op == VstorOp.BEGIN_INITIALIZATION:
            self._need(VstorState.BEGIN, op)
            self.state = VstorState.QUERY_VERSION
            return Reply(self._reply())
        if op == VstorOp.QUERY_PROTOCOL_VERSION:
            self._need(VstorState.QUERY_VERSION, op)
            major_minor, _revision = _VERSION.unpack_from(body, 0)
            echo = _VERSION.pack(major_minor, 0)
            if major_minor not in self.versions:
                # Refused, state unchanged: the guest tries its next version.
                return Reply(self._reply(echo, status=NtStatus.REVISION_MISMATCH))
            self.version = major_minor
            self.state = VstorState.QUERY_PROPERTIES
            return Reply(self._reply(echo))
        if op == VstorOp.QUERY_PROPERTIES:
            self._need(VstorState.QUERY_PROPERTIES, op)
            self.state = VstorState.END_INIT
            count = self.max_sub_channels if self.multi_channel else 0
            flags = STORAGE_CHANNEL_SUPPORTS_MULTI_CHANNEL if count else 0
            props = _PROPS.pack(0, count, 0, flags, self.max_transfer_bytes, 0)
            return Reply(self._reply(props))
        self._need(VstorState.END_INIT, op)
        self.state = VstorState.READY
        return Reply(self._reply())

    def _create_sub_channels(self, body: bytes, primary: bool) -> CreateSubChannels:
        op = VstorOp.CREATE_SUB_CHANNELS
        if not primary:
            guest_error(
                "CREATE_SUB_CHANNELS on a sub-channel", status=NtStatus.INVALID_DEVICE_STATE
            )
        if self.state not in (VstorState.END_INIT, VstorState.READY) or not self.multi_channel:
            guest_error(
                f"operation {op} in state {self.state.name} (multi-channel "
                f"{'on' if self.multi_channel else 'off'})",
                status=NtStatus.INVALID_DEVICE_STATE,
            )
        if self.sub_channels_requested is not None:
            guest_error("CREATE_SUB_CHANNELS twice", status=NtStatus.INVALID_DEVICE_STATE)
        (count,) = _SUBCH.unpack_from(body, 0)
        if not 1 <= count <= self.max_sub_channels:
            guest_error(
                f"CREATE_SUB_CHANNELS for {count} (advertised {self.max_sub_channels})",
                status=NtStatus.INVALID_PARAMETER,
            )
        self.sub_channels_requested = count
        return CreateSubChannels(count)

    def subchannels_created(self, ok: bool = True) -> bytes:
        """The answer to CREATE_SUB_CHANNELS once the sub-channels exist (or failed)."""
        self._reply_size = self.size
        return self._reply(status=NtStatus.SUCCESS if ok else NtStatus.INVALID_PARAMETER)

    def _srb(self, body: bytes, data_bytes: int) -> Srb:
        if self.state != VstorState.READY:
            guest_error(
                f"EXECUTE_SRB in state {self.state.name}", status=NtStatus.INVALID_DEVICE_STATE
            )
        (_length, _ss, _sc, port, path, target, lun, cdb_len, sense_len, data_in, _r, dtl, area) = (
            _SRB.unpack_from(body, 0)
        )
        assert self.version is not None
        buffer = sense_buffer_size(self.version)
        # Oversized offers are clamped: the reply never exceeds the guest's buffer
        # nor the sense area, so a bigger number costs nothing and is not refused.
        self._last_sense_len = min(sense_len, buffer)
        flags = timeout = 0
        if self.version >= VERSION_WIN8:
            _res, _tag, _action, flags, timeout, _key = _SRB_EXT.unpack_from(body, _SRB.size)
        if not 1 <= cdb_len <= MAX_CDB_LEN:
            guest_error(f"cdb_length {cdb_len}", status=NtStatus.INVALID_PARAMETER)
        if data_in not in (DataIn.WRITE, DataIn.READ, DataIn.NONE):
            guest_error(f"data_in {data_in}", status=NtStatus.INVALID_PARAMETER)
        if dtl != data_bytes:
            guest_error(
                f"data_transfer_length {dtl} but the ranges describe {data_bytes} bytes",
                status=NtStatus.INVALID_PARAMETER,
            )
        if data_in == DataIn.NONE and dtl:
            guest_error(f"no-data SRB with {dtl} bytes", status=NtStatus.INVALID_PARAMETER)
        if dtl > self.max_transfer_bytes:
            guest_error(
                f"data_transfer_length {dtl} > advertised {self.max_transfer_bytes}",
                status=NtStatus.INVALID_PARAMETER,
            )
        return Srb(
            port,
            path,
            target,
            lun,
            area[:cdb_len],
            self._last_sense_len,
            DataIn(data_in),
            dtl,
            flags,
            timeout,
        )

    # -- host -> guest --

    def _reply(self, body: bytes = b"", *, status: int = NtStatus.SUCCESS) -> bytes:
        return build_packet(VstorOp.COMPLETE_IO, body, status=status, size=self._reply_size)

    def failure_reply(self, status: int) -> bytes:
        """The answer to the packet `receive` just refused with `status`.

        An SRB gets CHECK CONDITION / ILLEGAL REQUEST 24/00 (INVALID FIELD IN CDB)
        with SRB status INVALID_REQUEST|AUTOSENSE_VALID, so every guest fails the
        command cleanly (FreeBSD panics on SRB status 0); control operations get the
        NTSTATUS alone, which is all guests look at."""
        if self._last_op != VstorOp.EXECUTE_SRB:
            return self._reply(status=status)
        sense = bytearray(18)
        sense[0], sense[2], sense[7], sense[12] = 0x70, SENSE_KEY_ILLEGAL_REQUEST, 10, 0x24
        return self._srb_reply(
            status,
            SrbStatus.INVALID_REQUEST | SRB_AUTOSENSE_VALID,
            SCSI_STATUS_CHECK_CONDITION,
            bytes(sense[: self._last_sense_len]),
            0,
            None,
        )

    def _srb_reply(
        self,
        status: int,
        srb_status: int,
        scsi_status: int,
        sense: bytes,
        dtl: int,
        srb: Srb | None,
    ) -> bytes:
        size = self._reply_size if srb is None else self.size
        area = sense.ljust(20, b"\0")
        fields = _SRB.pack(
            SRB_SIZE if size == PACKET_SIZE else SRB_SIZE_PRE_WIN8,
            srb_status,
            scsi_status,
            srb.port if srb else 0,
            srb.path_id if srb else 0,
            srb.target_id if srb else 0,
            srb.lun if srb else 0,
            len(srb.cdb) if srb else 0,
            len(sense),
            srb.data_in if srb else 0,
            0,
            dtl,
            area,
        )
        return build_packet(VstorOp.COMPLETE_IO, fields, status=status, size=size)

    def complete_srb(self, srb: Srb, scsi_status: int, sense: bytes, transferred: int) -> bytes:
        """The completion of an executed SRB (spec 7.2).

        GOOD: SRB SUCCESS and the bytes moved (a short transfer is an underrun
        reported as SUCCESS, errata 4). CHECK CONDITION: sense capped by what the
        guest offered, SRB INVALID_REQUEST|AUTOSENSE for ILLEGAL REQUEST and
        ERROR|AUTOSENSE otherwise. Any other status: SRB ERROR, no sense.
        """
        transferred = max(0, min(transferred, srb.data_transfer_length))
        if scsi_status == SCSI_STATUS_GOOD:
            return self._srb_reply(NtStatus.SUCCESS, SrbStatus.SUCCESS, 0, b"", transferred, srb)
        if scsi_status == SCSI_STATUS_CHECK_CONDITION and sense:
            key = sense[2] & 0x0F if len(sense) > 2 else 0
            code = (
                SrbStatus.INVALID_REQUEST if key == SENSE_KEY_ILLEGAL_REQUEST else SrbStatus.ERROR
            )
            capped = sense[: min(srb.sense_info_length, SENSE_BUFFER_SIZE)]
            srb_status = code | (SRB_AUTOSENSE_VALID if capped else 0)
            return self._srb_reply(
                NtStatus.IO_DEVICE_ERROR, srb_status, scsi_status, capped, 0, srb
            )
        return self._srb_reply(NtStatus.IO_DEVICE_ERROR, SrbStatus.ERROR, scsi_status, b"", 0, srb)

    def srb_failure(self, srb: Srb, srb_status: int) -> bytes:
        """An SRB the host answers without running it: INVALID_LUN for an absent
        LUN (scsi_status 0, so FreeBSD too reads it as 'device not there')."""
        status = _SRB_NTSTATUS.get(SrbStatus(srb_status & 0x3F), NtStatus.IO_DEVICE_ERROR)
        return self._srb_reply(status, srb_status, SCSI_STATUS_GOOD, b"", 0, srb)

    def enumerate_bus(self) -> bytes | None:
        """The unsolicited 'LUN set changed' packet, or None before the guest is
        Ready (or below 4.2, where Hyper-V sends none)."""
        if not self.ready or self.version is None or self.version < VERSION_WIN7:
            return None
        return build_packet(VstorOp.ENUMERATE_BUS, size=self.size)


# --- the guest side's packets (the simulated VSC, tests) ------------------------------


def init_request(op: int, body: bytes = b"") -> bytes:
    """A control request as Linux 6.1 sends it: 64 bytes, REQUEST_COMPLETION_FLAG."""
    return build_packet(op, body, flags=REQUEST_COMPLETION_FLAG)


def version_request(version: int) -> bytes:
    return init_request(VstorOp.QUERY_PROTOCOL_VERSION, _VERSION.pack(version, 0))


def sub_channels_request(count: int) -> bytes:
    return init_request(VstorOp.CREATE_SUB_CHANNELS, _SUBCH.pack(count))


def srb_request(srb: bytes, *, size: int = PACKET_SIZE) -> bytes:
    return build_packet(VstorOp.EXECUTE_SRB, srb, flags=REQUEST_COMPLETION_FLAG, size=size)


@dataclass(frozen=True, slots=True)
class Properties:
    """vmstorage_channel_properties as a guest reads them."""

    max_channel_cnt: int
    flags: int
    max_transfer_bytes: int


def decode_reply(payload: bytes) -> tuple[int, int, bytes]:
    """(operation, status, body) of a completion payload; ValueError if short."""
    if len(payload) < HEADER_SIZE:
        raise ValueError(f"a {len(payload)}-byte vstor packet")
    op, _flags, status = _HDR.unpack_from(payload, 0)
    return op, status, bytes(payload[HEADER_SIZE:])


def decode_properties(body: bytes) -> Properties:
    _r, count, _r1, flags, max_transfer, _r2 = _PROPS.unpack_from(body, 0)
    return Properties(count, flags, max_transfer)
