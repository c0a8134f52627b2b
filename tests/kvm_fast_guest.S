/*
 * The fast tier's guest (tests/test_kvm_fast_tier.py): run by the real KvmVm against a
 * real `vmbusd serve`, it walks the emulated Hyper-V surface as hv_vmbus would, with a
 * real interrupt path (its own IDT, the in-kernel LAPIC enabled, `sti; hlt`):
 *   CPUID leaves 0x40000000-5, the MSRs, the hypercall page, SIMP/SIEFP/SINT2/SCONTROL;
 *   the bad input of issue 8 (each status, or #GP, recorded); INITIATE_CONTACT -> the
 *   VERSION_RESPONSE in its SIMP slot by interrupt; REQUESTOFFERS with the SIMP moved
 *   while a message sits in its slot; GPADL + OPENCHANNEL for the echo offer's ring;
 *   one inband packet and a fast HvSignalEvent -> the echo comes back and its relid's
 *   SIEFP bit raises the SINT interrupt; a second one with the SIEFP moved while its
 *   flag is set.
 * The test writes the message inputs (posts: 256 bytes each), the ring pages and pktlen
 * before the run, and reads results, msglog, events and seen after it. Entered like
 * vmlinux (long mode, identity map of the low 4 GiB, IF=0). Ends with `out 0x31, 0xf4`;
 * an unexpected exception ends with 0xee. Slot 66 counts stray vectors (32-255).
 */
	.set	OUTSIDE, 0x80000000	/* above the test's 64 MiB of RAM, below 4 GiB */
	.set	MSR_GUEST_OS_ID, 0x40000000
	.set	MSR_HYPERCALL, 0x40000001
	.set	MSR_VP_INDEX, 0x40000002
	.set	MSR_TSC_FREQUENCY, 0x40000022
	.set	MSR_APIC_FREQUENCY, 0x40000023
	.set	MSR_SCONTROL, 0x40000080
	.set	MSR_SVERSION, 0x40000081
	.set	MSR_SIEFP, 0x40000082
	.set	MSR_SIMP, 0x40000083
	.set	MSR_EOM, 0x40000084
	.set	MSR_SINT2, 0x40000092
	.set	MSR_SINT3, 0x40000093
	.set	LAPIC, 0xfee00000

	.macro	RESULT slot
	mov	%rax, \slot*8(%rbx)
	.endm
	.macro	GP_RESULT slot		/* 1 if the last MSR access took #GP */
	mov	%r12, \slot*8(%rbx)
	.endm
	.macro	STAGE n
	movq	$\n, results+67*8(%rip)
	.endm

	.code64
	.section .text
	.globl _start
_start:
	lea	stack_top(%rip), %rsp
	lea	results(%rip), %rbx
	STAGE	1

	/* CPUID 0x40000000..0x40000005 -> results 0..23 (eax, ebx, ecx, edx each) */
	mov	$0x40000000, %r13d
	lea	results(%rip), %rdi
1:	mov	%r13d, %eax
	xor	%ecx, %ecx
	cpuid
	mov	%eax, %eax
	mov	%rax, 0(%rdi)
	mov	%ebx, %ebx
	mov	%rbx, 8(%rdi)
	mov	%ecx, %ecx
	mov	%rcx, 16(%rdi)
	mov	%edx, %edx
	mov	%rdx, 24(%rdi)
	add	$32, %rdi
	inc	%r13d
	cmp	$0x40000006, %r13d
	jne	1b
	lea	results(%rip), %rbx

	/* the IDT first, so that a #GP below is recorded: 0-31 stop, 13 records and
	   skips the 2-byte rdmsr/wrmsr, 32-255 count + EOI, 0xf3 is SINT2's handler */
	STAGE	2
	xor	%edi, %edi
