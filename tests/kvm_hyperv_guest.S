/*
 * A tiny 64-bit guest for tests/test_kvm_hyperv.py: Linux 6.1's first Hyper-V steps
 * (guest OS id, hypercall page, SIMP, SINT2, SCONTROL) and then calls through the
 * hypercall page the VMM filled with vmbus/kvm/hypercall_page.py's stub, recording
 * rax, rcx, rdx and r8 after each call; then it takes the message the VMM put in its
 * SIMP slot and writes EOM. Entered like vmlinux (long mode, identity map, IF=0).
 *
 * results (8-byte slots): call k (0..4) at 4k: rax, rcx, rdx, r8 after the call;
 *  20 message_type seen in SIMP slot 2   21 its first 8 payload bytes   22 r9 at the end
 */
	.code64
	.section .text
	.globl _start
_start:
	lea	stack_top(%rip), %rsp
	lea	results(%rip), %rbx

	mov	$0x40000000, %ecx	/* HV_X64_MSR_GUEST_OS_ID */
	mov	$0x06010000, %eax
	mov	$0x81000000, %edx
	wrmsr
	mov	$0x40000001, %ecx	/* HV_X64_MSR_HYPERCALL: read, enable + page */
	rdmsr
	lea	hcpage(%rip), %rax
	or	$1, %rax
	mov	%rax, %rdx
	shr	$32, %rdx
	wrmsr
	mov	$0x40000083, %ecx	/* SIMP */
	lea	simp(%rip), %rax
	or	$1, %rax
	mov	%rax, %rdx
	shr	$32, %rdx
	wrmsr
	mov	$0x40000092, %ecx	/* SINT2: vector 0xf3, unmasked */
	mov	$0xf3, %eax
	xor	%edx, %edx
	wrmsr
	mov	$0x40000080, %ecx	/* SCONTROL: enable */
	mov	$1, %eax
	xor	%edx, %edx
	wrmsr

	mov	$0x9999, %r9
	/* 0: fast HvSignalEvent on a connection with an ioeventfd: no exit */
	mov	$0x1005d, %rcx
	mov	$0x2000, %rdx
	mov	$0x8888, %r8
	call	hcpage
	call	record
	/* 1: fast HvSignalEvent on a connection without one: the VMM answers in rcx */
	mov	$0x1005d, %rcx
	mov	$0x2001, %rdx
	mov	$0x8888, %r8
	call	hcpage
	call	record
	/* 2: HvPostMessage from an input page */
	mov	$0x5c, %rcx
	lea	msgin(%rip), %rdx
	mov	$0x8888, %r8
	call	hcpage
	call	record
	/* 3: a hypercall nobody offers */
	mov	$0x99, %rcx
	mov	$0x1234, %rdx
	mov	$0x8888, %r8
	call	hcpage
	call	record
	/* 4: fast HvSignalEvent with flag number 1: takes the slow path */
	mov	$0x1005d, %rcx
	mov	$0x100002000, %rdx
	mov	$0x8888, %r8
	call	hcpage
	call	record

	/* the VMM's answer to the post: poll SIMP slot 2, take it, EOM */
	lea	results(%rip), %rbx
	lea	simp+512(%rip), %rsi
	mov	$10000000, %rdi
1:	mov	(%rsi), %eax
	test	%eax, %eax
	jnz	2f
	dec	%rdi
	jnz	1b
2:	mov	%rax, 160(%rbx)
	mov	16(%rsi), %rax
	mov	%rax, 168(%rbx)
	movl	$0, (%rsi)
	mov	$0x40000084, %ecx	/* EOM */
	xor	%eax, %eax
	xor	%edx, %edx
	wrmsr
	mov	%r9, 176(%rbx)

	mov	$0x31, %al
	out	%al, $0xf4		/* debug exit */
	hlt

/* store rax, rcx, rdx, r8 in the next four slots (rbx advances) */
record:
	mov	%rax, 0(%rbx)
	mov	%rcx, 8(%rbx)
	mov	%rdx, 16(%rbx)
	mov	%r8, 24(%rbx)
	add	$32, %rbx
	ret

	.section .data
	.balign 4096
msgin:	.long	4, 0, 1, 5		/* connection 4, rsvd, type 1, 5 bytes */
	.ascii	"hello"
	.skip	235

	.section .bss
	.balign 4096
hcpage:	.skip	4096
simp:	.skip	4096
results: .skip	256
	.balign 16
stack:	.skip	4096
stack_top:
