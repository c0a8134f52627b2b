"""Per-VM limits (vmbus.limits): a hostile VM hits each one and gets the protocol's
refusal or back-pressure and exactly one log line, while a well-behaved VM on the
same vmbusd carries on at its normal pace; and the [limits] config."""

from __future__ import annotations

import contextlib
import logging
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import trio

from devices.echo import ECHO_IF_TYPE
from vmbus import attach, server
from vmbus import protocol as p
from vmbus.channel import Channel
from vmbus.config import VmDevices
from vmbus.device import MAX_SUBCHANNELS, Device, DeviceContext, DeviceOffer
from vmbus.guest.vm import HostError, SimulatedVm
from vmbus.guest.workloads import echo_mixed
from vmbus.limits import (
    DEFAULT_CHANNELS,
    LimitsError,
    RequestBudget,
    TokenBucket,
    VmLimits,
    limits_from_config,
    parse_limits,
)
from vmbus.ring import OutPacket
from vmbus.server import VmSession

RING = 64 * 1024
MAXP = RING // 4 - 64
SUB_IF = uuid.UUID("5d0c1b7e-2f3a-4c8e-9b61-7a4e2d9f0c31")


class SubEcho(Device):
    """Echoes; on the primary, b'sub:N' asks for N sub-channels in all (as storvsc's
    CREATE_SUB_CHANNELS does) and is answered b'got:M' with how many it has."""

    if_type = SUB_IF
    name = "subecho"
    packet_types = 1 << 6

    def __init__(self, instance: uuid.UUID | None = None, sub_channels: int = 0) -> None:
        super().__init__(instance)
        self._static = sub_channels

    @property
    def offer(self) -> DeviceOffer:
        return DeviceOffer(
            self.if_type, self.instance, sub_channels=self._static, max_subchannels=MAX_SUBCHANNELS
        )

    async def serve(self, channel: Channel, ctx: DeviceContext) -> None:
        while True:
            batch = await channel.receive()
            out = []
            for pkt in batch:
                body = bytes(pkt.payload).rstrip(b"\0")
                if ctx.sub_channel_index == 0 and body.startswith(b"sub:"):
                    body = b"got:%d" % len(await ctx.enable_subchannels(int(body[4:])))
                out.append(OutPacket(6, 0, pkt.trans_id, [body]))
            await channel.send(out)


HELD_IF = uuid.UUID("9a7f3e21-6c4d-4b0a-8e15-3d2c1b0a9f84")
HOLD_S = 0.05  # how long HeldEcho's "backend" takes per request


class HeldEcho(Device):
    """A device that holds requests across an await, as storvsc does while its
    backend works: a slot of `ctx.requests` per request taken off the ring, given
    back when the echo goes out HOLD_S later. `peak` is the most the VM had out."""

    if_type = HELD_IF
    name = "heldecho"
    packet_types = 1 << 6
    peak: ClassVar[dict[str, int]] = {}

    def __init__(self, instance: uuid.UUID | None = None, sub_channels: int = 0) -> None:
        super().__init__(instance)
        self._static = sub_channels

    @property
    def offer(self) -> DeviceOffer:
        return DeviceOffer(self.if_type, self.instance, sub_channels=self._static)

    async def serve(self, channel: Channel, ctx: DeviceContext) -> None:
        budget = ctx.requests
        assert budget is not None

        async def complete(trans_id: int, body: bytes) -> None:
            await trio.sleep(HOLD_S)
            await channel.send([OutPacket(6, 0, trans_id, [body])])
            budget.release(1)

        async with trio.open_nursery() as n:
            while True:
                await budget.acquire(1)  # before the request leaves the ring
                (pkt,) = await channel.receive(1)
                HeldEcho.peak[ctx.vm_name] = max(HeldEcho.peak.get(ctx.vm_name, 0), budget.in_use)
                n.start_soon(complete, pkt.trans_id, bytes(pkt.payload))


# --------------------------------------------------------------------------- helpers


def _warnings(caplog: pytest.LogCaptureFixture, vm: str, needle: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING
        and r.getMessage().startswith(f"{vm}:")
        and needle in r.getMessage()
    ]