1:	lea	spurious_isr(%rip), %rax
	lea	exc_isr(%rip), %rdx
	cmp	$32, %edi
	cmovb	%rdx, %rax
	call	set_gate
	inc	%edi
	cmp	$256, %edi
	jne	1b
	mov	$13, %edi
	lea	gp_isr(%rip), %rax
	call	set_gate
	mov	$0xf3, %edi
	lea	sint_isr(%rip), %rax
	call	set_gate
	lidt	idtr(%rip)
	/* the local APIC: software-enable it (SVR bit 8, spurious vector 0xff) */
	mov	$LAPIC, %eax
	movl	$0x1ff, 0xf0(%rax)

	/* the MSRs: guest OS id (written, read back), VP index, frequencies, SVERSION */
	STAGE	3
	mov	$MSR_GUEST_OS_ID, %ecx
	mov	$0x8100000006010000, %rax
	call	wrmsr64
	mov	$MSR_GUEST_OS_ID, %ecx
	call	rdmsr64
	RESULT	24
	mov	$MSR_VP_INDEX, %ecx
	call	rdmsr64
	RESULT	25
	mov	$MSR_TSC_FREQUENCY, %ecx
	call	rdmsr64
	RESULT	26
	mov	$MSR_APIC_FREQUENCY, %ecx
	call	rdmsr64
	RESULT	27
	mov	$MSR_SVERSION, %ecx
	call	rdmsr64
	RESULT	28

	/* the hypercall page (read back), SIMP, SIEFP, SINT2 = vector 0xf3, SCONTROL */
	mov	$MSR_HYPERCALL, %ecx
	lea	hcpage+1(%rip), %rax
	call	wrmsr64
	mov	$MSR_HYPERCALL, %ecx
	call	rdmsr64
	RESULT	29
	lea	simp(%rip), %rax
	mov	%rax, cursimp(%rip)
	mov	$MSR_SIMP, %ecx
	or	$1, %rax
	call	wrmsr64
	lea	siefp(%rip), %rax
	mov	%rax, cursiefp(%rip)
	mov	$MSR_SIEFP, %ecx
	or	$1, %rax
	call	wrmsr64
	mov	$MSR_SINT2, %ecx
	mov	$0xf3, %eax
	call	wrmsr64
	mov	$MSR_SCONTROL, %ecx
	mov	$1, %eax
	call	wrmsr64

	/* bad input: each gets its TLFS status (rax) or #GP (r12), never a crash */
	STAGE	4
	mov	$OUTSIDE, %rdx		/* 32: HvPostMessage input outside RAM */
	xor	%r8d, %r8d
	call	post
	RESULT	32
	mov	$1, %rdx		/* 33: input above the GPA space */
	shl	$52, %rdx
	call	post
	RESULT	33
	lea	badpost+0xf08(%rip), %rdx	/* 34: 256 bytes of input crossing a page */
	call	post
	RESULT	34
	lea	posts+4*256(%rip), %rdx	/* 35: a payload of 241 bytes */
	call	post
	RESULT	35
	mov	$0x99, %ecx		/* 36: a hypercall code nobody offers */
	lea	posts(%rip), %rdx
	call	hcpage
	RESULT	36
	mov	$0x1005c, %ecx		/* 37: HvPostMessage as a fast call */
	lea	posts(%rip), %rdx
	call	hcpage
	RESULT	37
	mov	$0x0800005c, %ecx	/* 38: a reserved control bit (27) */
	lea	posts(%rip), %rdx
	call	hcpage
	RESULT	38
	mov	$0x5d, %ecx		/* 39: slow HvSignalEvent, input outside RAM */
	mov	$OUTSIDE, %rdx
	call	hcpage
	RESULT	39
	lea	posts+5*256(%rip), %rdx	/* 40: unknown connection, output outside RAM */
	mov	$OUTSIDE, %r8
	call	post
	RESULT	40
	mov	$MSR_SIMP, %ecx		/* 41/42: SIMP outside RAM: #GP, unchanged */
	mov	$OUTSIDE+1, %rax
	call	wrmsr64
	GP_RESULT 41
	mov	$MSR_SIMP, %ecx
	call	rdmsr64
	RESULT	42
	mov	$MSR_SIEFP, %ecx	/* 43/44: SIEFP outside RAM: #GP, unchanged */
	mov	$OUTSIDE+1, %rax
	call	wrmsr64
	GP_RESULT 43
	mov	$MSR_SIEFP, %ecx
	call	rdmsr64
	RESULT	44
	mov	$MSR_SINT2, %ecx	/* 45/46: SINT2 with reserved vector 5: #GP, kept */
	mov	$5, %eax
	call	wrmsr64
	GP_RESULT 45
	mov	$MSR_SINT2, %ecx
	call	rdmsr64
	RESULT	46
	mov	$MSR_SINT3, %ecx	/* 47: vector 5 masked is allowed (as KVM) */
	mov	$0x10005, %eax
	call	wrmsr64
	GP_RESULT 47
	mov	$MSR_EOM, %ecx		/* 48: EOM with nothing pending: no #GP, no-op */
	xor	%eax, %eax
	call	wrmsr64
	GP_RESULT 48
	mov	$MSR_VP_INDEX, %ecx	/* 49: a read-only MSR written: #GP */
	mov	$7, %eax
	call	wrmsr64
	GP_RESULT 49
	mov	$0x40000199, %ecx	/* 50: an MSR not offered, read: #GP */
	call	rdmsr64
	GP_RESULT 50
	mov	$MSR_HYPERCALL, %ecx	/* 51: hypercall page outside RAM: #GP */
	mov	$OUTSIDE+1, %rax
	call	wrmsr64
	GP_RESULT 51
	mov	$0x40000199, %ecx	/* 52: an MSR not offered, written: #GP */
	xor	%eax, %eax
	call	wrmsr64
	GP_RESULT 52

	/* INITIATE_CONTACT (the output GPA outside RAM: ignored, no output) */
	STAGE	5
	sti
	lea	posts+0*256(%rip), %rdx
	mov	$OUTSIDE, %r8
	call	post
	RESULT	56
	mov	$15, %edi		/* VERSION_RESPONSE */
	call	wait_seen

	/* REQUESTOFFERS with interrupts off; once a message sits in the slot, move the
	   SIMP to another page (the slot goes with it), then take the interrupt */
	STAGE	6
	cli
	lea	posts+1*256(%rip), %rdx
	xor	%r8d, %r8d
	call	post
	RESULT	57
	lea	simp+512(%rip), %rsi
	mov	$200000000, %ecx
