# smp.S -- a self-checking guest for several vCPUs (1 to MAX_VCPUS).
#
# Entry (docs/guest-abi.md §9): the VMM starts vCPU 0 (the BSP) at `_start` in
# 64-bit mode with RDX = 0 (index), RCX = vCPU count and R8 = start mode, and:
#   START_ALL  (R8 = 0): every other vCPU at `_start` too, RDX = its index; they
#              wait for the BSP's tables, then bring themselves up;
#   START_SIPI (R8 = 1): the other vCPUs are left in wait-for-INIT
#              (KVM_MP_STATE_UNINITIALIZED); the BSP copies a real-mode trampoline
#              to TRAMPOLINE and wakes each with INIT-SIPI-SIPI through its x2APIC
#              ICR; the trampoline switches straight to long mode, and the vCPU
#              takes its index from its x2APIC ID.
#
# Every vCPU, in ring 3 with IF = 1, loops over:
#   - its heartbeat (P_HB) and contribution count (P_CONTRIB) in shared memory,
#     mirrored in r13 and r12 and compared with memory every iteration;
#   - the TSC must not be below the shared stamp V_STAMP, the highest TSC any
#     vCPU read before (then it raises the stamp to its reading, lock cmpxchg);
#   - a shared counter V_SHARED updated with `lock cmpxchg`: low half = count,
#     high half = count * GOLDEN (mod 2^32), checked on every read;
# and every CHECK_EVERY iterations (`checks`): no heartbeat or receive count of
# any vCPU went backwards; a "round" when every vCPU's heartbeat and receive count
# advanced since the last round (the BSP reports rounds as progress); the shared
# count lies between the sum of all contributions read before and after it; the
# IPI it sent last was received, or the receiver has not yet run LOST_HB
# iterations since.
#
# Every GATE_EVERY iterations it enters ring 0 (x2APIC registers are MSRs: ring 0
# only) through UD2, an exception gate: on kvm_pvm `int n` from ring 3 raises #UD
# and SYSCALL stays at CPL 3. The gate checks its LAPIC's tag and that the caller's
# R15 is its x2APIC ID (registers of another vCPU), and, if the vCPU's previous IPI
# was received and the next vCPU has started, sends the next fixed IPI (IPI_VECTOR)
# to vCPU (index + 1) mod count: a ring with one IPI in flight per sender. Every
# NMI_EVERY gates it also sends itself an NMI, whose handler sends itself a second
# one while NMIs are blocked: that one must wait for the handler's IRETQ.
#
# Every ring-0 entry (gate, IPI, NMI) first checks the LAPIC's tag: vCPU i sets
# its LVT Error register (masked) to vector LAPIC_TAG_BASE + i, so a LAPIC restored
# from another vCPU is seen at once. The IPI handler counts the IPI (P_RECV) and
# fails if the sender never sent that many (P_SENDING of the previous vCPU).
#
# Progress (port 0x10): the BSP's round count, strictly increasing.
# Info     (port 0x12): INFO_* | vCPU (markers a VMM can stop at; see below).
# Errors   (port 0x11): ERR_SMP | vCPU << 16 | K_* (the failing check), the
#                       common codes, 0xC0000002 no x2APIC.
#
# Ring-0 code is emulated instruction by instruction on kvm_pvm hosts (a gate and
# its IPI, about 45 instructions, cost about 130 us there): the handlers are short
# and rare (GATE_EVERY).

        .set SMP_GUEST, 1
        .set RING3_RFLAGS, 0x3202       # IOPL=3, IF=1
        .set MAX_VCPUS, 32
        .set START_ALL, 0
        .set START_SIPI, 1

        .set IPI_VECTOR, 0x40
        .set SPURIOUS_VECTOR, 0xff
        .set NMI_VECTOR, 2
        .set UD_VECTOR, 6
        .set LAPIC_TAG_BASE, 0x60       # LVT Error vector of vCPU i: 0x60 + i

        .set CHECK_EVERY, 1 << 10       # iterations between `checks`
        .set GATE_EVERY, 1 << 14        # iterations between ring-0 gates
        .set NMI_EVERY, 1 << 6          # gates between NMI probes
        .set LOST_HB, 1 << 22           # receiver iterations an IPI may take
        .set GOLDEN, 0x5bd1e995         # V_SHARED: high half = low half * GOLDEN

        .set TRAMPOLINE, 0x8000         # real-mode AP entry (SIPI vector 0x08)
        .set SIPI_VECTOR, TRAMPOLINE >> 12

        # Shared variables (RAM starts zeroed).
        .set SMP_VARS,  0x24000
        .set V_COUNT,   SMP_VARS + 0x00 # vCPUs (RCX of the BSP)
        .set V_MODE,    SMP_VARS + 0x08 # start mode (R8 of the BSP)
        .set V_READY,   SMP_VARS + 0x10 # BSP: tables ready, START_ALL APs go
        .set V_GDTR,    SMP_VARS + 0x20 # limit u16, base u64 (also the trampoline's)
        .set V_IDTR,    SMP_VARS + 0x30
        .set V_SHARED,  SMP_VARS + 0x40 # own cache line
        .set V_STAMP,   SMP_VARS + 0x80 # own cache line

        # Per-vCPU variables: PERCPU + index * 128.
        .set PERCPU,    0x25000
        .set PERCPU_SHIFT, 7
        .set P_HB,      0x00            # heartbeat (ring-3 iterations)
        .set P_CONTRIB, 0x08            # successful cmpxchg on V_SHARED
        .set P_SENDING, 0x10            # IPIs asked of the gate (before the ICR write)
        .set P_ROUNDS,  0x18            # rounds this vCPU saw
        .set P_GATES,   0x20            # gate calls
        .set P_RECV,    0x40            # IPIs received (the IPI handler)
        .set P_SENT,    0x48            # IPIs sent (after the ICR write)
        .set P_HB_AT_SEND, 0x50         # receiver's heartbeat when the last one was sent
        .set P_IN_NMI,  0x58            # inside the NMI handler
        .set P_NMIS,    0x60            # NMIs taken
        .set P_STARTED, 0x68            # 1 once in ring 3

        # What vCPU i last saw of vCPU j: SEEN + (i * MAX_VCPUS + j) * 32.
        .set SEEN,      0x26000
        .set S_HB,      0x00
        .set S_RECV,    0x08
        .set S_MARK_HB, 0x10            # at the last round
        .set S_MARK_RECV, 0x18

        # Stacks of vCPU i >= 1: STACKS + i * 16 KiB, ring 0 below ring 3.
        .set STACKS,    0x100000
        .set STACK_SHIFT, 14
        .set TSS_STRIDE, 0x80           # TSS of vCPU i: TSS_ADDR + i * 0x80

        .set MSR_APIC_BASE, 0x1b
        .set MSR_EFER, 0xc0000080
        .set MSR_X2APIC_ID, 0x802
        .set MSR_X2APIC_TPR, 0x808
        .set MSR_X2APIC_EOI, 0x80b
        .set MSR_X2APIC_SVR, 0x80f
        .set MSR_X2APIC_ICR, 0x830
        .set MSR_X2APIC_LVT_ERROR, 0x837
        .set ICR_FIXED, 0x4000 | IPI_VECTOR     # level assert, fixed
        .set ICR_NMI, 0x4400
        .set ICR_INIT, 0x4500
        .set ICR_SIPI, 0x4600 | SIPI_VECTOR

        # Errors: ERR_SMP | vCPU << 16 | check.
        .set ERR_SMP,       0x5c000000
        .set K_MIRROR,      0x01        # P_HB / P_CONTRIB differ from r13 / r12
        .set K_IDENTITY,    0x02        # ring-3 R15 is not this vCPU's index (on 0x12)
        .set K_TSC,         0x03        # TSC below the stamp another vCPU wrote
        .set K_SHARED,      0x04        # V_SHARED high half != low half * GOLDEN
        .set K_SUM,         0x05        # V_SHARED outside the contributions' sum
        .set K_HB_BACK,     0x06        # a heartbeat went back (vCPU on port 0x12)
        .set K_RECV_BACK,   0x07        # a receive count went back (vCPU on 0x12)
        .set K_IPI_DUP,     0x08        # an IPI arrived that was never sent
        .set K_IPI_LOST,    0x09        # the IPI sent last never arrived
        .set K_LAPIC_TAG,   0x0a        # the LAPIC is another vCPU's (its tag on 0x12)
        .set K_NMI_NESTED,  0x0b        # an NMI arrived inside the NMI handler
        .set K_BAD_COUNT,   0x0c        # vCPU count 0 or above MAX_VCPUS
        .set K_BAD_INDEX,   0x0d        # index >= count, or not the x2APIC ID
        .set ERR_NO_X2APIC, 0xC0000002

        # Info markers: INFO_* | vCPU.
        .set INFO_STARTED,  0x534d0100  # vCPU entered ring 3
        .set INFO_WAKE_INIT, 0x534d0200 # BSP: about to send INIT to vCPU
        .set INFO_WAKE_SIPI, 0x534d0300 # BSP: INIT sent, about to send the SIPIs
        .set INFO_NMI_BLOCKED, 0x534d0400 # in the NMI handler, NMIs blocked
        .set INFO_NMI_SENT, 0x534d0500  # ... and the second NMI sent

        .include "common.S"

