# common.S -- ring-0 bring-up shared by the migration-testkit guests.
#
# Included as the first thing in every guest's .text, so `_start` is the
# first byte of the flat image (loaded at guest-physical 0x10000, entered in
# 64-bit long mode, CPL0, IF=0, RDI = RAM size, RSI = guest argument;
# see docs/guest-abi.md).
#
# The including guest defines:
#   RING3_RFLAGS  RFLAGS for ring 3: bit 1, IOPL=3 (0x3000), IF (0x200) if it
#                 wants interrupts
#   guest_init    ring-0 routine called before dropping to ring 3 (may just `ret`)
#   guest_main    ring-3 entry point (stack = STACK3_TOP)
# and, for a guest with several vCPUs (smp.S), before including this file:
#   SMP_GUEST     (any value) every vCPU the VMM starts at `_start` first jumps
#                 to `smp_entry`, which sends the boot vCPU back to `boot_bsp`
#                 and takes the others on its own path
#
# Everything is position-independent (RIP-relative) or uses fixed absolute
# addresses below, so the object needs no relocations: build.rs checks that.
#
# Ring-0 code is emulated instruction by instruction on kvm_pvm hosts: keep it
# short and never use SSE/AVX in it.

        .set LOAD_ADDR,     0x10000     # image base (entry point)
        .set GDT_ADDR,      0x20000     # guest GDT (7 quadwords)
        .set IDT_ADDR,      0x21000     # guest IDT (256 x 16 bytes)
        .set TSS_ADDR,      0x22000     # 64-bit TSS (104 bytes)
        .set VARS_ADDR,     0x23000     # guest variables (RAM starts zeroed)
        .set PML4_ADDR,     0x30000     # guest page tables: PML4,
        .set PDPT_ADDR,     0x31000     #   one PDPT,
        .set PD_ADDR,       0x32000     #   up to PD_MAX page directories
        .set PD_MAX,        32          # => identity map of at most 32 GiB
        .set STACK0_TOP,    0x70000     # ring-0 stack (TSS.RSP0), grows down
        .set STACK3_TOP,    0x80000     # ring-3 stack, grows down

        .set V_RAM_SIZE,    VARS_ADDR + 0x00   # RDI at entry
        .set V_ARG,         VARS_ADDR + 0x08   # RSI at entry
        .set V_MAPPED_END,  VARS_ADDR + 0x10   # end of the identity map

        .set PORT_PROGRESS, 0x10
        .set PORT_ERROR,    0x11
        .set PORT_INFO,     0x12

        .set TSS_LIMIT,     104 + 4         # 104-byte TSS + 4 bitmap bytes + 0xff
        .set SEL_KCODE,     0x08
        .set SEL_KDATA,     0x10
        .set SEL_UDATA,     0x18 | 3
        .set SEL_UCODE,     0x20 | 3
        .set SEL_TSS,       0x28

        # Error codes common to all guests (port 0x11).
        .set ERR_VECTOR,    0xE0000000  # | vector: unexpected exception/interrupt
        .set ERR_NO_FEATURE,0xC0000001  # CPUID lacks a feature the guest needs
        .set ERR_RAM_SMALL, 0xC0000004  # RAM too small for this guest

        .text
        .code64
        .globl _start
_start:
        cli
        cld
        .ifdef SMP_GUEST
        jmp     smp_entry
        .endif
boot_bsp:
        mov     $STACK0_TOP, %esp
        mov     %rdi, V_RAM_SIZE
        mov     %rsi, V_ARG

        # --- page tables: identity map [0, ceil(RAM / 1 GiB) GiB), 2 MiB
        # pages, user-accessible (ring 3 touches everything), clamp to PD_MAX.
        lea     0x3fffffff(%rdi), %rcx
        shr     $30, %rcx               # rcx = GiB to map
        jnz     1f
        mov     $1, %ecx
1:      cmp     $PD_MAX, %rcx
        jbe     2f
        mov     $PD_MAX, %ecx
2:      mov     %rcx, %rax
        shl     $30, %rax
        mov     %rax, V_MAPPED_END
        movq    $(PDPT_ADDR | 7), PML4_ADDR
        xor     %eax, %eax              # PDPT[i] = PD i | P|RW|US
3:      mov     %rax, %rdx
        shl     $12, %rdx
        add     $(PD_ADDR | 7), %rdx
        mov     %rdx, PDPT_ADDR(,%rax,8)
        inc     %rax
        cmp     %rcx, %rax
        jb      3b
        shl     $9, %rcx                # rcx = number of 2 MiB entries
        xor     %eax, %eax              # PD[j] = j * 2 MiB | P|RW|US|PS