1:	mov	(%rsi), %eax
	test	%eax, %eax
	jnz	2f
	pause
	dec	%ecx
	jnz	1b
2:	lea	simp2(%rip), %rax
	mov	%rax, cursimp(%rip)
	mov	$MSR_SIMP, %ecx
	or	$1, %rax
	call	wrmsr64
	GP_RESULT 60
	mov	simp2+512(%rip), %eax	/* 61: the message came along */
	RESULT	61
	sti
	mov	$4, %edi		/* ALLOFFERS_DELIVERED */
	call	wait_seen

	/* the echo offer's relid into GPADL_HEADER and OPENCHANNEL; post both */
	STAGE	7
	mov	offer_relid(%rip), %eax
	mov	%eax, posts+2*256+16+8(%rip)
	mov	%eax, posts+3*256+16+8(%rip)
	lea	posts+2*256(%rip), %rdx
	call	post
	RESULT	58
	mov	$10, %edi		/* GPADL_CREATED */
	call	wait_seen
	lea	posts+3*256(%rip), %rdx
	call	post
	RESULT	59
	mov	$6, %edi		/* OPENCHANNEL_RESULT */
	call	wait_seen

	/* one packet in the send ring (the test wrote its bytes), then the fast
	   HvSignalEvent on the offer's connection id: the echo comes back */
	STAGE	8
	mov	pktlen(%rip), %eax
	mov	%eax, ring(%rip)	/* the send ring's write_index */
	mfence
	mov	$0x1005d, %ecx
	mov	offer_conn(%rip), %edx
	xor	%r8d, %r8d
	call	hcpage
	RESULT	62