@contextlib.asynccontextmanager
async def _service(
    tmp_path: Path, cfg: dict[str, Any]
) -> AsyncIterator[tuple[str, set[VmSession]]]:
    """serve_listener in this trio run, devices and limits from `cfg` (a parsed TOML)."""
    path = str(tmp_path / "vmbusd.sock")
    sessions: set[VmSession] = set()
    factory = VmDevices(cfg, "test.toml")
    async with trio.open_nursery() as n:
        await n.start(lambda **kw: server.serve_listener(path, factory, sessions=sessions, **kw))
        yield path, sessions
        n.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def _vm(path: str, name: str) -> AsyncIterator[SimulatedVm]:
    vm = SimulatedVm(ram_size=32 << 20, vm_id=name)
    try:
        conn = await attach.connect(path)
        async with trio.open_nursery() as nursery:
            await vm.start(conn, nursery)
            yield vm
            nursery.cancel_scope.cancel()
        with contextlib.suppress(Exception):
            await conn.aclose()
    finally:
        vm.close()


def _session(sessions: set[VmSession], name: str) -> VmSession:
    (s,) = [s for s in sessions if s.label == name]
    return s


async def _ask(ch: Channel, body: bytes) -> bytes:
    await ch.send([OutPacket(6, 0, 1, [body])])
    (pkt,) = await ch.receive()
    return bytes(pkt.payload).rstrip(b"\0")


# --------------------------------------------------------------------------- the VM limits


