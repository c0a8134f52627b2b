/*
 * The fast tier's guest: 64-bit code entered exactly like vmlinux (long mode, identity
 * map, rsi = zero page, interrupts off) that exercises the VMM core in well under a
 * second. tests/test_kvm_core.py assembles it with `as` + `ld -Ttext=0x200000` and reads
 * `results` back from guest RAM by its symbol address.
 *
 * results layout (8-byte slots):
 *   0  magic 0x7e57                         1  rsi at entry (the zero page GPA)
 *   2  CPUID 0x40000000 eax   3 ebx  4 ecx  5 edx
 *   6  CPUID 1 ecx                           7  rdmsr 0x40000000 before the write
 *   8  rdmsr 0x40000000 after writing 0x1122334455667788
 *   9  #GP count (rdmsr 0x400000ff, wrmsr 0x400000fe: the VMM refuses both)
 *  10  1 when done                       15  the 8-byte MMIO read at 0xd0000010
 * The `gaps` entry runs the instructions kvm_pvm cannot emulate and the VMM works around:
 *  11  #BP count (int3)   12 stmxcsr at entry   13 stmxcsr after ldmxcsr 0x1fc0
 *  14  1 after fwait
 */
	.code64
	.section .text
	.globl _start
_start:
	lea	stack_top(%rip), %rsp
	lea	results(%rip), %rbx
	movq	$0x7e57, 0(%rbx)
	mov	%rsi, 8(%rbx)

	call	setup_idt

	lea	hello(%rip), %rsi
	call	puts

	/* cpuid clobbers ebx: store through rdi */
	mov	$0x40000000, %eax
	xor	%ecx, %ecx
	cpuid
	lea	results(%rip), %rdi
	mov	%eax, %eax
	mov	%rax, 16(%rdi)
	mov	%ebx, %ebx
	mov	%rbx, 24(%rdi)
	mov	%ecx, %ecx
	mov	%rcx, 32(%rdi)
	mov	%edx, %edx
	mov	%rdx, 40(%rdi)
	mov	$1, %eax
	xor	%ecx, %ecx
	cpuid
	lea	results(%rip), %rbx
	mov	%ecx, %ecx
	mov	%rcx, 48(%rbx)

	mov	$0x40000000, %ecx
	rdmsr
	shl	$32, %rdx
	or	%rdx, %rax
	mov	%rax, 56(%rbx)
	mov	$0x40000000, %ecx
	mov	$0x55667788, %eax
	mov	$0x11223344, %edx
	wrmsr
	rdmsr
	shl	$32, %rdx
	mov	%eax, %eax
	or	%rdx, %rax
	mov	%rax, 64(%rbx)
	mov	$0x400000ff, %ecx
	rdmsr
	mov	$0x400000fe, %ecx
	wrmsr

	/* ioeventfd: the matching write signals the eventfd inside KVM; the other exits */
	mov	$0x5000, %dx
	mov	$0x42, %eax
	out	%eax, (%dx)
	mov	$0x43, %eax
	out	%eax, (%dx)

	/* MMIO in the PCI hole: a write, then a read the VMM answers */
	mov	$0xd0000000, %rdi
	movl	$0xdeadbeef, 8(%rdi)
	mov	16(%rdi), %rax
	mov	%rax, 120(%rbx)

	lea	bye(%rip), %rsi
	call	puts
	movq	$1, 80(%rbx)

	mov	$0xf4, %dx
	mov	$0x31, %al
	out	%al, (%dx)
1:	cli
	hlt
	jmp	1b

/* exit-rate loop: r12 iterations of reading the UART's LSR, then the debug exit */
	.globl bench
bench:
	lea	stack_top(%rip), %rsp
	mov	$0x3fd, %dx
	mov	$20000, %ecx
2:	in	(%dx), %al
	dec	%ecx
	jnz	2b
	mov	$0xf4, %dx
	mov	$0x32, %al
	out	%al, (%dx)
3:	cli
	hlt
	jmp	3b

/* the PVM emulation gaps, with a #BP handler that counts */
	.globl gaps
