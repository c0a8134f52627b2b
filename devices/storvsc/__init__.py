"""The synthetic SCSI controller (storvsc).

The device shape every kind shares: `protocol.py` (VSTOR layouts, sizes per
negotiated version and the init state machine, sans-IO), `vsp.py` (the host side,
trio: `StorvscDevice`, the `vmbusd.devices` entry point `storvsc`; SRB data moves
zero-copy between guest RAM and the backend), `vsc.py` (the simulated guest's
driver, Linux 6.1's hv_storvsc sequence: init, sub-channels, scan, read/write/flush),
`scsi/` (the SCSI target: a controller of direct-access disks) and `backends/`
(memory, file, nbd and users' own, via the `vmbusd.disk_backends` entry points).
Configured as `[[device]] type = "storvsc"` with `[[device.lun]]` tables.
"""