# Every vCPU the VMM started at `_start` (RDX = index, RCX = count, R8 = mode).
smp_entry:
        test    %rdx, %rdx
        jnz     1f
        mov     %rcx, V_COUNT
        mov     %r8, V_MODE
        jmp     boot_bsp
1:      mov     %edx, %r15d             # START_ALL: wait for the BSP's tables
2:      pause
        cmpq    $0, V_READY
        je      2b
        jmp     ap_start

# BSP, ring 0, after common.S's tables.
guest_init:
        mov     $1, %eax
        xor     %ecx, %ecx
        cpuid
        test    $(1 << 21), %ecx
        mov     $ERR_NO_X2APIC, %eax
        jz      report_error
        xor     %r15d, %r15d
        mov     V_COUNT, %rax
        test    %rax, %rax
        jz      1f
        cmp     $MAX_VCPUS, %rax
        jbe     2f
1:      mov     $K_BAD_COUNT, %eax
        xor     %ecx, %ecx
        jmp     smp_fail

        # TSS and GDT descriptor of every other vCPU (vCPU 0 has common.S's).
2:      mov     $1, %esi
3:      cmp     V_COUNT, %rsi
        jae     4f
        mov     %rsi, %rdi
        shl     $STACK_SHIFT, %rdi
        add     $(STACKS + (1 << (STACK_SHIFT - 1))), %rdi
        mov     %rsi, %rdx
        shl     $7, %rdx                # TSS_STRIDE
        add     $TSS_ADDR, %rdx
        mov     %rdi, 4(%rdx)           # RSP0
        movw    $104, 0x66(%rdx)        # I/O bitmap offset
        movb    $0xff, 104 + 4(%rdx)    # bitmap end (ports 0..31 allowed)
        mov     %rdx, %rax              # 64-bit TSS descriptor, base < 16 MiB
        shl     $16, %rax
        or      $TSS_LIMIT, %rax
        movabs  $(0x89 << 40), %rdi
        or      %rdi, %rax
        mov     %rsi, %rdi
        shl     $4, %rdi
        mov     %rax, GDT_ADDR + SEL_TSS(%rdi)
        movq    $0, GDT_ADDR + SEL_TSS + 8(%rdi)
        inc     %rsi
        jmp     3b