gaps:
	lea	stack_top(%rip), %rsp
	call	setup_idt
	lea	results(%rip), %rbx
	int3
	stmxcsr	96(%rbx)
	movl	$0x1fc0, 120(%rbx)
	ldmxcsr	120(%rbx)
	stmxcsr	104(%rbx)
	fwait
	movq	$1, 112(%rbx)
	mov	$0xf4, %dx
	mov	$0x33, %al
	out	%al, (%dx)
5:	cli
	hlt
	jmp	5b

/* SMP: INIT and SIPI (vector 0x30) to APIC ID 1 through the in-kernel local APIC; the AP
 * starts in real mode at 0x30000, says so on port 0xf5 and sets ap_flag; the BSP waits
 * for the flag and ends with debug-exit 0x34 */
	.globl smp
smp:
	lea	stack_top(%rip), %rsp
	mov	$0xfee00000, %rdi
	movl	$0x01000000, 0x310(%rdi)	/* ICR high: destination APIC ID 1 */
	movl	$0x00004500, 0x300(%rdi)	/* INIT, level assert */
	movl	$0x01000000, 0x310(%rdi)
	movl	$0x00004630, 0x300(%rdi)	/* STARTUP, vector 0x30 -> 0x30000 */
	mov	$ap_flag, %rsi
6:	pause
	cmpw	$1, (%rsi)
	jne	6b
	mov	$0xf4, %dx
	mov	$0x34, %al
	out	%al, (%dx)
7:	cli
	hlt
	jmp	7b

/* puts(rsi): polled like Linux's 8250 console: wait for LSR.THRE, write THR */
puts:
	mov	$0x3fd, %dx
	in	(%dx), %al
	test	$0x20, %al
	jz	puts
	lodsb
	test	%al, %al
	jz	4f
	mov	$0x3f8, %dx
	out	%al, (%dx)
	jmp	puts
4:	ret

/* an IDT: #GP skips the 2-byte rdmsr/wrmsr and counts, #BP counts */
setup_idt:
	lea	gp_handler(%rip), %rax
	mov	$13, %edi
	call	set_gate
	lea	bp_handler(%rip), %rax
	mov	$3, %edi
	call	set_gate
	lidt	idtr(%rip)
	ret

/* set_gate(edi = vector, rax = handler) */
set_gate:
	shl	$4, %rdi
	lea	idt(%rip), %rcx
	add	%rcx, %rdi
	mov	%ax, 0(%rdi)
	movw	$0x10, 2(%rdi)
	movw	$0x8e00, 4(%rdi)
	shr	$16, %rax
	mov	%ax, 6(%rdi)
	shr	$16, %rax
	mov	%eax, 8(%rdi)
	movl	$0, 12(%rdi)
	ret

bp_handler:
	push	%rax
	lea	results(%rip), %rax
	incq	88(%rax)
	pop	%rax
	iretq

gp_handler:
	add	$8, %rsp		/* the error code */
	addq	$2, 0(%rsp)		/* past rdmsr/wrmsr */
	push	%rax
	lea	results(%rip), %rax
	incq	72(%rax)
	pop	%rax
	iretq

	.section .ap, "ax"
	.code16
	.globl ap_trampoline
ap_trampoline:				/* real mode, cs = 0x3000, ip = 0 */
	mov	%cs, %ax
	mov	%ax, %ds
	mov	$0xf5, %dx
	mov	$0xa9, %al
	out	%al, (%dx)
	movw	$1, (ap_flag - ap_trampoline)
8:	cli
	hlt
	jmp	8b
	.balign 4
	.globl ap_flag
ap_flag: .word	0
	.code64

	.section .data
hello:	.asciz	"tiny guest: hello\n"
bye:	.asciz	"tiny guest: done\n"
	.balign 16
idtr:	.word	256*16-1
	.quad	idt

	.section .bss
	.balign 4096
idt:	.skip	256*16
	.globl results
results: .skip	128
	.balign 16
stack:	.skip	8192
stack_top:
