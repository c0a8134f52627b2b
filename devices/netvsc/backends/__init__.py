"""Network backends for the netvsc VSP: what a synthetic NIC's frames go to on the
host. The contract is `base.NetBackend`; `loopback`, `tap`, `switch` and `pcap` ship
here, more come from any package's `vmbusd.net_backends` entry points."""