4:      mov     %rax, %rdx
        shl     $21, %rdx
        or      $0x87, %rdx
        mov     %rdx, PD_ADDR(,%rax,8)
        inc     %rax
        cmp     %rcx, %rax
        jb      4b
        mov     $PML4_ADDR, %eax
        mov     %rax, %cr3

        # --- GDT: null, kernel code/data, user data/code, 64-bit TSS.
        movabs  $0x00af9a000000ffff, %rax       # 0x08 code64, DPL0
        mov     %rax, GDT_ADDR + 0x08
        movabs  $0x00cf92000000ffff, %rax       # 0x10 data, DPL0
        mov     %rax, GDT_ADDR + 0x10
        movabs  $0x00cff2000000ffff, %rax       # 0x18 data, DPL3
        mov     %rax, GDT_ADDR + 0x18
        movabs  $0x00affa000000ffff, %rax       # 0x20 code64, DPL3
        mov     %rax, GDT_ADDR + 0x20
        movabs  $(TSS_LIMIT | ((TSS_ADDR & 0xffffff) << 16) | (0x89 << 40)), %rax
        mov     %rax, GDT_ADDR + 0x28           # 0x28 TSS (available)
        sub     $16, %rsp
        movw    $(7 * 8 - 1), (%rsp)
        movq    $GDT_ADDR, 2(%rsp)
        lgdt    (%rsp)
        add     $16, %rsp
        lea     5f(%rip), %rax          # reload CS with a far return
        pushq   $SEL_KCODE
        push    %rax
        lretq
5:      mov     $SEL_KDATA, %eax
        mov     %eax, %ds
        mov     %eax, %es
        mov     %eax, %ss
        mov     %eax, %fs
        mov     %eax, %gs

        # --- TSS: RSP0 for interrupts taken in ring 3, and an I/O permission
        # bitmap allowing ports 0..31 to ring 3 (bits zero; RAM starts zeroed)
        # followed by the 0xff terminator. Ring 3 also runs with IOPL=3, but
        # kvm_pvm hosts run ring 3 with IOPL forced to 0, so the bitmap is
        # what actually grants the port access there.
        movq    $STACK0_TOP, TSS_ADDR + 4
        movw    $104, TSS_ADDR + 0x66
        movb    $0xff, TSS_ADDR + 104 + 4
        mov     $SEL_TSS, %eax
        ltr     %ax

        # --- IDT: every vector -> its stub in isr_stubs (reports ERR_VECTOR|v).
        lea     isr_stubs(%rip), %rsi
        xor     %edi, %edi
6:      call    idt_set_gate
        add     $16, %rsi
        inc     %edi
        cmp     $256, %edi
        jb      6b
        sub     $16, %rsp
        movw    $(256 * 16 - 1), (%rsp)
        movq    $IDT_ADDR, 2(%rsp)
        lidt    (%rsp)
        add     $16, %rsp

        call    guest_init

        # --- drop to ring 3 with IOPL=3.
        pushq   $SEL_UDATA
        pushq   $STACK3_TOP
        pushq   $RING3_RFLAGS
        pushq   $SEL_UCODE
        lea     guest_main(%rip), %rax
        push    %rax
        iretq

# idt_set_gate: EDI = vector, RSI = handler address. 64-bit interrupt gate,
# DPL0, IST 0. Clobbers RAX, RDX.
idt_set_gate:
        mov     %edi, %edx
        shl     $4, %rdx
        add     $IDT_ADDR, %rdx
        mov     %rsi, %rax
        mov     %ax, (%rdx)             # offset 15:0
        movw    $SEL_KCODE, 2(%rdx)
        movw    $0x8e00, 4(%rdx)        # P, DPL0, type 0xE
        shr     $16, %rax
        mov     %ax, 6(%rdx)            # offset 31:16
        shr     $16, %rax
        mov     %eax, 8(%rdx)           # offset 63:32
        movl    $0, 12(%rdx)
        ret

# report_error: EAX = error code. Writes it to PORT_ERROR forever (works in
# ring 0 and, thanks to IOPL=3, in ring 3).
report_error:
        mov     $PORT_ERROR, %edx
1:      out     %eax, %dx
        jmp     1b

# One 16-byte stub per vector: push the vector, report ERR_VECTOR | vector.
        .balign 16
isr_stubs:
        .set    vec, 0
        .rept   256
        .balign 16
        pushq   $vec
        jmp     isr_unexpected
        .set    vec, vec + 1
        .endr

# Reports the low 32 bits of the 4 qwords above the vector on PORT_INFO
# (error code and/or RIP, CS: see the vector), then ERR_VECTOR | vector.
isr_unexpected:
        mov     $PORT_INFO, %edx
        mov     8(%rsp), %rax
        out     %eax, %dx
        mov     16(%rsp), %rax
        out     %eax, %dx
        mov     24(%rsp), %rax
        out     %eax, %dx
        mov     32(%rsp), %rax
        out     %eax, %dx
        pop     %rax
        or      $ERR_VECTOR, %eax
        jmp     report_error
