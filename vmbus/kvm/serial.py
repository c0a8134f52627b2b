"""A 16550A UART at 0x3f8 (IRQ 4): the guest's console.

Enough of the chip for Linux's 8250 driver to detect a 16550A and use it both polled
(the console, which waits on LSR.THRE) and interrupt-driven (the tty, which waits for
the THRE interrupt after setting IER.ETBEI). Transmission is instantaneous: THR is
always empty, so LSR reports THRE|TEMT and a THRE interrupt is pending whenever ETBEI
is on and the guest has not yet taken it (reading IIR or writing THR clears it, as on
the real chip). The IRQ line follows IIR; `set_irq` is called only on a change.

Runs on the vCPU thread that took the exit; `feed` (host input) may come from any
thread, hence the lock.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable

import trio

COM1_PORT = 0x3F8
COM1_IRQ = 4

RBR_THR = 0  # DLL when LCR.DLAB
IER = 1  # DLM when LCR.DLAB
IIR_FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

IER_RDI = 0x01
IER_THRI = 0x02
IER_RLSI = 0x04
IER_MSI = 0x08

IIR_NO_INT = 0x01
IIR_MSI = 0x00
IIR_THRI = 0x02
IIR_RDI = 0x04
IIR_RLSI = 0x06
IIR_FIFO_ENABLED = 0xC0

FCR_ENABLE_FIFO = 0x01
FCR_CLEAR_RCVR = 0x02

LCR_DLAB = 0x80

MCR_LOOP = 0x10

LSR_DR = 0x01
LSR_THRE = 0x20
LSR_TEMT = 0x40

MSR_DCD = 0x80
MSR_DSR = 0x20
MSR_CTS = 0x10

RX_FIFO = 16


class Console:
    """Everything the guest printed, searchable while it runs (`--until REGEX`)."""

    def __init__(self, sink: Callable[[bytes], None] | None = None) -> None:
        self._buf = bytearray()
        self._lock = threading.Lock()
        self._sink = sink
        self.changed = threading.Event()

    def write(self, data: bytes) -> None:
        with self._lock:
            self._buf += data
        if self._sink is not None:
            self._sink(data)
        self.changed.set()

    def data(self) -> bytes:
        with self._lock:
            return bytes(self._buf)

    def text(self) -> str:
        return self.data().decode("utf-8", "replace")

    def search(self, pattern: str | re.Pattern[str]) -> re.Match[str] | None:
        return re.search(pattern, self.text(), re.MULTILINE)

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float) -> re.Match[str] | None:
        """Block (a thread, not trio) until the console matches or timeout seconds pass."""
        deadline = time.monotonic() + timeout
        while True:
            self.changed.clear()
            m = self.search(pattern)
            if m is not None:
                return m
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.changed.wait(min(left, 0.5))

    async def until(
        self, pattern: str | re.Pattern[str], timeout: float | None = None, poll: float = 0.05
    ) -> re.Match[str] | None:
        """Wait in trio until the console matches `pattern` (`--until REGEX`); None at
        the timeout. Polls: the vCPU thread never has to reach into trio per byte."""
        seen = -1
        with trio.move_on_after(float("inf") if timeout is None else timeout):
            while True:
                size = len(self._buf)
                if size != seen:
                    seen = size
                    m = self.search(pattern)
                    if m is not None:
                        return m
                await trio.sleep(poll)
        return None


class Serial16550:
    """The UART's registers; io_read/io_write take port offsets from the machine's bus."""

    def __init__(
        self, output: Callable[[bytes], None], set_irq: Callable[[int], None] | None = None
    ) -> None:
        self._output = output
        self._set_irq = set_irq
        self._lock = threading.Lock()
        self.ier = 0
        self.lcr = 0x03
        self.mcr = 0x08  # OUT2
        self.scr = 0
        self.dll = 0x0C
        self.dlm = 0
        self.fcr = 0
        self.rx = bytearray()
        self.thr_ipending = False
        self._irq_level = 0
        self.tx_bytes = 0

    # ---- the IRQ line

    def _iir(self) -> int:
        if self.ier & IER_RDI and self.rx:
            iid = IIR_RDI
        elif self.ier & IER_THRI and self.thr_ipending:
            iid = IIR_THRI
        else:
            iid = IIR_NO_INT
        return iid | (IIR_FIFO_ENABLED if self.fcr & FCR_ENABLE_FIFO else 0)

    def _update_irq(self) -> None:
        level = 0 if self._iir() & IIR_NO_INT else 1
        if level != self._irq_level:
            self._irq_level = level
            if self._set_irq is not None:
                self._set_irq(level)

    # ---- the bus

    def io_read(self, port: int, size: int) -> int:
        offset = port & 7
        with self._lock:
            if offset == RBR_THR:
                if self.lcr & LCR_DLAB:
                    return self.dll
                value = self.rx.pop(0) if self.rx else 0
                self._update_irq()
                return value
            if offset == IER:
                return self.dlm if self.lcr & LCR_DLAB else self.ier
            if offset == IIR_FCR:
                iir = self._iir()
                if iir & 0x0F == IIR_THRI:
                    self.thr_ipending = False
                    self._update_irq()
                return iir
            if offset == LCR:
                return self.lcr
            if offset == MCR:
                return self.mcr
            if offset == LSR:
                return LSR_THRE | LSR_TEMT | (LSR_DR if self.rx else 0)
            if offset == MSR:
                if self.mcr & MCR_LOOP:  # loopback: outputs appear on the inputs
                    m = self.mcr
                    return (
                        ((m & 0x02) << 3)
                        | ((m & 0x01) << 5)
                        | ((m & 0x04) << 4)
                        | ((m & 0x08) << 4)
                    )
                return MSR_DCD | MSR_DSR | MSR_CTS
            return self.scr

    def io_write(self, port: int, size: int, value: int) -> None:
        offset = port & 7
        value &= 0xFF
        out = b""
        with self._lock:
            if offset == RBR_THR:
                if self.lcr & LCR_DLAB:
                    self.dll = value
                    return
                if self.mcr & MCR_LOOP:
                    if len(self.rx) < RX_FIFO:
                        self.rx.append(value)
                else:
                    out = bytes((value,))
                    self.tx_bytes += 1
                self.thr_ipending = True  # sent at once: THR is empty again
                self._update_irq()
            elif offset == IER:
                if self.lcr & LCR_DLAB:
                    self.dlm = value
                    return
                old = self.ier
                self.ier = value & 0x0F
                if self.ier & IER_THRI and not old & IER_THRI:
                    self.thr_ipending = True  # THR is empty: the chip raises THRE now
                self._update_irq()
            elif offset == IIR_FCR:
                self.fcr = value & 0xC9
                if value & FCR_CLEAR_RCVR:
                    self.rx.clear()
                self._update_irq()
            elif offset == LCR:
                self.lcr = value
            elif offset == MCR:
                self.mcr = value & 0x1F
            elif offset == SCR:
                self.scr = value
        if out:
            self._output(out)

    # ---- host side

    def feed(self, data: bytes) -> int:
        """Host input: bytes the guest will read from RBR. Returns how many fitted."""
        with self._lock:
            n = min(len(data), RX_FIFO - len(self.rx))
            self.rx += data[:n]
            self._update_irq()
            return n
