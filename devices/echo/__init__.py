"""The echo device: `protocol.py` (its GUID and rules), `vsp.py` (host side),
`vsc.py` (the simulated guest's driver). It has no backends."""

from devices.echo.protocol import ECHO_IF_TYPE
from devices.echo.vsp import EchoDevice

__all__ = ["ECHO_IF_TYPE", "EchoDevice"]