4:      movw    $(SEL_TSS + 16 * MAX_VCPUS - 1), V_GDTR
        movq    $GDT_ADDR, V_GDTR + 2
        lgdt    V_GDTR
        movw    $(256 * 16 - 1), V_IDTR
        movq    $IDT_ADDR, V_IDTR + 2

        mov     $IPI_VECTOR, %edi
        lea     ipi_isr(%rip), %rsi
        call    idt_set_gate
        mov     $NMI_VECTOR, %edi
        lea     nmi_isr(%rip), %rsi
        call    idt_set_gate
        mov     $SPURIOUS_VECTOR, %edi
        lea     spurious_isr(%rip), %rsi
        call    idt_set_gate
        mov     $UD_VECTOR, %edi
        lea     gate(%rip), %rsi
        call    idt_set_gate

        call    cpu_init
        movq    $1, V_READY
        cmpq    $START_SIPI, V_MODE
        jne     5f
        call    wake_aps
5:      xor     %r15d, %r15d
        ret

# START_SIPI: copy the trampoline below 1 MiB, then INIT-SIPI-SIPI each AP.
# Markers on the info port before the INIT and before the SIPIs are stopping
# points for a VMM (an AP in wait-for-INIT, then in wait-for-SIPI).
wake_aps:
        lea     trampoline(%rip), %rsi
        mov     $TRAMPOLINE, %edi
        mov     $(trampoline_end - trampoline), %ecx
        rep movsb
        mov     $1, %esi
