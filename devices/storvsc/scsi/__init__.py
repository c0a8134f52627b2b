"""SCSI disk emulation behind the storvsc VSP: `disk.py` (the controller and its
direct-access disks, sans-IO apart from awaiting the backend), `constants.py`
(opcodes, page lengths, limits), `sense.py` (fixed-format sense data),
`buffers.py` (the data buffers commands move through)."""

from devices.storvsc.scsi.disk import (
    GOOD_NO_DATA,
    DiskIdentity,
    ScsiController,
    ScsiDisk,
    ScsiResult,
    standard_inquiry,
)

__all__ = [
    "GOOD_NO_DATA",
    "DiskIdentity",
    "ScsiController",
    "ScsiDisk",
    "ScsiResult",
    "standard_inquiry",
]