async def test_control_flood_is_slowed_and_logged_once_the_other_vm_keeps_its_pace(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A VM posting 600 control messages at 500/s (burst 50) waits >= 1.1 s for them,
    one log line; the other VM's echoes and its own channel opens go at their pace."""
    caplog.set_level(logging.INFO, logger="vmbus")
    cfg = {
        "device": [{"type": "echo"}],
        "vm": {"flood": {"limits": {"control_rate": 500, "control_burst": 50}}},
    }
    async with _service(tmp_path, cfg) as (path, sessions):
        async with _vm(path, "good") as good, _vm(path, "flood") as flood:
            (offer,) = good.find_offers(ECHO_IF_TYPE)
            gch = await good.open_channel(offer, RING)
            t0 = trio.current_time()
            await echo_mixed(gch.channel, 300, MAXP)
            alone = trio.current_time() - t0
            msg = p.TlConnectRequest(uuid.uuid4(), uuid.uuid4()).encode()
            flood_s = 0.0
            good_s: list[float] = []

            host = _session(sessions, "flood")

            async def do_flood() -> None:
                nonlocal flood_s
                t, done = trio.current_time(), host._posts_done + 600
                for _ in range(600):
                    await flood.post_raw(msg)
                while host._posts_done < done:  # the last ones may wait in the socket
                    await trio.sleep(0.01)
                flood_s = trio.current_time() - t

            async with trio.open_nursery() as n:
                n.start_soon(do_flood)
                await trio.sleep(0.1)  # the flood is over its burst by now
                for _ in range(5):
                    t = trio.current_time()
                    with trio.fail_after(5):
                        await echo_mixed(gch.channel, 300, MAXP)
                        # control messages of its own: a GPADL made and torn down
                        handle, pfns = await good.create_buffer_gpadl(offer.relid, 1 << 16)
                        await good.teardown_buffer_gpadl(offer.relid, handle, pfns)
                    good_s.append(trio.current_time() - t)
            snap = _session(sessions, "flood").snapshot()
            await good.close_channel(gch)
    assert flood_s >= (600 - 50) / 500 * 0.9, flood_s
    assert max(good_s) < max(1.0, 20 * alone), (alone, good_s)
    assert len(_warnings(caplog, "flood", "control messages/s")) == 1
    assert not _warnings(caplog, "good", "limits.")
    assert 0 < snap["limits"]["hits"]["control_rate"] <= 600  # type: ignore[index]


async def test_subchannels_beyond_the_channel_limit_are_refused_once_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """channels = 3: the device asking for 8 sub-channels gets 2 (the guest hears
    `got:2`), one log line; the other VM's same request gets all 8."""
    caplog.set_level(logging.INFO, logger="vmbus")
    cfg = {
        "device": [{"type": "test_limits:SubEcho"}],
        "vm": {"greedy": {"limits": {"channels": 3}}},
    }
    async with _service(tmp_path, cfg) as (path, sessions):
        async with _vm(path, "good") as good, _vm(path, "greedy") as greedy:
            answers = []
            for vm in (greedy, good):
                (offer,) = vm.find_offers(SUB_IF)
                gch = await vm.open_channel(offer, RING)
                with trio.fail_after(5):
                    answers.append(await _ask(gch.channel, b"sub:8"))
                await vm.close_channel(gch)
            snap = _session(sessions, "greedy").snapshot()
    assert answers == [b"got:2", b"got:8"]
    assert len(_warnings(caplog, "greedy", "limits.channels")) == 1
    assert not _warnings(caplog, "good", "limits.")
    assert snap["limits"]["hits"]["channels"] == 1  # type: ignore[index]


async def test_open_beyond_the_channel_limit_gets_a_failed_open_result(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A device that offers 3 channels up front to a VM limited to 1: the second
    OPENCHANNEL is answered with a failure status, one log line; the first channel
    and the other VM's three work."""
    caplog.set_level(logging.INFO, logger="vmbus")
    cfg = {
        "device": [{"type": "test_limits:SubEcho", "sub_channels": 2}],
        "vm": {"tight": {"limits": {"channels": 1}}},
    }
    async with _service(tmp_path, cfg) as (path, _sessions):
        async with _vm(path, "good") as good, _vm(path, "tight") as tight:
            first, second, _third = sorted(tight.find_offers(SUB_IF), key=lambda o: o.relid)
            ch1 = await tight.open_channel(first, RING)
            with pytest.raises(HostError, match=r"OPENCHANNEL .* refused"):
                await tight.open_channel(second, RING)
            with trio.fail_after(5):
                assert await _ask(ch1.channel, b"hi") == b"hi"
            await tight.close_channel(ch1)
            opened = [await good.open_channel(o, RING) for o in good.find_offers(SUB_IF)]
            for gch in opened:
                with trio.fail_after(5):
                    assert await _ask(gch.channel, b"hi") == b"hi"
                await good.close_channel(gch)
    assert len(opened) == 3
    assert len(_warnings(caplog, "tight", "limits.channels")) == 1
    assert not _warnings(caplog, "good", "limits.")


async def test_gpadl_bytes_beyond_the_limit_get_a_failed_gpadl_created(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """gpadl_bytes = 1 MiB: the ring (128 KiB) fits, a 1 MiB buffer does not:
    GPADL_CREATED with a failure status and one log line; the other VM registers it."""
    caplog.set_level(logging.INFO, logger="vmbus")
    cfg = {"device": [{"type": "echo"}], "vm": {"hoard": {"limits": {"gpadl_bytes": 1 << 20}}}}
    async with _service(tmp_path, cfg) as (path, sessions):
        async with _vm(path, "good") as good, _vm(path, "hoard") as hoard:
            for vm in (hoard, good):
                (offer,) = vm.find_offers(ECHO_IF_TYPE)
                gch = await vm.open_channel(offer, RING)
                if vm is hoard:
                    with pytest.raises(HostError, match=r"GPADL .* refused"):
                        await vm.create_buffer_gpadl(offer.relid, 1 << 20)
                else:
                    handle, pfns = await vm.create_buffer_gpadl(offer.relid, 1 << 20)
                    await vm.teardown_buffer_gpadl(offer.relid, handle, pfns)
                with trio.fail_after(5):
                    await echo_mixed(gch.channel, 100, MAXP)
                await vm.close_channel(gch)
            snap = _session(sessions, "hoard").snapshot()
    assert len(_warnings(caplog, "hoard", "limits.gpadl_bytes")) == 1
    assert not _warnings(caplog, "good", "limits.")
    assert snap["limits"]["hits"]["gpadl_bytes"] == 1  # type: ignore[index]


async def test_limit_hits_are_exported_per_vm(tmp_path: Path) -> None:
    from vmbus.stats import render_prometheus

    cfg = {"device": [{"type": "echo"}], "vm": {"hoard": {"limits": {"gpadl_bytes": 1 << 20}}}}
    async with _service(tmp_path, cfg) as (path, sessions):
        async with _vm(path, "hoard") as hoard:
            (offer,) = hoard.find_offers(ECHO_IF_TYPE)
            with pytest.raises(HostError):
                await hoard.create_buffer_gpadl(offer.relid, 2 << 20)
            text = render_prometheus(server.service_snapshot(sessions))
    assert 'vmbusd_limit_hits_total{limit="gpadl_bytes",session="",vm="hoard"} 1.0' in text
    assert 'vmbusd_limit_hits_total{limit="control_rate",session="",vm="hoard"} 0.0' in text


async def test_outstanding_requests_past_the_budget_wait_unread_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """outstanding_requests = 8 over two channels: a VM flooding 60 requests on each
    never has more than 8 out at once (its rings wait unread: back-pressure, one log
    line) and takes >= 120 / 8 * HOLD_S; the other VM's 120 go at once."""
    caplog.set_level(logging.INFO, logger="vmbus")
    cfg = {
        "device": [{"type": "test_limits:HeldEcho", "sub_channels": 1}],
        "vm": {"flood": {"limits": {"outstanding_requests": 8}}},
    }
    HeldEcho.peak.clear()
    took: dict[str, float] = {}

    async def flood(vm: SimulatedVm) -> None:
        chans = [await vm.open_channel(o, RING) for o in vm.find_offers(HELD_IF)]
        t = trio.current_time()

        async def one(ch: Channel) -> None:
            await ch.send([OutPacket(6, 0, i, [b"r%d" % i]) for i in range(60)])
            got = 0
            while got < 60:
                got += len(await ch.receive())

        with trio.fail_after(20):
            async with trio.open_nursery() as n:
                for gch in chans:
                    n.start_soon(one, gch.channel)
        took[vm.vm_id] = trio.current_time() - t
        for gch in chans:
            await vm.close_channel(gch)

    async with _service(tmp_path, cfg) as (path, sessions):
        async with _vm(path, "good") as good, _vm(path, "flood") as bad:
            async with trio.open_nursery() as n:
                n.start_soon(flood, bad)
                n.start_soon(flood, good)
            snap = _session(sessions, "flood").snapshot()
    assert HeldEcho.peak["flood"] == 8
    assert HeldEcho.peak["good"] >= 120  # all at once (and the idle channel's slot)
    assert took["flood"] >= 120 / 8 * HOLD_S * 0.9, took
    assert took["good"] < 10 * HOLD_S, took
    assert len(_warnings(caplog, "flood", "limits.outstanding_requests")) == 1
    assert not _warnings(caplog, "good", "limits.")
    assert snap["limits"]["hits"]["outstanding_requests"] > 0  # type: ignore[index]
    assert snap["limits"]["requests_in_use"] == 2  # type: ignore[index]  # idle: one a channel


# --------------------------------------------------------------------------- the parts


async def test_request_budget_waits_when_spent_and_reports_one_episode() -> None:
    waits: list[bool] = []
    budget = RequestBudget(4, waits.append)
    assert await budget.acquire(3) == 3
    assert await budget.acquire(3) == 1  # what is left
    got: list[int] = []

    async def taker() -> None:
        got.append(await budget.acquire(2))

    async with trio.open_nursery() as n:
        n.start_soon(taker)
        n.start_soon(taker)
        await trio.sleep(0.05)
        assert got == [] and waits == [True, False]  # both wait; one episode
        budget.release(3)  # 1 in use: the waiters get 2 and 1
    assert sorted(got) == [1, 2] and budget.in_use == 4
    budget.release(4)
    with pytest.raises(ValueError):
        budget.release(1)


def test_token_bucket_gives_the_burst_then_the_rate() -> None:
    now = [0.0]
    bucket = TokenBucket(100, 10, lambda: now[0])
    now[0] = 5.0  # the clock is first read at the first take
    assert [bucket.take() for _ in range(10)] == [0.0] * 10
    assert bucket.take() == pytest.approx(0.01)
    assert bucket.take() == pytest.approx(0.02)  # its turn is after the one before
    now[0] += 1.0
    assert bucket.full_before_take()
    assert bucket.take() == 0.0


def test_limits_config_layers_and_defaults() -> None:
    cfg = {
        "device": [{"type": "echo"}],
        "limits": {"channels": 16, "control_rate": 100},
        "vm": {"db": {"limits": {"channels": 4}}},
    }
    factory = VmDevices(cfg, "vm.toml")
    assert factory.limits_for("db") == VmLimits(channels=4, control_rate=100)
    assert factory.limits_for("other") == VmLimits(channels=16, control_rate=100)
    assert [d.name for d in factory.for_vm("db")] == ["echo"]  # limits alone: default devices
    assert limits_from_config({}, "x", None) == VmLimits()
    assert VmLimits().channels == DEFAULT_CHANNELS


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"channel": 4}, "vm.toml: [limits]: unknown limit 'channel' (did you mean 'channels'?)"),
        ({"channels": "4"}, "vm.toml: [limits]: channels must be an integer in 1..2047"),
        ({"channels": 0}, "channels must be an integer in 1..2047, not 0"),
        ({"gpadl_bytes": 100}, "gpadl_bytes must be an integer in 4096.."),
        ({"control_rate": True}, "control_rate must be an integer"),
        ({"control_burst": 2.5}, "control_burst must be an integer"),
    ],
)
def test_bad_limits_are_one_line_errors_naming_the_key(table: object, message: str) -> None:
    cfg = {"device": [{"type": "echo"}], "limits": table}
    with pytest.raises(LimitsError, match=re.escape(message)) as e:
        VmDevices(cfg, "vm.toml")
    assert "\n" not in str(e.value)