1:      cmp     V_COUNT, %rsi
        jae     2f
        mov     $PORT_INFO, %edx
        mov     $INFO_WAKE_INIT, %eax
        or      %esi, %eax
        out     %eax, %dx
        mov     $ICR_INIT, %eax
        call    send_icr
        mov     $PORT_INFO, %edx
        mov     $INFO_WAKE_SIPI, %eax
        or      %esi, %eax
        out     %eax, %dx
        mov     $ICR_SIPI, %eax
        call    send_icr
        mov     $ICR_SIPI, %eax
        call    send_icr
        inc     %rsi
        jmp     1b
2:      ret

# send_icr: EAX = ICR low, ESI = destination x2APIC ID. Clobbers RCX, RDX.
send_icr:
        mov     %esi, %edx
        mov     $MSR_X2APIC_ICR, %ecx
        wrmsr
        ret

# An AP, ring 0, R15 = its index: its own stacks, GDT, page tables, TSS, IDT.
ap_start:
        cmp     $MAX_VCPUS, %r15d
        jae     bad_index
        mov     %r15, %rax
        shl     $STACK_SHIFT, %rax
        lea     STACKS + (1 << (STACK_SHIFT - 1))(%rax), %rsp
        lgdt    V_GDTR
        lea     1f(%rip), %rax
        pushq   $SEL_KCODE
        push    %rax
        lretq
1:      mov     $SEL_KDATA, %eax
        mov     %eax, %ds
        mov     %eax, %es
        mov     %eax, %ss
        mov     %eax, %fs
        mov     %eax, %gs
        mov     $PML4_ADDR, %eax
        mov     %rax, %cr3
        mov     $0x620, %eax            # PAE | OSFXSR | OSXMMEXCPT
        mov     %rax, %cr4
        mov     %r15d, %eax
        shl     $4, %eax
        add     $SEL_TSS, %eax
        ltr     %ax
        lidt    V_IDTR
        call    cpu_init
        mov     %r15, %rax
        shl     $STACK_SHIFT, %rax
        add     $(STACKS + (1 << STACK_SHIFT)), %rax
        pushq   $SEL_UDATA
        push    %rax
        pushq   $RING3_RFLAGS
        pushq   $SEL_UCODE
        lea     guest_main(%rip), %rax
        push    %rax
        iretq

bad_index:
        mov     $K_BAD_INDEX, %eax
        mov     %r15d, %ecx
        jmp     smp_fail

