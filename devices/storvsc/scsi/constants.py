"""SCSI numbers (SPC-5 / SBC-4) and the bounds our disk emulation advertises.

Every limit on guest input the disk applies is a named constant here, so the VPD
page that advertises it and the check that enforces it cannot disagree.
"""

from __future__ import annotations

from enum import IntEnum


class Op(IntEnum):
    """Operation codes we serve; anything else gets INVALID COMMAND OPERATION CODE."""

    TEST_UNIT_READY = 0x00
    REQUEST_SENSE = 0x03
    READ_6 = 0x08
    WRITE_6 = 0x0A
    INQUIRY = 0x12
    MODE_SELECT_6 = 0x15
    MODE_SENSE_6 = 0x1A
    START_STOP_UNIT = 0x1B
    PREVENT_ALLOW_MEDIUM_REMOVAL = 0x1E
    READ_CAPACITY_10 = 0x25
    READ_10 = 0x28
    WRITE_10 = 0x2A
    VERIFY_10 = 0x2F
    SYNCHRONIZE_CACHE_10 = 0x35
    WRITE_SAME_10 = 0x41
    UNMAP = 0x42
    MODE_SELECT_10 = 0x55
    MODE_SENSE_10 = 0x5A
    READ_16 = 0x88
    WRITE_16 = 0x8A
    VERIFY_16 = 0x8F
    SYNCHRONIZE_CACHE_16 = 0x91
    WRITE_SAME_16 = 0x93
    SERVICE_ACTION_IN_16 = 0x9E
    REPORT_LUNS = 0xA0
    READ_12 = 0xA8
    WRITE_12 = 0xAA
    VERIFY_12 = 0xAF


SA_READ_CAPACITY_16 = 0x10  # SERVICE ACTION IN(16) service action


def cdb_length_for(opcode: int) -> int | None:
    """The CDB length the opcode's group implies (SPC-5 4.2.5.1), None if variable/vendor."""
    group = opcode >> 5
    return {0: 6, 1: 10, 2: 10, 4: 16, 5: 12}.get(group)


# SCSI status byte (SAM-5)
class Status(IntEnum):
    GOOD = 0x00
    CHECK_CONDITION = 0x02


class SenseKey(IntEnum):
    NO_SENSE = 0x0
    NOT_READY = 0x2
    MEDIUM_ERROR = 0x3
    HARDWARE_ERROR = 0x4
    ILLEGAL_REQUEST = 0x5
    UNIT_ATTENTION = 0x6
    DATA_PROTECT = 0x7
    ABORTED_COMMAND = 0xB


# (ASC, ASCQ) pairs (SPC-5 Annex F)
NO_ADDITIONAL_SENSE = (0x00, 0x00)
WRITE_ERROR = (0x0C, 0x00)
UNRECOVERED_READ_ERROR = (0x11, 0x00)
PARAMETER_LIST_LENGTH_ERROR = (0x1A, 0x00)
INVALID_COMMAND_OPERATION_CODE = (0x20, 0x00)
LBA_OUT_OF_RANGE = (0x21, 0x00)
INVALID_FIELD_IN_CDB = (0x24, 0x00)
LOGICAL_UNIT_NOT_SUPPORTED = (0x25, 0x00)
INVALID_FIELD_IN_PARAMETER_LIST = (0x26, 0x00)
WRITE_PROTECTED = (0x27, 0x00)
CAPACITY_DATA_HAS_CHANGED = (0x2A, 0x09)
SAVING_PARAMETERS_NOT_SUPPORTED = (0x39, 0x00)

FIXED_SENSE_LEN = 18  # fixed-format sense data, additional sense length 10
SENSE_CURRENT_FIXED = 0x70
SENSE_VALID = 0x80  # byte 0: the INFORMATION field is meaningful

