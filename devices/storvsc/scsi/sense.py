"""Fixed-format sense data and the one exception that carries a failed command.

Every way a command can fail ends in `SenseError`: the disk raises it anywhere in
a command's handling and `execute` turns it into CHECK CONDITION with these bytes.
"""

from __future__ import annotations

from devices.storvsc.scsi.constants import (
    FIXED_SENSE_LEN,
    SENSE_CURRENT_FIXED,
    SENSE_VALID,
    SenseKey,
)

_INFORMATION_MAX = 0xFFFF_FFFF  # fixed format holds 32 bits; larger LBAs are not VALID


def fixed_sense(key: int, asc_ascq: tuple[int, int], information: int | None = None) -> bytes:
    """Build 18 bytes of current, fixed-format sense data (SPC-5 4.4.3)."""
    sense = bytearray(FIXED_SENSE_LEN)
    sense[0] = SENSE_CURRENT_FIXED
    if information is not None and 0 <= information <= _INFORMATION_MAX:
        sense[0] |= SENSE_VALID
        sense[3:7] = information.to_bytes(4, "big")
    sense[2] = key & 0x0F
    sense[7] = FIXED_SENSE_LEN - 8
    sense[12], sense[13] = asc_ascq
    return bytes(sense)


class SenseError(Exception):
    """A command ends in CHECK CONDITION with this sense; raised, never returned."""

    def __init__(self, key: int, asc_ascq: tuple[int, int], information: int | None = None) -> None:
        super().__init__(f"sense key {key:#x} asc/ascq {asc_ascq[0]:02x}/{asc_ascq[1]:02x}")
        self.key = key
        self.asc_ascq = asc_ascq
        self.information = information

    @property
    def sense(self) -> bytes:
        return fixed_sense(self.key, self.asc_ascq, self.information)


def illegal(asc_ascq: tuple[int, int]) -> SenseError:
    """The common case: the guest asked for something invalid."""
    return SenseError(SenseKey.ILLEGAL_REQUEST, asc_ascq)
