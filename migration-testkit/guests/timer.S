# timer.S -- LAPIC timer in TSC-deadline mode (x2APIC), ring-0 handler counts
# ticks and re-arms the deadline; the ring-3 loop reports every new tick count.
# With load argument 1 (idle mode) a ring-0 loop halts until each tick and
# reports it instead, so the vCPU thread sleeps between ticks.
#
# Detects: tick count going backwards (ERR_BACKWARDS); a lost timer (disarmed
# deadline, masked LVT, lost IDT/TSS/APIC state...) shows as no progress, which
# the host turns into a timeout; wrong vectors/exceptions report ERR_VECTOR|v.
#
# Progress (port 0x10): tick count (low 32 bits), strictly increasing.
# Info     (port 0x12): TSC_DELTA once, at start.
# Errors   (port 0x11): 0xD0000001 tick count went backwards,
#                       0xC0000002 no x2APIC, 0xC0000003 no TSC-deadline timer,
#                       plus the common codes of common.S.

        .set RING3_RFLAGS, 0x3202       # IOPL=3, IF=1
        .set TIMER_VECTOR, 0x20
        .set SPURIOUS_VECTOR, 0xff
        .set TSC_DELTA, 3000000         # TSC cycles per tick: <= 1 kHz up to a 3 GHz TSC
        .set ARG_IDLE, 1                # load argument: halt between ticks (idle_loop)
        .set V_TICKS, VARS_ADDR + 0x40
        .set MSR_APIC_BASE, 0x1b
        .set MSR_TSC_DEADLINE, 0x6e0
        .set MSR_X2APIC_TPR, 0x808
        .set MSR_X2APIC_EOI, 0x80b
        .set MSR_X2APIC_SVR, 0x80f
        .set MSR_X2APIC_LVT_TIMER, 0x832
        .include "common.S"

# Ring 0: install the gates, switch the LAPIC to x2APIC mode, enable it,
# program LVT timer = TSC-deadline mode (bits 18:17 = 10b), arm the first tick.
guest_init:
        mov     $1, %eax
        xor     %ecx, %ecx
        cpuid
        test    $(1 << 21), %ecx
        mov     $0xC0000002, %eax
        jz      report_error
        test    $(1 << 24), %ecx
        mov     $0xC0000003, %eax
        jz      report_error

        mov     $TIMER_VECTOR, %edi
        lea     timer_isr(%rip), %rsi
        call    idt_set_gate
        mov     $SPURIOUS_VECTOR, %edi
        lea     spurious_isr(%rip), %rsi
        call    idt_set_gate

        mov     $MSR_APIC_BASE, %ecx
        rdmsr
        or      $0xc00, %eax            # EN | EXTD (x2APIC)
        wrmsr
        xor     %edx, %edx
        mov     $MSR_X2APIC_SVR, %ecx
        mov     $(0x100 | SPURIOUS_VECTOR), %eax        # APIC software enable
        wrmsr
        mov     $MSR_X2APIC_TPR, %ecx
        xor     %eax, %eax
        wrmsr
        mov     $MSR_X2APIC_LVT_TIMER, %ecx
        mov     $((2 << 17) | TIMER_VECTOR), %eax
        wrmsr
        call    arm_timer
        cmpq    $ARG_IDLE, V_ARG
        je      idle_loop
        ret

# Idle mode (load argument ARG_IDLE): stay in ring 0 and halt until each tick,
# so the vCPU sleeps in the host between ticks instead of spinning in ring 3.
# r8 = last reported tick count.
idle_loop:
        mov     $TSC_DELTA, %eax
        mov     $PORT_INFO, %edx
        out     %eax, %dx
        xor     %r8d, %r8d
1:      sti                             # the STI shadow covers the HLT: no lost wake-up
        hlt
        cli
        mov     V_TICKS, %rax
        cmp     %r8, %rax
        je      1b
        jb      2f
        mov     %rax, %r8
        mov     $PORT_PROGRESS, %edx
        out     %eax, %dx
        jmp     1b
2:      mov     $0xD0000001, %eax
        jmp     report_error

# arm_timer: IA32_TSC_DEADLINE = rdtsc + TSC_DELTA. Clobbers RAX, RCX, RDX.
arm_timer:
        rdtsc
        shl     $32, %rdx
        or      %rdx, %rax
        add     $TSC_DELTA, %rax
        mov     %rax, %rdx
        shr     $32, %rdx
        mov     $MSR_TSC_DEADLINE, %ecx
        wrmsr
        ret

# Ring 0 (emulated on kvm_pvm: keep it short).
timer_isr:
        push    %rax
        push    %rcx
        push    %rdx
        incq    V_TICKS
        call    arm_timer
        mov     $MSR_X2APIC_EOI, %ecx
        xor     %eax, %eax
        xor     %edx, %edx
        wrmsr
        pop     %rdx
        pop     %rcx
        pop     %rax
        iretq

spurious_isr:                           # no EOI for spurious interrupts
        iretq

# Ring 3: r8 = last reported tick count.
guest_main:
        mov     $TSC_DELTA, %eax
        mov     $PORT_INFO, %edx
        out     %eax, %dx
        xor     %r8d, %r8d
1:      mov     V_TICKS, %rax
        cmp     %r8, %rax
        jne     2f
        pause
        jmp     1b
2:      jb      3f
        mov     %rax, %r8
        mov     $PORT_PROGRESS, %edx
        out     %eax, %dx
        jmp     1b
3:      mov     $0xD0000001, %eax
        jmp     report_error