# cpu_init: R15 = index. x2APIC on, software-enabled, TPR 0, the LAPIC's tag,
# checks the index against the count and the x2APIC ID.
# Clobbers RAX, RCX, RDX.
cpu_init:
        cmp     V_COUNT, %r15
        jae     bad_index
        mov     $MSR_APIC_BASE, %ecx
        rdmsr
        or      $0xc00, %eax            # EN | EXTD
        wrmsr
        xor     %edx, %edx
        mov     $MSR_X2APIC_SVR, %ecx
        mov     $(0x100 | SPURIOUS_VECTOR), %eax
        wrmsr
        mov     $MSR_X2APIC_TPR, %ecx
        xor     %eax, %eax
        wrmsr
        mov     $MSR_X2APIC_LVT_ERROR, %ecx
        lea     0x10000 + LAPIC_TAG_BASE(%r15), %eax   # masked, vector = tag
        wrmsr
        mov     $MSR_X2APIC_ID, %ecx
        rdmsr
        cmp     %r15d, %eax
        jne     bad_index
        ret

# smp_fail: EAX = check (K_*), ECX = vCPU index. Reports ERR_SMP | ECX << 16 | EAX.
smp_fail:
        and     $0xff, %ecx
        shl     $16, %ecx
        or      %ecx, %eax
        or      $ERR_SMP, %eax
        jmp     report_error

# lapic_check: returns EAX = this vCPU's x2APIC ID (its index), after checking
# that the LAPIC's tag is this vCPU's. Clobbers RCX, RDX.
lapic_check:
        mov     $MSR_X2APIC_LVT_ERROR, %ecx
        rdmsr
        movzbl  %al, %eax
        push    %rax
        mov     $MSR_X2APIC_ID, %ecx
        rdmsr
        pop     %rcx
        sub     $LAPIC_TAG_BASE, %ecx
        cmp     %eax, %ecx
        jne     1f
        ret
1:      push    %rax
        mov     %ecx, %eax              # the tag's vCPU on the info port
        mov     $PORT_INFO, %edx
        out     %eax, %dx
        pop     %rcx                    # this vCPU
        mov     $K_LAPIC_TAG, %eax
        jmp     smp_fail

# percpu_of: EAX = index -> RAX = its PERCPU block.
        .macro  PERCPU_OF reg
        shl     $PERCPU_SHIFT, \reg
        add     $PERCPU, \reg
        .endm

# Ring-0 gate: UD2 from ring 3 (#UD, IF = 0, on the TSS's RSP0 stack). EDI bit 0:
# send the next IPI of the ring; bit 1: start an NMI probe.
gate:
        push    %rax
        push    %rcx
        push    %rdx
        push    %rsi
        call    lapic_check
        mov     %eax, %esi              # ESI = index
        cmp     %eax, %r15d             # the caller's index register
        jne     5f
        test    $1, %edi
        jz      2f
        lea     1(%rsi), %eax           # next = (index + 1) mod count
        cmp     V_COUNT, %rax
        jb      1f
        xor     %eax, %eax
1:      mov     %eax, %edx
        push    %rax
        mov     $MSR_X2APIC_ICR, %ecx
        mov     $ICR_FIXED, %eax
        wrmsr
        pop     %rax
        PERCPU_OF %rax
        mov     P_HB(%rax), %rax
        mov     %esi, %ecx
        PERCPU_OF %rcx
        mov     %rax, P_HB_AT_SEND(%rcx)
        incq    P_SENT(%rcx)
2:      test    $2, %edi
        jz      3f
        mov     %esi, %edx              # NMI to itself
        mov     $MSR_X2APIC_ICR, %ecx
        mov     $ICR_NMI, %eax
        wrmsr
3:      addq    $2, 32(%rsp)            # return after the UD2
        pop     %rsi
        pop     %rdx
        pop     %rcx
        pop     %rax
        iretq