1:	cli
	cmpq	$0, evcount(%rip)
	jne	2f
	sti
	hlt
	jmp	1b
2:	sti

	/* consume the echo (read_index = write_index), a second packet and signal with
	   interrupts off; once its flag is in the SIEFP slot, move the SIEFP to another
	   page (the flags go with it), then take the interrupt */
	STAGE	9
	cli
	mov	evcount(%rip), %r13
	mov	ring+2*4096(%rip), %eax
	mov	%eax, ring+2*4096+4(%rip)
	mov	pktlen2(%rip), %eax
	mov	%eax, ring(%rip)
	mfence
	mov	$0x1005d, %ecx
	mov	offer_conn(%rip), %edx
	xor	%r8d, %r8d
	call	hcpage
	RESULT	63
	lea	siefp+512(%rip), %rsi
	mov	$200000000, %ecx
1:	mov	(%rsi), %rax
	or	8(%rsi), %rax
	or	16(%rsi), %rax
	or	24(%rsi), %rax
	test	%rax, %rax
	jnz	2f
	pause
	dec	%ecx
	jnz	1b
2:	lea	siefp2(%rip), %rax
	mov	%rax, cursiefp(%rip)
	mov	$MSR_SIEFP, %ecx
	or	$1, %rax
	call	wrmsr64
	GP_RESULT 53
	mov	siefp2+512(%rip), %rax	/* 54: the flags came along */
	RESULT	54
1:	cli
	cmp	evcount(%rip), %r13
	jne	2f
	sti
	hlt
	jmp	1b
2:	sti

	STAGE	10
	mov	irqcount(%rip), %rax
	RESULT	64
	mov	msgcount(%rip), %rax
	RESULT	65
	mov	$0x31, %al
	out	%al, $0xf4
	hlt

/* ---------------------------------------------------------------- helpers */

/* wrmsr of rax to MSR ecx; r12 = 1 when it took #GP (gp_isr sets it) */
wrmsr64:
	xor	%r12d, %r12d
	mov	%rax, %rdx
	shr	$32, %rdx
	wrmsr
	ret

/* rdmsr of MSR ecx into rax (64 bits); r12 = 1 when it took #GP */
rdmsr64:
	xor	%r12d, %r12d
	xor	%eax, %eax
	xor	%edx, %edx
	rdmsr
	shl	$32, %rdx
	mov	%eax, %eax
	or	%rdx, %rax
	ret

/* HvPostMessage: rdx = input GPA, r8 = output GPA -> rax = status */
post:
	mov	$0x5c, %ecx
	call	hcpage
	ret

/* sleep (sti; hlt) until the SINT handler has seen a message of type edi */
wait_seen:
	lea	seen(%rip), %rsi
1:	cli
	cmpb	$0, (%rsi,%rdi)
	jne	2f
	sti
	hlt
	jmp	1b
2:	sti
	ret

/* IDT gate edi -> handler rax (64-bit interrupt gate, this code segment) */
set_gate:
	lea	idt(%rip), %rsi
	mov	%edi, %edx
	shl	$4, %rdx
	add	%rdx, %rsi
	mov	%ax, 0(%rsi)
	mov	%cs, %dx
	mov	%dx, 2(%rsi)
	movw	$0x8e00, 4(%rsi)
	mov	%rax, %rdx
	shr	$16, %rdx
	mov	%dx, 6(%rsi)
	shr	$16, %rdx
	mov	%edx, 8(%rsi)
	movl	$0, 12(%rsi)
	ret

/* ---------------------------------------------------------------- handlers */

