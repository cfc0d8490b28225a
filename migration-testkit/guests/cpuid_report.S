# cpuid_report.S -- reports what CPUID says, from ring 3, over and over: the
# guest's view of its CPU, for tests of CPU templates and compatibility checks.
#
# Each round executes CPUID for every (leaf, subleaf) of `leaves` below and writes,
# per leaf, six values on port 0x12: leaf, subleaf, eax, ebx, ecx, edx. Then it
# writes progress = round number (1, 2, ...) on port 0x10 and spins about 2^22
# iterations before the next round, so a restored or migrated guest reports what
# CPUID says on its new host.
#
# Progress (port 0x10): round number, strictly increasing.
# Info     (port 0x12): 6 values per leaf, ROUND_LEAVES leaves per round.
# Errors   (port 0x11): the common codes of common.S only.

        .set RING3_RFLAGS, 0x3002       # IOPL=3, IF=0
        .set SPIN, 1 << 22
        .include "common.S"

guest_init:
        ret

guest_main:
        xor     %r12d, %r12d            # round
1:      inc     %r12d
        lea     leaves(%rip), %r13
2:      mov     (%r13), %eax
        mov     4(%r13), %ecx
        cmp     $0xffffffff, %eax
        je      4f
        mov     %eax, %r14d
        mov     %ecx, %r15d
        cpuid
        mov     %eax, %r8d
        mov     %edx, %r9d
        mov     $PORT_INFO, %edx
        mov     %r14d, %eax
        out     %eax, %dx
        mov     %r15d, %eax
        out     %eax, %dx
        mov     %r8d, %eax
        out     %eax, %dx
        mov     %ebx, %eax
        out     %eax, %dx
        mov     %ecx, %eax
        out     %eax, %dx
        mov     %r9d, %eax
        out     %eax, %dx
        add     $8, %r13
        jmp     2b
4:      mov     %r12d, %eax
        mov     $PORT_PROGRESS, %edx
        out     %eax, %dx
        mov     $SPIN, %ecx
5:      pause
        dec     %ecx
        jnz     5b
        jmp     1b

# (leaf, subleaf) pairs, ended by leaf 0xffffffff. Keep in step with
# CPUID_REPORT_LEAVES in src/guest/image.rs.
        .balign 8
leaves:
        .long 0, 0
        .long 1, 0
        .long 7, 0
        .long 7, 1
        .long 0xd, 0
        .long 0xd, 1
        .long 0x80000001, 0
        .long 0xffffffff, 0