5:      mov     %r15d, %eax             # what the registers say on the info port
        mov     $PORT_INFO, %edx
        out     %eax, %dx
        mov     $K_IDENTITY, %eax
        mov     %esi, %ecx
        jmp     smp_fail

# IPI_VECTOR: count it; more IPIs than the previous vCPU sent is a duplicate.
ipi_isr:
        push    %rax
        push    %rcx
        push    %rdx
        push    %rsi
        call    lapic_check
        mov     %eax, %esi
        test    %eax, %eax              # previous = (index - 1) mod count
        jnz     1f
        mov     V_COUNT, %rax
1:      dec     %eax
        PERCPU_OF %rax
        mov     %esi, %ecx
        PERCPU_OF %rcx
        mov     P_RECV(%rcx), %rdx
        inc     %rdx
        cmp     P_SENDING(%rax), %rdx
        ja      2f
        mov     %rdx, P_RECV(%rcx)
        mov     $MSR_X2APIC_EOI, %ecx
        xor     %eax, %eax
        xor     %edx, %edx
        wrmsr
        pop     %rsi
        pop     %rdx
        pop     %rcx
        pop     %rax
        iretq
2:      mov     $K_IPI_DUP, %eax
        mov     %esi, %ecx
        jmp     smp_fail

# NMI: the odd one of each probe sends a second NMI to its own vCPU while NMIs
# are blocked (until this handler's IRETQ). The port write after it is a VM exit:
# KVM re-enters the guest next and would inject the NMI right there if NMIs were
# not blocked, which the flag P_IN_NMI would catch.
nmi_isr:
        push    %rax
        push    %rcx
        push    %rdx
        push    %rsi
        call    lapic_check
        mov     %eax, %esi
        mov     %eax, %ecx
        PERCPU_OF %rcx
        cmpq    $0, P_IN_NMI(%rcx)
        jne     2f
        movq    $1, P_IN_NMI(%rcx)
        incq    P_NMIS(%rcx)
        testq   $1, P_NMIS(%rcx)
        jz      1f
        mov     $PORT_INFO, %edx
        mov     $INFO_NMI_BLOCKED, %eax
        or      %esi, %eax
        out     %eax, %dx
        mov     %esi, %edx
        mov     $MSR_X2APIC_ICR, %ecx
        mov     $ICR_NMI, %eax
        wrmsr
        mov     $PORT_INFO, %edx
        mov     $INFO_NMI_SENT, %eax
        or      %esi, %eax
        out     %eax, %dx
        mov     %esi, %ecx
        PERCPU_OF %rcx
1:      movq    $0, P_IN_NMI(%rcx)
        pop     %rsi
        pop     %rdx
        pop     %rcx
        pop     %rax
        iretq
2:      mov     $K_NMI_NESTED, %eax
        mov     %esi, %ecx
        jmp     smp_fail

spurious_isr:                           # no EOI for spurious interrupts
        iretq

# Ring 3, every vCPU: R15 = index. Registers: R14 = own PERCPU block, RBX = the
# next vCPU's, RBP = count, R13 = heartbeat mirror, R12 = contribution mirror.
guest_main:
        mov     %r15, %r14
        PERCPU_OF %r14
        mov     V_COUNT, %rbp
        lea     1(%r15), %rbx
        cmp     %rbp, %rbx
        jb      1f
        xor     %ebx, %ebx
1:      PERCPU_OF %rbx
        movq    $1, P_STARTED(%r14)
        mov     $PORT_INFO, %edx
        mov     $INFO_STARTED, %eax
        or      %r15d, %eax
        out     %eax, %dx
        mov     P_HB(%r14), %r13
        mov     P_CONTRIB(%r14), %r12

main_loop:
        cmp     P_HB(%r14), %r13
        jne     err_mirror
        cmp     P_CONTRIB(%r14), %r12
        jne     err_mirror
        inc     %r13
        mov     %r13, P_HB(%r14)

        mov     V_STAMP, %rsi           # TSC against the shared stamp
        lfence                          # RDTSC after the load
        rdtsc
        shl     $32, %rdx
        or      %rdx, %rax
        mov     %rax, %rdi
        cmp     %rsi, %rdi
        jb      err_tsc
        mov     %rsi, %rax              # stamp = max(stamp, this reading)
1:      cmp     %rax, %rdi
        jbe     2f
        lock cmpxchg %rdi, V_STAMP
        jne     1b                      # RAX = the stamp now

2:      mov     V_SHARED, %rax          # the shared counter
3:      imul    $GOLDEN, %eax, %ecx
        mov     %rax, %rdx
        shr     $32, %rdx
        cmp     %ecx, %edx
        jne     err_shared
        lea     1(%rax), %ecx           # new low half (32 bits)
        imul    $GOLDEN, %ecx, %edx     # new high half
        shl     $32, %rdx
        or      %rdx, %rcx
        lock cmpxchg %rcx, V_SHARED
        jne     3b                      # RAX = the value now there: check it too
        inc     %r12
        mov     %r12, P_CONTRIB(%r14)

        test    $(CHECK_EVERY - 1), %r13d
        jnz     4f
        call    checks
4:      test    $(GATE_EVERY - 1), %r13d
        jnz     main_loop
        call    gate_call
        jmp     main_loop

# Ring 3: enter the gate; ask for the next IPI if the next vCPU runs and the last
# one arrived, and for an NMI probe every NMI_EVERY gates.
gate_call:
        xor     %edi, %edi
        cmpq    $0, P_STARTED(%rbx)     # its LAPIC drops fixed IPIs until enabled
        je      1f
        mov     P_RECV(%rbx), %rax
        cmp     P_SENDING(%r14), %rax
        jne     1f
        incq    P_SENDING(%r14)
        or      $1, %edi
1:      incq    P_GATES(%r14)
        testq   $(NMI_EVERY - 1), P_GATES(%r14)
        jnz     2f
        or      $2, %edi
2:      ud2                             # the gate: #UD
        ret

# Ring 3, every CHECK_EVERY iterations. Clobbers RAX, RCX, RDX, RSI, RDI, R8-R10.
checks:
        mov     %r15, %rsi              # RSI = &SEEN[index][0]
        shl     $10, %rsi               # MAX_VCPUS * 32
        add     $SEEN, %rsi
        mov     %rsi, %r10
        mov     $PERCPU, %r9
        xor     %ecx, %ecx
        mov     $1, %r8d                # every vCPU advanced since the last round
1:      mov     P_HB(%r9), %rax
        cmp     S_HB(%rsi), %rax
        jb      err_hb_back
        mov     %rax, S_HB(%rsi)
        cmp     S_MARK_HB(%rsi), %rax
        ja      2f
        xor     %r8d, %r8d
2:      mov     P_RECV(%r9), %rax
        cmp     S_RECV(%rsi), %rax
        jb      err_recv_back
        mov     %rax, S_RECV(%rsi)
        cmp     S_MARK_RECV(%rsi), %rax
        ja      3f
        xor     %r8d, %r8d
3:      add     $32, %rsi
        add     $(1 << PERCPU_SHIFT), %r9
        inc     %ecx
        cmp     %rbp, %rcx
        jb      1b

        mov     P_SENT(%r14), %rax      # the IPI sent last: arrived, or not yet due?
        cmp     %rax, P_RECV(%rbx)      # (after the scan: the receiver's heartbeat
        jae     4f                      # did not go back)
        mov     P_HB(%rbx), %rax
        sub     P_HB_AT_SEND(%r14), %rax
        cmp     $LOST_HB, %rax
        jae     err_lost

4:      test    %r8d, %r8d
        jz      7f
        mov     %r10, %rsi              # a round: marks = what was seen
        xor     %ecx, %ecx
