"""`vmbusd serve --control PATH` and `vmbusd ctl PATH ...`: changes to running VMs.

A private unix socket with the stats socket's rules (born 0600, the peer's
SO_PEERCRED uid must be allowed, one request of at most `stats.MAX_REQUEST` bytes
read within `stats.REQUEST_TIMEOUT_S`). A request is one JSON object and a
newline; the answer is one JSON object, `{"ok": true, "message": ...}` or
`{"ok": false, "error": ...}`, then EOF. Commands (`cmd`):

- `disk-add`: vm, device (index among the VM's storvsc controllers, default 0),
  and a `[[device.lun]]` table's keys (lun, backend, size, path, readonly,
  create_size, uri, serial, wwn, ...), checked as the config file's;
- `disk-remove`: vm, device, lun;
- `nic-link`: vm, device (index among its netvsc NICs), up (true/false);
- `disk-fault`: vm, device, lun, `set` (a faulty LUN's settings, as its table's
  keys, plus power = "cut"/"restore" and stall = seconds/"forever"/"off"); the
  answer names what changed and the faults injected so far;
- `nic-impair`: vm, device, `set` (an impair NIC's settings; `to_guest.KEY` or
  `from_guest.KEY` for one direction).

A VM is named by the name its attach hello gave (or its session id from
`vmbusd stats`, when two VMs share a name). A new command is a function in
`COMMANDS`.
"""

from __future__ import annotations

import json
import logging
import socket as _stdsocket
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import trio

from vmbus.cliutil import UserError
from vmbus.device import Device
from vmbus.server import VmSession
from vmbus.stats import MAX_REQUEST, REQUEST_TIMEOUT_S, _peer_uid, _read_request, serve_unix

log = logging.getLogger(__name__)


class ControlError(UserError):
    """A request that cannot be carried out; the message is the client's one line."""


def find_vm(sessions: Iterable[VmSession], name: object) -> VmSession:
    if not isinstance(name, str) or not name:
        raise ControlError("no VM given (--vm NAME)")
    live = [s for s in sessions if s.peer is not None]
    hits = [s for s in live if s.session_id == name] or [s for s in live if s.label == name]
    if not hits:
        names = ", ".join(sorted({s.label for s in live})) or "none"
        raise ControlError(f"no VM named {name!r} is attached (attached: {names})")
    if len(hits) > 1:
        ids = ", ".join(sorted(s.session_id for s in hits))
        raise ControlError(f"{len(hits)} VMs are named {name!r}: give a session id instead ({ids})")
    return hits[0]


def find_device(session: VmSession, kind: str, index: object) -> Device:
    """The `index`-th device named `kind` (storvsc, netvsc) of the VM."""
    if index is None:
        index = 0
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise ControlError(f"--device must be an index 0, 1, ..., not {index!r}")
    found = [d for d in session.devices if d.name == kind]
    if not found:
        raise ControlError(f"VM {session.label!r} has no {kind} device")
    if index >= len(found):
        raise ControlError(
            f"VM {session.label!r} has {len(found)} {kind} device(s): --device 0..{len(found) - 1}"
        )
    return found[index]


_NOT_LUN_KEYS = ("cmd", "vm", "device")


async def disk_add(sessions: set[VmSession], req: dict[str, Any]) -> str:
    from devices.storvsc.vsp import StorvscDevice

    session = find_vm(sessions, req.get("vm"))
    dev = find_device(session, "storvsc", req.get("device"))
    assert isinstance(dev, StorvscDevice)
    if "lun" not in req:
        raise ControlError("no LUN given (--lun N)")
    entry = {k: v for k, v in req.items() if k not in _NOT_LUN_KEYS and v is not None}
    try:
        lun = await dev.hot_add_lun(entry)
    except UserError as exc:
        raise ControlError(f"VM {session.label!r}: {exc}") from exc
    disk = dev.controller.disk(lun)
    size = disk.blocks * disk.block_size
    return f"VM {session.label!r}: LUN {lun} added ({size:,} bytes); the guest was told"


async def disk_remove(sessions: set[VmSession], req: dict[str, Any]) -> str:
    from devices.storvsc.vsp import StorvscDevice

    session = find_vm(sessions, req.get("vm"))
    dev = find_device(session, "storvsc", req.get("device"))
    assert isinstance(dev, StorvscDevice)
    lun = req.get("lun")
    if not isinstance(lun, int) or isinstance(lun, bool):
        raise ControlError(f"--lun must be an integer, not {lun!r}")
    try:
        await dev.hot_remove_lun(lun)
    except UserError as exc:
        raise ControlError(f"VM {session.label!r}: {exc}") from exc
    return f"VM {session.label!r}: LUN {lun} removed; the guest was told"


async def nic_link(sessions: set[VmSession], req: dict[str, Any]) -> str:
    from devices.netvsc.vsp import NetvscDevice

    session = find_vm(sessions, req.get("vm"))
    dev = find_device(session, "netvsc", req.get("device"))
    assert isinstance(dev, NetvscDevice)
    up = req.get("up")
    if not isinstance(up, bool):
        raise ControlError(f"link must be up or down, not {up!r}")
    told = dev.set_link(up)
    state = "up" if up else "down"
    tail = "the guest was told" if told else "no guest NIC is up to tell yet; it starts so"
    return f"VM {session.label!r}: link {state}; {tail}"


def _settings(req: dict[str, Any]) -> dict[str, Any]:
    settings = req.get("set") or {}
    if not isinstance(settings, dict):
        raise ControlError("settings must be KEY=VALUE pairs")
    return settings


