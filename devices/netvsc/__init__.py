"""The synthetic network adapter (netvsc): NVSP and RNDIS on VMBus.

The device shape every kind shares (docs/devices.md):

- `protocol.py`: NVSP, sans-IO. `NvspServer.receive(bytes)` -> one event per guest
  message (version negotiation, NDIS version and config, receive/send buffer
  GPADLs to map, SEND_RNDIS_PKT with its send-buffer section, SUBCHANNEL,
  SWITCH_DATA_PATH, revokes); builders for what the host sends (completions padded
  to a whole 40-byte nvsp_message, the transfer-page body, the send indirection
  table). Errors: `NvspError`, a GuestError carrying the failure answer.
- `rndis.py`: RNDIS, sans-IO. `split_messages` walks one NVSP message's RNDIS bytes;
  `RndisDevice.control` answers INITIALIZE/QUERY/SET/RESET/KEEPALIVE/HALT from a
  fixed OID whitelist; `parse_packet` reads a guest PACKET and its PPIs (checksum,
  LSO v2, VLAN, hash); `packet_header` and `indicate_status` build host messages;
  `toeplitz_hash` and `rss_queue` steer receives. Errors: `RndisError`.
- `vsp.py` (host side, trio), `vsc.py` (the simulated guest's driver) and
  `backends/` (loopback, tap, switch, pcap): issue 10's later parts; not written yet.

Wire facts come from Linux 6.1's drivers/net/hyperv/ and ../shared/spec/netvsc.md.
"""
