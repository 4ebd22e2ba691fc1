# hugepunch's test guest (linux/src/vm.rs): a script interpreter that runs at
# CPL3 in 64-bit mode. Assembled with `as --64` and `objcopy -O binary -j
# .text`; the bytes are `GUEST_CODE` in vm.rs (a test compares them).
#
# On entry: rsi = the script (16-byte entries: op, page address),
#           r15 = the key each written word is XORed with,
#           r14 = a page of guest physical addresses no memslot backs: a
#                 write there is an MMIO exit to the VMM.
# Exits (MMIO writes at r14 + n, eax = page address >> 12):
#   +0  give a page back      +8  take a page back
#   +16 a taken-back page did not read zeros
#   +24 done                  +32 setup fill finished
#   +40 wait for the other vCPUs (between giving back and taking back)
        .code64
        .text
next:
        mov     (%rsi), %rax            # op
        mov     8(%rsi), %rbx           # page address
        add     $16, %rsi
        cmp     $1, %rax
        je      fill
        cmp     $2, %rax
        je      give
        cmp     $3, %rax
        je      take
        cmp     $4, %rax
        je      filled
        cmp     $5, %rax
        jne     done
        mov     %eax, 40(%r14)          # wait for the other vCPUs
        jmp     next
filled:
        mov     %eax, 32(%r14)          # the setup fill is over
        jmp     next
done:
        mov     %eax, 24(%r14)          # the VMM stops this vCPU here
        jmp     done
fill:                                   # every word = its address ^ key
        mov     %rbx, %rdi
        mov     $512, %ecx
1:      mov     %rdi, %rax
        xor     %r15, %rax
        mov     %rax, (%rdi)
        add     $8, %rdi
        dec     %ecx
        jnz     1b
        jmp     next
give:
        mov     %rbx, %rax
        shr     $12, %rax
        mov     %eax, (%r14)
        jmp     next
take:
        mov     %rbx, %rax
        shr     $12, %rax
        mov     %eax, 8(%r14)
        mov     %rbx, %rdi              # it must read zeros now
        mov     $512, %ecx
        xor     %eax, %eax
        repe scasq
        je      fill
        mov     %eax, 16(%r14)
        jmp     fill
