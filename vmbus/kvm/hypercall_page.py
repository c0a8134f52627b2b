"""The code the VMM writes into the guest's hypercall page: x86-64 that traps to the VMM
with port I/O, because this KVM has no Hyper-V emulation (no VMCALL handling).

Linux (`hv_do_hypercall`, `hv_do_fast_hypercall8`) calls the page with the TLFS x64
register convention: rcx = hypercall input value (the "control": call code in bits 0-15,
fast bit 16, variable header size 17-26, rep count 32-43, rep start 48-59), rdx = input
GPA (fast: first input value), r8 = output GPA (fast: second input value); the status
comes back in rax. The stub keeps every other register as it found it (the flags
excepted), so a guest that trusts no clobber list still works.

    0x00  48 81 f9 5d 00 01 00   cmp  rcx, 0x1005d       ; fast HvSignalEvent, no rep, no varhead?
    0x07  75 15                  jne  slow
    0x09  48 89 d0               mov  rax, rdx
    0x0c  48 c1 e8 20            shr  rax, 32            ; flag number and reserved bits must be 0
    0x10  75 0c                  jne  slow
    0x12  51                     push rcx
    0x13  89 d0                  mov  eax, edx           ; the connection id: what datamatch sees
    0x15  31 c9                  xor  ecx, ecx           ; status SUCCESS unless the VMM sets rcx
    0x17  e7 SS                  out  SIGNAL_PORT, eax
    0x19  48 89 c8               mov  rax, rcx
    0x1c  59                     pop  rcx
    0x1d  c3                     ret
    slow:
    0x1e  89 c8                  mov  eax, ecx           ; low half of the control, for the log
    0x20  e7 HH                  out  HYPERCALL_PORT, eax
    0x22  c3                     ret                     ; rax = the status the VMM wrote

The register contract for the VMM:
- A 4-byte write to SIGNAL_PORT is a fast HvSignalEvent whose flag number is 0; the value
  is the connection id. A port ioeventfd with datamatch on a channel's connection id
  (KVM_IOEVENTFD_FLAG_PIO | DATAMATCH, len 4) fires that channel's kick eventfd inside
  KVM, with no exit and status SUCCESS. When no ioeventfd matches, KVM exits
  (KVM_EXIT_IO, out): the VMM calls `HyperVPartition.signal_port_exit(vcpu, value)` and
  writes the status it returns into **rcx** (KVM_SET_REGS); the stub moves it to rax.
- A 4-byte write to HYPERCALL_PORT is any other hypercall: at that exit rcx, rdx and r8
  hold the guest's values untouched (eax = low 32 bits of rcx). The VMM calls
  `HyperVPartition.handle_hypercall(vcpu, rcx, rdx, r8)` and writes the status into
  **rax**.
- The ports are 8-bit immediates (`out imm8, eax`) so that rdx survives to the exit.
  Nothing on a PC uses 0xe4/0xe5 (the defaults); a VMM that has a device there passes
  other ports. A VMM that wants to be sure an exit came from the stub checks that the
  guest's RIP (translated) lies in the hypercall page, at `signal_out` or
  `hypercall_out` (or just past them: 2 bytes; whether KVM reports the `out` or the
  next instruction depends on whether it decoded or emulated the `out`).
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_SIGNAL_PORT = 0xE4
DEFAULT_HYPERCALL_PORT = 0xE5

FAST_SIGNAL_EVENT_CONTROL = 0x1005D  # HVCALL_SIGNAL_EVENT | HV_HYPERCALL_FAST_BIT


@dataclass(frozen=True)
class HypercallStub:
    """The stub's bytes for two ports, and where its two `out` instructions sit."""

    signal_port: int = DEFAULT_SIGNAL_PORT
    hypercall_port: int = DEFAULT_HYPERCALL_PORT

    signal_out = 0x17  # offset of `out SIGNAL_PORT, eax`
    hypercall_out = 0x20  # offset of `out HYPERCALL_PORT, eax`

    def __post_init__(self) -> None:
        for name, port in (("signal", self.signal_port), ("hypercall", self.hypercall_port)):
            if not 0 <= port <= 0xFF:
                raise ValueError(f"{name} port {port:#x}: the stub needs an 8-bit port")
        if self.signal_port == self.hypercall_port:
            raise ValueError("the signal and hypercall ports must differ")

    @property
    def code(self) -> bytes:
        """The machine code (35 bytes), as listed in this module's docstring."""
        return bytes(
            [
                *(0x48, 0x81, 0xF9, 0x5D, 0x00, 0x01, 0x00),  # cmp rcx, 0x1005d
                *(0x75, 0x15),  # jne slow
                *(0x48, 0x89, 0xD0),  # mov rax, rdx
                *(0x48, 0xC1, 0xE8, 0x20),  # shr rax, 32
                *(0x75, 0x0C),  # jne slow
                0x51,  # push rcx
                *(0x89, 0xD0),  # mov eax, edx
                *(0x31, 0xC9),  # xor ecx, ecx
                *(0xE7, self.signal_port),  # out SIGNAL_PORT, eax
                *(0x48, 0x89, 0xC8),  # mov rax, rcx
                0x59,  # pop rcx
                0xC3,  # ret
                *(0x89, 0xC8),  # slow: mov eax, ecx
                *(0xE7, self.hypercall_port),  # out HYPERCALL_PORT, eax
                0xC3,  # ret
            ]
        )