# Identity and INQUIRY (spec 9.3)
PDT_DISK = 0x00
PQ3_NO_LUN = 0x7F  # peripheral qualifier 3, device type 0x1F: no LUN here (Linux scan)
INQUIRY_VERSION_SPC3 = 0x05
INQUIRY_RESPONSE_FORMAT = 0x02
INQUIRY_CMDQUE = 0x02
STD_INQUIRY_LEN = 96  # through the version descriptors (bytes 58-73) and reserved tail
VENDOR_LEN, PRODUCT_LEN, REVISION_LEN = 8, 16, 4
MAX_SERIAL_LEN = 64  # VPD 0x80 / T10 vendor-id designator; configured, not guest input
DEFAULT_VENDOR = "Msft"  # Linux storvsc keys its SPC-3 quirk on this vendor
DEFAULT_PRODUCT = "Virtual Disk"
DEFAULT_REVISION = "1.0"

# VPD pages
VPD_SUPPORTED_PAGES = 0x00
VPD_UNIT_SERIAL = 0x80
VPD_DEVICE_ID = 0x83
VPD_BLOCK_LIMITS = 0xB0
VPD_BLOCK_CHARACTERISTICS = 0xB1
VPD_LOGICAL_BLOCK_PROVISIONING = 0xB2
VPD_PAGES = (
    VPD_SUPPORTED_PAGES,
    VPD_UNIT_SERIAL,
    VPD_DEVICE_ID,
    VPD_BLOCK_LIMITS,
    VPD_BLOCK_CHARACTERISTICS,
    VPD_LOGICAL_BLOCK_PROVISIONING,
)
BLOCK_LIMITS_PAGE_LEN = 0x3C
BLOCK_CHARACTERISTICS_PAGE_LEN = 0x3C
PROVISIONING_PAGE_LEN = 0x04
ROTATION_NON_ROTATING = 0x0001
PROVISIONING_THIN = 0x02

# Bounds on one command (advertised in VPD 0xB0; enforced on every CDB)
MAX_TRANSFER_BYTES = 2 * 1024 * 1024  # READ/WRITE; lowered further by the backend's max
MAX_WRITE_SAME_BYTES = 64 * 1024 * 1024  # WRITE SAME range (pattern written in chunks)
WRITE_SAME_CHUNK_BYTES = 1024 * 1024  # the largest pattern buffer we build for WRITE SAME
MAX_UNMAP_DESCRIPTORS = 256  # per UNMAP parameter list (Linux sends one)
MAX_UNMAP_BLOCKS = 0x0040_0000  # total LBAs per UNMAP/WRITE SAME+UNMAP (2 GiB at 512 B)
UNMAP_HEADER_LEN = 8
UNMAP_DESCRIPTOR_LEN = 16

# REPORT LUNS
MAX_LUN = 255  # storvsc's max_lun; single-level peripheral addressing
REPORT_LUNS_SELECT = (0x00, 0x01, 0x02)  # all, well-known only (none), all

# MODE SENSE / MODE SELECT
PAGE_CACHING = 0x08
PAGE_CONTROL = 0x0A
PAGE_ALL = 0x3F
SUBPAGE_ALL = 0xFF
PC_CURRENT, PC_CHANGEABLE, PC_DEFAULT, PC_SAVED = 0, 1, 2, 3
CACHING_PAGE_LEN = 0x12  # page length byte (page is 20 bytes)
CONTROL_PAGE_LEN = 0x0A  # page length byte (page is 12 bytes)
CACHING_WCE = 0x04
DEVSPEC_WP = 0x80
DEVSPEC_DPOFUA = 0x10
MODE_HEADER_6_LEN = 4
MODE_HEADER_10_LEN = 8
SHORT_BLOCK_DESCRIPTOR_LEN = 8
LONG_BLOCK_DESCRIPTOR_LEN = 16
MAX_MODE_SELECT_LEN = 512  # far above any page list we accept; bounds the copy

# READ CAPACITY
READ_CAPACITY_10_LEN = 8
READ_CAPACITY_16_LEN = 32
RC16_LBPME = 0x80
RC16_LBPRZ = 0x40

MAX_CDB_LEN = 16  # storvsc carries at most 16 CDB bytes; we copy no more
CONTROL_NACA = 0x04  # control byte: ACA is not supported
CONTROL_LINK = 0x01  # control byte: linked commands are obsolete
INTERNAL_TARGET_FAILURE = (0x44, 0x00)  # a backend broke its contract (a bug, not bad media)