gp_isr:
	mov	$1, %r12
	addq	$2, 8(%rsp)		/* past the 2-byte rdmsr/wrmsr */
	add	$8, %rsp		/* the error code */
	iretq

exc_isr:
	mov	$0xee, %al
	out	%al, $0xf4
	hlt

spurious_isr:
	incq	results+66*8(%rip)
	push	%rax
	mov	$LAPIC, %eax
	movl	$0, 0xb0(%rax)
	pop	%rax
	iretq

/* SINT2: take every message from the (current) SIMP slot 2 into msglog, EOM when one
   is pending behind it; OR the SIEFP slot 2 flags into events; EOI the LAPIC */
sint_isr:
	push	%rax
	push	%rcx
	push	%rdx
	push	%rsi
	push	%rdi
	push	%r8
	incq	irqcount(%rip)
1:	mov	cursimp(%rip), %rsi
	add	$512, %rsi
	mov	(%rsi), %eax
	test	%eax, %eax
	jz	3f
	mov	msgcount(%rip), %rdi
	and	$15, %rdi
	shl	$8, %rdi
	lea	msglog(%rip), %r8
	add	%r8, %rdi
	push	%rsi
	mov	$32, %ecx
	rep movsq
	pop	%rsi
	incq	msgcount(%rip)
	mov	16(%rsi), %eax		/* the VMBus message type */
	cmp	$32, %eax
	jae	2f
	lea	seen(%rip), %r8
	movb	$1, (%r8,%rax)
	cmp	$1, %eax		/* OFFERCHANNEL: child_relid, connection_id */
	jne	2f
	mov	16+184(%rsi), %eax
	mov	%eax, offer_relid(%rip)
	mov	16+192(%rsi), %eax
	mov	%eax, offer_conn(%rip)
2:	movzbl	5(%rsi), %r8d		/* message_flags: msg_pending */
	movl	$0, (%rsi)
	mfence
	test	$1, %r8b
	jz	1b
	mov	$MSR_EOM, %ecx
	xor	%eax, %eax
	xor	%edx, %edx
	wrmsr
	jmp	1b
3:	mov	cursiefp(%rip), %rsi
	add	$512, %rsi
	lea	events(%rip), %rdi
	mov	$32, %ecx
4:	xor	%eax, %eax
	xchg	%rax, (%rsi)
	test	%rax, %rax
	jz	5f
	or	%rax, (%rdi)
	incq	evcount(%rip)
5:	add	$8, %rsi
	add	$8, %rdi
	dec	%ecx
	jnz	4b
	mov	$LAPIC, %eax
	movl	$0, 0xb0(%rax)
	pop	%r8
	pop	%rdi
	pop	%rsi
	pop	%rdx
	pop	%rcx
	pop	%rax
	iretq

	.section .data
	.balign 16
idtr:	.word	4095
	.quad	idt
	.balign 8
pktlen:	.quad	0		/* the test: bytes of the packet it wrote in the send ring */
offer_relid: .quad 0
offer_conn: .quad 0
cursimp: .quad	0
cursiefp: .quad	0
pktlen2: .quad	0		/* the test: the send ring's write_index after packet 2 */
irqcount: .quad	0
msgcount: .quad	0
evcount: .quad	0
seen:	.skip	32		/* seen[type] = 1 once a message of that type arrived */
	.balign	8
events:	.skip	256		/* every SIEFP slot 2 flag the handler took */

	.section .bss
	.balign 4096
hcpage:	.skip	4096
simp:	.skip	4096
simp2:	.skip	4096
siefp:	.skip	4096
siefp2:	.skip	4096
idt:	.skip	4096
posts:	.skip	4096		/* the test: 256-byte HvPostMessage inputs */
badpost: .skip	4096
msglog:	.skip	4096		/* 16 x 256: every message the handler took */
ring:	.skip	4 * 4096	/* send header, send data, receive header, receive data */
results: .skip	4096
	.balign 16
stack:	.skip	8192
stack_top:
