"""The synthetic SCSI controller (storvsc).

The device shape every kind shares: `protocol.py` (VSTOR layouts and state machine,
sans-IO), `vsp.py` (the host side, trio), `vsc.py` (the simulated guest's driver),
`backends/` (memory, file, nbd and users' own, via the `vmbusd.disk_backends`
entry points). Today the SCSI target (`scsi/`) and the backends exist and are
tested; the VSTOR protocol, VSP and VSC that put them on VMBus are the storvsc
issue's work and do not exist yet.
"""
