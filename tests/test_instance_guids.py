"""Default instance GUIDs are derived from the VM's name and the device's place in the
config, so a restarted vmbusd offers a VM the same devices (no new controller or NIC
appears in its guest); a GUID the config gives wins."""

from __future__ import annotations

import uuid

from vmbus.config import devices_from_config

CFG = {
    "device": [{"type": "echo"}, {"type": "echo"}],
    "vm": {
        "db1": {"device": [{"type": "echo"}, {"type": "echo", "instance": str(uuid.UUID(int=7))}]}
    },
}


def instances(vm: str | None) -> list[uuid.UUID]:
    return [d.instance for d in devices_from_config(CFG, "test", vm)]


def test_same_vm_same_place_same_guid_across_restarts() -> None:
    assert instances("web") == instances("web")  # a second build: as after a restart
    assert instances(None) == instances(None)
    assert instances("db1") == instances("db1")


def test_guids_differ_by_place_and_by_vm() -> None:
    web, other = instances("web"), instances("other")
    assert len(set(web)) == 2  # two devices of one type in one VM are told apart
    assert set(web).isdisjoint(other)  # two VMs on the default list


def test_config_guid_wins() -> None:
    first, second = instances("db1")
    assert second == uuid.UUID(int=7)
    assert first not in instances("web")