def _applied(label: str, what: str, done: list[str], counters: dict[str, int]) -> str:
    faults = ", ".join(f"{k} {n}" for k, n in counters.items() if n) or "none"
    changed = ", ".join(done) if done else "nothing changed"
    return f"VM {label!r}: {what}: {changed}; injected so far: {faults}"


async def disk_fault(sessions: set[VmSession], req: dict[str, Any]) -> str:
    from devices.storvsc.backends.base import BackendConfigError
    from devices.storvsc.backends.faulty import FaultyBackend
    from devices.storvsc.vsp import StorvscDevice

    session = find_vm(sessions, req.get("vm"))
    dev = find_device(session, "storvsc", req.get("device"))
    assert isinstance(dev, StorvscDevice)
    lun = req.get("lun")
    if not isinstance(lun, int) or isinstance(lun, bool):
        raise ControlError(f"--lun must be an integer, not {lun!r}")
    if lun not in dev.controller:
        raise ControlError(f"VM {session.label!r} has no LUN {lun} (yet)")
    backend = dev.controller.disk(lun).backend
    if not isinstance(backend, FaultyBackend):
        raise ControlError(
            f"VM {session.label!r}: LUN {lun} is a {type(backend).__name__}, "
            'not a faulty disk (backend = "faulty")'
        )
    try:
        done = backend.configure(**_settings(req))
    except BackendConfigError as exc:
        raise ControlError(f"VM {session.label!r}: LUN {lun}: {exc}") from exc
    return _applied(session.label, f"LUN {lun}", done, backend.fault_counters())


async def nic_impair(sessions: set[VmSession], req: dict[str, Any]) -> str:
    from devices.netvsc.backends.impair import ImpairBackend
    from devices.netvsc.vsp import NetvscDevice

    session = find_vm(sessions, req.get("vm"))
    dev = find_device(session, "netvsc", req.get("device"))
    assert isinstance(dev, NetvscDevice)
    backend = dev.backend
    if not isinstance(backend, ImpairBackend):
        raise ControlError(
            f"VM {session.label!r}: its NIC's backend is {backend.name}, "
            'not impair (backend = "impair")'
        )
    try:
        done = backend.configure(**_settings(req))
    except UserError as exc:
        raise ControlError(f"VM {session.label!r}: {exc}") from exc
    return _applied(session.label, "NIC", done, backend.fault_counters())


Command = Callable[[set[VmSession], dict[str, Any]], Awaitable[str]]
COMMANDS: dict[str, Command] = {
    "disk-add": disk_add,
    "disk-remove": disk_remove,
    "nic-link": nic_link,
    "disk-fault": disk_fault,
    "nic-impair": nic_impair,
}


async def handle(sessions: set[VmSession], raw: bytes) -> dict[str, Any]:
    """One request's answer (never raises for a bad request)."""
    try:
        req = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return {"ok": False, "error": "the request is not one JSON object on one line"}
    if not isinstance(req, dict):
        return {"ok": False, "error": "the request is not a JSON object"}
    cmd = COMMANDS.get(str(req.get("cmd")))
    if cmd is None:
        return {"ok": False, "error": f"unknown command {req.get('cmd')!r}: {', '.join(COMMANDS)}"}
    try:
        return {"ok": True, "message": await cmd(sessions, req)}
    except UserError as exc:
        return {"ok": False, "error": str(exc)}


async def serve_control(
    path: str,
    sessions: set[VmSession],
    *,
    allowed_uids: Iterable[int] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The control socket; same claim, mode and removal rules as the stats socket."""
    await serve_unix(
        path,
        "control socket",
        lambda stream, allowed: _answer(stream, sessions, allowed),
        allowed_uids,
        task_status,
    )


async def _answer(stream: trio.SocketStream, sessions: set[VmSession], allowed: set[int]) -> None:
    async with stream:
        try:
            if _peer_uid(stream.socket) not in allowed:
                log.warning("control: refused a peer whose uid is not allowed")
                return
            raw = await _read_request(stream)
            if not raw.endswith(b"\n"):
                answer = {
                    "ok": False,
                    "error": f"the request must be one line of at most {MAX_REQUEST} bytes",
                }
            else:
                answer = await handle(sessions, raw)
            if answer["ok"]:
                log.info("control: %s", answer["message"])
            await stream.send_all(json.dumps(answer).encode() + b"\n")
        except (trio.BrokenResourceError, OSError):
            pass


def request(path: str, req: dict[str, Any]) -> dict[str, Any]:
    """Client side (`vmbusd ctl`): one request, its answer. OSError when nobody listens."""
    line = json.dumps(req).encode() + b"\n"
    if len(line) > MAX_REQUEST:
        return {"ok": False, "error": f"the request is over {MAX_REQUEST} bytes"}
    chunks = []
    with _stdsocket.socket(_stdsocket.AF_UNIX, _stdsocket.SOCK_STREAM) as s:
        s.settimeout(REQUEST_TIMEOUT_S + 5)
        s.connect(path)
        try:
            s.sendall(line)
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except (ConnectionResetError, BrokenPipeError):
            chunks = []  # closed unanswered: a uid the service does not allow
    if not chunks:
        return {
            "ok": False,
            "error": f"{path}: closed without an answer (is this uid allowed? see --allow-uid)",
        }
    text = b"".join(chunks).decode(errors="replace")
    try:
        answer = json.loads(text)
    except ValueError:
        answer = None
    if not isinstance(answer, dict) or "ok" not in answer:
        return {"ok": False, "error": f"{path}: not a vmbusd control socket (answer {text[:80]!r})"}
    return answer
