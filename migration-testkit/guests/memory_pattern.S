# memory_pattern.S -- fills every page of [1 MiB, end) with a pattern that
# depends on the address and a per-page generation, then loops forever over
# passes: each pass verifies every page against the generation it must hold
# and rewrites 1/8 of the pages with a new generation (so it keeps dirtying
# memory for live migration to chase).
#
# Working set: pages [1 MiB, end), skipping [3 GiB, 4 GiB) (the usual MMIO hole),
# where end = min(RAM size, RSI at entry if non-zero, identity-mapped end
# (32 GiB)) rounded down to 4 KiB.
#
# Pattern: qword at address a of a page with generation g holds a ^ (g * GEN_MUL).
# Pass k >= 1 rewrites the pages with (address >> 12) % 8 == k % 8 with
# generation k, so before pass k page p (r = (p >> 12) % 8) must hold
# generation j = (k-1) - ((k-1-r) mod 8), or 0 if j <= 0. A stale copy of a
# page (an old generation) is therefore detected as well as a corrupted byte.
#
# Progress (port 0x10): number of completed passes k (1, 2, ...).
# Info     (port 0x12): at start: end low 32 bits, end high 32 bits;
#                       before ERR_MISMATCH: failing address low, high.
# Errors   (port 0x11): 0xB0000001 a qword does not hold its expected value,
#                       ERR_RAM_SMALL if the working set has no page,
#                       plus the common codes of common.S.

        .set RING3_RFLAGS, 0x3002       # IOPL=3, IF=0
        .set BUF_START, 0x100000
        .set HOLE_START, 0xC0000000
        .set HOLE_END, 0x100000000
        .set GEN_MUL, 0x9E3779B97F4A7C15
        .set ERR_MISMATCH, 0xB0000001
        .include "common.S"

guest_init:
        ret

# Ring 3. r15 = end, r14 = pass k, r13 = GEN_MUL, rdi = page, rbx = g * GEN_MUL.
guest_main:
        mov     V_RAM_SIZE, %r15
        mov     V_ARG, %rax
        test    %rax, %rax
        jz      1f
        cmp     %r15, %rax
        cmovb   %rax, %r15
1:      mov     V_MAPPED_END, %rax
        cmp     %r15, %rax
        cmovb   %rax, %r15
        and     $-4096, %r15
        cmp     $(BUF_START + 4096), %r15
        mov     $ERR_RAM_SMALL, %eax
        jb      report_error
        mov     $PORT_INFO, %edx
        mov     %r15, %rax
        out     %eax, %dx
        shr     $32, %rax
        out     %eax, %dx
        movabs  $GEN_MUL, %r13

        # Pass 0: every page gets generation 0.
        xor     %r14d, %r14d
        xor     %ebx, %ebx
        mov     $BUF_START, %edi
2:      call    fill_page
        call    next_page
        cmp     %r15, %rdi
        jb      2b

pass:   inc     %r14
        mov     $BUF_START, %edi
page:   mov     %rdi, %r12              # r12 = page residue r
        shr     $12, %r12
        and     $7, %r12
        lea     -1(%r14), %rcx          # j = (k-1) - ((k-1-r) & 7)
        mov     %rcx, %rdx
        sub     %r12, %rdx
        and     $7, %rdx
        sub     %rdx, %rcx
        jg      3f
        xor     %ecx, %ecx
3:      mov     %rcx, %rbx
        imul    %r13, %rbx
        call    verify_page
        mov     %r14, %rdx              # rewrite if r == k % 8
        and     $7, %edx
        cmp     %rdx, %r12
        jne     4f
        mov     %r14, %rbx
        imul    %r13, %rbx
        call    fill_page
4:      call    next_page
        cmp     %r15, %rdi
        jb      page
        mov     %r14, %rax
        mov     $PORT_PROGRESS, %edx
        out     %eax, %dx
        jmp     pass

# fill_page: page RDI, RBX = g * GEN_MUL. Clobbers RAX, RCX, RSI.
fill_page:
        lea     4096(%rdi), %rcx
        mov     %rdi, %rsi
1:      mov     %rsi, %rax
        xor     %rbx, %rax
        mov     %rax, (%rsi)
        lea     8(%rsi), %rax
        xor     %rbx, %rax
        mov     %rax, 8(%rsi)
        add     $16, %rsi
        cmp     %rcx, %rsi
        jb      1b
        ret

# verify_page: page RDI, RBX = g * GEN_MUL. Clobbers RAX, RCX, RSI.
verify_page:
        lea     4096(%rdi), %rcx
        mov     %rdi, %rsi
1:      mov     (%rsi), %rax
        xor     %rsi, %rax
        cmp     %rbx, %rax
        jne     mismatch
        add     $8, %rsi
        cmp     %rcx, %rsi
        jb      1b
        ret

mismatch:
        mov     $PORT_INFO, %edx
        mov     %rsi, %rax
        out     %eax, %dx
        shr     $32, %rax
        out     %eax, %dx
        mov     $ERR_MISMATCH, %eax
        jmp     report_error

# next_page: RDI += 4 KiB, jumping over [HOLE_START, HOLE_END). Clobbers RAX.
next_page:
        add     $4096, %rdi
        mov     $HOLE_START, %eax       # (a cmp imm32 would be sign-extended)
        cmp     %rax, %rdi
        jne     1f
        movabs  $HOLE_END, %rdi
1:      ret
