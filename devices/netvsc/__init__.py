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
- `offload.py`: checksum fill, LSO v2 segmentation and the receive checksum PPI,
  pure Python (the native twins do not exist yet).
- `vsp.py`: `NetvscDevice` (host side, trio; options `mac`, `mtu`, `queues`) with
  an in-file loopback backend: buffers mapped through `ctx.gpadl` and let go on
  revoke or teardown, transmit from send sections and GPA-direct pages, RNDIS
  control answered through receive sections, receives indicated with transfer-page
  packets per queue, vRSS (sub-channels, send table, Toeplitz steering, hash PPI).
- `vsc.py`: `NetvscGuest`, the simulated guest's driver doing Linux 6.1's init and
  vRSS bring-up byte for byte, and `NetvscVsc`, its probe.
- `backends/`: the contract (`base.NetBackend`: frames per batch and queue, link,
  which offloads it takes), `loopback`, and `tap` (IFF_VNET_HDR with checksum/LSO
  passed to the kernel, IFF_MULTI_QUEUE, netns, bridge; pyroute2), `switch` (an L2
  learning switch shared by the NICs of every VM of a service, VLAN-aware) and `pcap`
  (another backend wrapped, frames to pcapng); entry-point group
  `vmbusd.net_backends`; config `type = "netvsc"`.
- `tap_bridge.py`: `vmbusd vm --nic-tap NAME [--netns NS]`, the simulated guest's
  NIC bridged to a TAP.
- Not yet: native C, several RNDIS packets per
  transfer-page packet, link indications from `vmbusd ctl`.

Wire facts come from Linux 6.1's drivers/net/hyperv/ and ../shared/spec/netvsc.md.
"""