def test_bad_per_vm_limits_name_the_vm() -> None:
    cfg = {"device": [{"type": "echo"}], "vm": {"db": {"limits": {"outstanding_requests": -1}}}}
    with pytest.raises(LimitsError, match=r"\[vm\.db\.limits\]: outstanding_requests must"):
        VmDevices(cfg, "vm.toml")
    with pytest.raises(LimitsError, match="must be a table"):
        parse_limits(5, "[limits]")


async def test_storvsc_takes_a_budget_slot_per_request_and_none_idle(tmp_path: Path) -> None:
    """storvsc holds one slot of the VM's budget per request from the ring to its
    completion: with outstanding_requests = 6, 40 concurrent slow READs are never
    more than 6 at the backend at once; idle, the controller holds no slot."""
    from devices.storvsc.protocol import SCSI_IF_TYPE
    from devices.storvsc.vsc import attach_storvsc

    lun = {
        "backend": "faulty",
        "inner": {"backend": "memory", "size": 1 << 20},
        "read_latency": 50,  # ms
    }
    cfg = {
        "device": [{"type": "storvsc", "lun": [lun]}],
        "vm": {"tight": {"limits": {"outstanding_requests": 6}}},
    }
    async with _service(tmp_path, cfg) as (path, sessions):
        async with _vm(path, "tight") as vm:
            (offer,) = vm.find_offers(SCSI_IF_TYPE)
            async with attach_storvsc(vm, offer) as hba:
                budget = _session(sessions, "tight").limits.requests  # type: ignore[union-attr]
                peak = 0

                async def watch() -> None:
                    nonlocal peak
                    while True:
                        peak = max(peak, budget.in_use)
                        await trio.sleep(0.005)

                async with trio.open_nursery() as n:
                    n.start_soon(watch)
                    t = trio.current_time()
                    async with trio.open_nursery() as reads:
                        for i in range(40):
                            reads.start_soon(hba.read, 0, i, 1)
                    took = trio.current_time() - t
                    n.cancel_scope.cancel()
                assert peak == 6, peak
                assert took >= 40 / 6 * 0.05 * 0.9, took
                await trio.sleep(0.1)
                assert budget.in_use == 0  # an idle controller holds nothing
