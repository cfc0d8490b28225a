# counter_avx.S -- a ring-3 counter mirrored in GPRs and in all lanes of
# twelve YMM registers; checks the mirrors every 2^CHECK_SHIFT iterations and
# reports progress after each successful check.
#
# Detects: lost/stale GPRs, lost YMM state (including the upper 128 bits and
# the ymm8-ymm11 registers), lost XCR0/CR4.OSXSAVE (#UD -> ERR_VECTOR|6).
#
# Progress (port 0x10): counter >> CHECK_SHIFT (low 32 bits), strictly increasing.
# Errors   (port 0x11): 0xA00001nn  GPR mirror nn mismatch (1=r9 2=r10 3=r11 4=rbx 5=r12)
#                       0xA00002nn  ymm nn does not hold the expected value in every lane
#                       plus the common codes of common.S.

        .set RING3_RFLAGS, 0x3002       # IOPL=3, IF=0
        .set CHECK_SHIFT, 18
        .include "common.S"

# Ring 0: require XSAVE+AVX (CPUID.1:ECX 26, 28) and AVX2 (CPUID.7.0:EBX 5),
# then enable CR4.OSXSAVE and XCR0 = x87|SSE|AVX. No AVX instruction here.
guest_init:
        mov     $1, %eax
        xor     %ecx, %ecx
        cpuid
        and     $((1 << 26) | (1 << 28)), %ecx
        cmp     $((1 << 26) | (1 << 28)), %ecx
        jne     1f
        mov     $7, %eax
        xor     %ecx, %ecx
        cpuid
        test    $(1 << 5), %ebx
        jz      1f
        mov     %cr4, %rax
        or      $(1 << 18), %rax        # OSXSAVE
        mov     %rax, %cr4
        xor     %ecx, %ecx
        xor     %edx, %edx
        mov     $7, %eax                # XCR0 = x87 | SSE | AVX
        xsetbv
        ret
1:      mov     $ERR_NO_FEATURE, %eax
        jmp     report_error

# Ring 3.  r8 = counter c; mirrors: r9 = c, r10 = ~c, r11 = 3c, rbx = -c,
# r12 = c ^ 0x5a5a..; ymm0-5 = c in all 4 lanes, ymm6-11 = ~c in all lanes,
# ymm12 = 1 in all lanes (increment), ymm13-15 scratch.
guest_main:
        xor     %r8d, %r8d
        xor     %r9d, %r9d
        mov     $-1, %r10
        xor     %r11d, %r11d
        xor     %ebx, %ebx
        movabs  $0x5a5a5a5a5a5a5a5a, %r12
        mov     $1, %eax
        vmovq   %rax, %xmm12
        vpbroadcastq %xmm12, %ymm12
        .irp    r, 0, 1, 2, 3, 4, 5
        vpxor   %ymm\r, %ymm\r, %ymm\r
        .endr
        .irp    r, 6, 7, 8, 9, 10, 11
        vpcmpeqq %ymm\r, %ymm\r, %ymm\r
        .endr

loop:
        inc     %r8
        inc     %r9
        dec     %r10
        add     $3, %r11
        dec     %rbx
        lea     -1(%r8), %r13           # r12 ^= (c-1) ^ c keeps r12 = c ^ K
        xor     %r8, %r13
        xor     %r13, %r12
        .irp    r, 0, 1, 2, 3, 4, 5
        vpaddq  %ymm12, %ymm\r, %ymm\r
        .endr
        .irp    r, 6, 7, 8, 9, 10, 11
        vpsubq  %ymm12, %ymm\r, %ymm\r
        .endr
        test    $((1 << CHECK_SHIFT) - 1), %r8d
        jnz     loop

        # --- check every mirror against r8.
        cmp     %r8, %r9
        mov     $0xA0000101, %eax
        jne     report_error
        mov     %r8, %rcx
        not     %rcx
        cmp     %rcx, %r10
        mov     $0xA0000102, %eax
        jne     report_error
        lea     (%r8, %r8, 2), %rcx
        cmp     %rcx, %r11
        mov     $0xA0000103, %eax
        jne     report_error
        mov     %r8, %rcx
        neg     %rcx
        cmp     %rcx, %rbx
        mov     $0xA0000104, %eax
        jne     report_error
        movabs  $0x5a5a5a5a5a5a5a5a, %rcx
        xor     %r8, %rcx
        cmp     %rcx, %r12
        mov     $0xA0000105, %eax
        jne     report_error

        vmovq   %r8, %xmm13
        vpbroadcastq %xmm13, %ymm13     # ymm13 = c in all lanes
        vpcmpeqq %ymm15, %ymm15, %ymm15
        vpxor   %ymm13, %ymm15, %ymm15  # ymm15 = ~c in all lanes
        .irp    r, 0, 1, 2, 3, 4, 5
        vpcmpeqq %ymm13, %ymm\r, %ymm14
        vpmovmskb %ymm14, %ecx
        mov     $(0xA0000200 + \r), %eax
        cmp     $-1, %ecx
        jne     report_error
        .endr
        .irp    r, 6, 7, 8, 9, 10, 11
        vpcmpeqq %ymm15, %ymm\r, %ymm14
        vpmovmskb %ymm14, %ecx
        mov     $(0xA0000200 + \r), %eax
        cmp     $-1, %ecx
        jne     report_error
        .endr

        mov     %r8, %rax
        shr     $CHECK_SHIFT, %rax
        mov     $PORT_PROGRESS, %edx
        out     %eax, %dx
        jmp     loop