5:      mov     S_HB(%rsi), %rax
        mov     %rax, S_MARK_HB(%rsi)
        mov     S_RECV(%rsi), %rax
        mov     %rax, S_MARK_RECV(%rsi)
        add     $32, %rsi
        inc     %ecx
        cmp     %rbp, %rcx
        jb      5b
        incq    P_ROUNDS(%r14)
        test    %r15, %r15
        jnz     7f
        mov     P_ROUNDS(%r14), %rax
        mov     $PORT_PROGRESS, %edx
        out     %eax, %dx

        # The shared count c: sum1 <= c <= sum2 + count, where sum1 and sum2 are
        # the contributions summed before and after reading c (a vCPU adds its
        # contribution after its cmpxchg), all mod 2^32.
7:      call    contributions
        mov     %eax, %r8d
        mov     V_SHARED, %eax
        mov     %eax, %r9d
        call    contributions
        add     %ebp, %eax
        sub     %r8d, %eax              # sum2 + count - sum1
        sub     %r8d, %r9d              # c - sum1
        cmp     %eax, %r9d
        ja      err_sum
        ret

# contributions: EAX = the sum of every vCPU's P_CONTRIB. Clobbers RCX, RDX.
contributions:
        xor     %eax, %eax
        xor     %ecx, %ecx
        mov     $PERCPU, %rdx
1:      add     P_CONTRIB(%rdx), %rax
        add     $(1 << PERCPU_SHIFT), %rdx
        inc     %ecx
        cmp     %rbp, %rcx
        jb      1b
        ret

err_hb_back:
        mov     $K_HB_BACK, %edi
        jmp     1f
err_recv_back:
        mov     $K_RECV_BACK, %edi
1:      mov     %ecx, %eax              # the vCPU whose count went back
        mov     $PORT_INFO, %edx
        out     %eax, %dx
        mov     %edi, %eax
        jmp     ring3_fail
err_mirror:
        mov     $K_MIRROR, %eax
        jmp     ring3_fail
err_tsc:
        mov     $K_TSC, %eax
        jmp     ring3_fail
err_shared:
        mov     $K_SHARED, %eax
        jmp     ring3_fail
err_sum:
        mov     $K_SUM, %eax
        jmp     ring3_fail
err_lost:
        mov     $K_IPI_LOST, %eax
ring3_fail:
        mov     %r15d, %ecx
        jmp     smp_fail

# The real-mode AP entry, copied to TRAMPOLINE: load the BSP's GDT, enable PAE,
# the BSP's page tables and EFER.LME, then PE and PG together (straight to
# long mode) and a far jump into 64-bit code. Position-independent: only
# absolute addresses and label differences.
        .code16
trampoline:
        cli
        cld
        mov     $(SMP_VARS >> 4), %ax
        mov     %ax, %ds
        lgdtl   V_GDTR - SMP_VARS
        mov     $0x20, %eax             # CR4.PAE
        mov     %eax, %cr4
        mov     $PML4_ADDR, %eax
        mov     %eax, %cr3
        mov     $MSR_EFER, %ecx
        rdmsr
        or      $0x100, %eax            # LME
        wrmsr
        mov     $0x80010033, %eax       # PG | WP | NE | ET | MP | PE
        mov     %eax, %cr0
        ljmpl   $SEL_KCODE, $(LOAD_ADDR + ap_sipi - _start)
trampoline_end:
        .code64

# Long mode, from the trampoline: the index is the x2APIC ID.
ap_sipi:
        mov     $SEL_KDATA, %eax
        mov     %eax, %ds
        mov     %eax, %ss
        mov     $MSR_APIC_BASE, %ecx
        rdmsr
        or      $0xc00, %eax            # EN | EXTD
        wrmsr
        mov     $MSR_X2APIC_ID, %ecx
        rdmsr
        mov     %eax, %r15d
        jmp     ap_start
