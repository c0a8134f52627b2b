"""The loopback backend: every frame the guest sends comes back to it (the
benchmark's peer, and the default when a NIC names no backend)."""

from __future__ import annotations

import trio

from devices.netvsc.backends.base import Deliver, Frame, NetBackend, NicInfo, Offloads


class LoopbackBackend(NetBackend):
    """Frames out are frames in, on the same batch boundary."""

    name = "loopback"
    offloads = Offloads()  # the guest gets finished frames back, checksums filled

    def __init__(self) -> None:
        super().__init__()
        self._deliver: Deliver | None = None

    async def run(
        self,
        nic: NicInfo,
        deliver: Deliver,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        self._deliver = deliver
        try:
            task_status.started()
            await trio.sleep_forever()
        finally:
            self._deliver = None

    def transmit(self, queue: int, frames: list[Frame]) -> None:
        if self._deliver is None:
            self.tx_dropped += len(frames)
            return
        self.tx_frames += len(frames)
        self.rx_frames += len(frames)
        self._deliver(frames)
