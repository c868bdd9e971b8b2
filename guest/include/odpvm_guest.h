/* odpvm guest SDK: write a program that `odpvm run --payload` runs in ring 3
 * on every vCPU of a microVM, against the paravirtual RNIC and the
 * mmu-tracked guest memory.
 *
 * Build (static, position-dependent, no libc):
 *   cc -static -nostdlib -ffreestanding -fno-pie -no-pie -O2 \
 *      -I guest/include -T guest/link.ld prog.c -o prog
 *
 * Entry: every vCPU starts in `_start` (declared below) with
 *   vcpu   = its index (rdi), nvcpus = the vCPU count (rsi),
 *   params = the parameter block (rdx; --payload-arg values in args[]),
 *   rsp    = the top of its own ODPVM_STACK_SIZE stack,
 *   %gs    = its struct odpvm_vcpu_info (odpvm_vcpu_index()).
 * Returning from `_start` ends that vCPU's program with the return value
 * as its status, like odpvm_exit(). Status 0 is a pass; the run passes
 * when every vCPU passes.
 *
 * Memory: guest RAM is identity mapped (a pointer is a guest-physical
 * address, usable in WQEs as is), readable, writable and executable from
 * ring 3. The program and its stacks sit at the start of RAM; everything
 * from params->free_start to params->ram_low_end (and, with more than ~3
 * GiB, from 4 GiB to params->ram_high_end) is free. Device registers are
 * at ODPVM_TESTDEV_BASE and ODPVM_RNIC_BASE. Anything else is unmapped.
 * Below ODPVM_LOAD_BASE is the VMM's (parameters, page tables, IDT): the
 * RNIC refuses it too — a WQE buffer there completes with an error and a
 * ring there is ODPVM_RNIC_ERR_BAD_RING.
 * A host-side teardown (or invalidation) may discard any page at any time:
 * afterwards the program's own pages (code, .data, .bss, stacks) read as
 * loaded and the rest of RAM as zero. State that must survive one lives in
 * registers or is re-derived (odpvm_params(), odpvm_vcpu_index()).
 *
 * Exceptions (page faults outside RAM, #GP, #UD, divide errors, hlt,
 * int3, ...) end that vCPU: the VMM reports the vCPU, the exception, rip
 * and (for a page fault) the address, and the run fails.
 *
 * The constants and layouts come from odpvm_abi.h, which is generated
 * from the VMM's own definitions. */
#ifndef ODPVM_GUEST_H
#define ODPVM_GUEST_H

#include "odpvm_abi.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The entry point every vCPU starts in (define it in your program). */
int _start(unsigned long vcpu, unsigned long nvcpus, const struct odpvm_params *params);

/* ---- registers ------------------------------------------------------- */

/* Every register access traps to the VMM, and KVM emulates the faulting
 * instruction. Its emulator handles general-register moves, not SSE: a
 * plain volatile store may be compiled to `movq %xmm, (reg)` (GCC 12 at -O2
 * did, and the vCPU died with "KVM internal error"). So the accessors are
 * spelled as the exact instructions. */
static inline void odpvm_write32(uint64_t addr, uint32_t v)
{
    __asm__ volatile("movl %k1, (%0)" : : "r"(addr), "r"(v) : "memory");
}

static inline void odpvm_write64(uint64_t addr, uint64_t v)
{
    __asm__ volatile("movq %1, (%0)" : : "r"(addr), "r"(v) : "memory");
}

static inline uint32_t odpvm_read32(uint64_t addr)
{
    uint32_t v;
    __asm__ volatile("movl (%1), %k0" : "=r"(v) : "r"(addr) : "memory");
    return v;
}

static inline uint64_t odpvm_read64(uint64_t addr)
{
    uint64_t v;
    __asm__ volatile("movq (%1), %0" : "=r"(v) : "r"(addr) : "memory");
    return v;
}

/* Keeps the compiler from moving memory accesses across it (x86 keeps
 * stores in order, and every register access is a trap to the VMM). */
static inline void odpvm_compiler_barrier(void)
{
    __asm__ volatile("" ::: "memory");
}

static inline uint64_t odpvm_rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return (uint64_t)hi << 32 | lo;
}

static inline void odpvm_pause(void)
{
    __asm__ volatile("pause");
}

/* This vCPU's index and the vCPU count, from its read-only info block
 * (%gs points at it): unlike a variable, they survive a teardown. */
static inline unsigned long odpvm_vcpu_index(void)
{
    unsigned long v;
    __asm__ volatile("movq %%gs:0, %0" : "=r"(v));
    return v;
}

static inline unsigned long odpvm_vcpu_count(void)
{
    unsigned long v;
    __asm__ volatile("movq %%gs:8, %0" : "=r"(v));
    return v;
}

/* ---- the test device: console, exit, barrier ---------------------------- */

static inline const struct odpvm_params *odpvm_params(void)
{
    return (const struct odpvm_params *)ODPVM_PARAMS_ADDR;
}

/* Print n bytes to the VM's console (lines are kept whole per vCPU). */
static inline void odpvm_print(const char *s, unsigned long n)
{
    uint64_t reg = ODPVM_TESTDEV_BASE + ODPVM_TESTDEV_CONSOLE;
    while (n >= 8) {
        uint64_t w;
        __builtin_memcpy(&w, s, 8);
        odpvm_write64(reg, w);
        s += 8;
        n -= 8;
    }
    while (n--)
        *(volatile char *)reg = *s++;
}

static inline void odpvm_puts(const char *s)
{
    unsigned long n = 0;
    while (s[n])
        n++;
    odpvm_print(s, n);
}

/* Print v in decimal. */
static inline void odpvm_print_u64(uint64_t v)
{
    char buf[20];
    int i = 20;
    do {
        buf[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    odpvm_print(buf + i, (unsigned long)(20 - i));
}

/* Print v as 0x-prefixed hex. */
static inline void odpvm_print_hex(uint64_t v)
{
    char buf[18];
    int i = 18;
    do {
        buf[--i] = "0123456789abcdef"[v & 15];
        v >>= 4;
    } while (v);
    buf[--i] = 'x';
    buf[--i] = '0';
    odpvm_print(buf + i, (unsigned long)(18 - i));
}

/* End this vCPU's program with `code` (0 = pass). */
__attribute__((noreturn)) static inline void odpvm_exit(int code)
{
    odpvm_compiler_barrier();
    odpvm_write32(ODPVM_TESTDEV_BASE + ODPVM_TESTDEV_EXIT, (uint32_t)code);
    for (;;)
        odpvm_pause();
}

/* Wait until every vCPU still running has called odpvm_barrier() too. */
static inline void odpvm_barrier(void)
{
    odpvm_compiler_barrier();
    odpvm_write32(ODPVM_TESTDEV_BASE + ODPVM_TESTDEV_CMD, ODPVM_TESTDEV_CMD_SYNC);
    odpvm_compiler_barrier();
}

/* Wait until the host releases this vCPU (`odpvm ctl resume`, or
 * VmHandle::resume in a Rust harness); meanwhile the host may invalidate or
 * tear down guest memory (`odpvm ctl stats` shows barrier_waiting). Without
 * a controller it waits until --timeout. */
static inline void odpvm_host_barrier(uint32_t phase)
{
    odpvm_compiler_barrier();
    odpvm_write32(ODPVM_TESTDEV_BASE + ODPVM_TESTDEV_CMD, ODPVM_TESTDEV_CMD_CLEAR);
    odpvm_write32(ODPVM_TESTDEV_BASE + ODPVM_TESTDEV_ARG, phase);
    odpvm_write32(ODPVM_TESTDEV_BASE + ODPVM_TESTDEV_CMD, ODPVM_TESTDEV_CMD_BARRIER);
    odpvm_compiler_barrier();
}

/* Whether the host asked looping programs to finish (ctl shutdown does
 * not ask: it stops the VM). */
static inline int odpvm_should_stop(void)
{
    return odpvm_read32(ODPVM_TESTDEV_BASE + ODPVM_TESTDEV_STOP) != 0;
}

/* ---- the paravirtual RNIC -------------------------------------------- */

static inline uint32_t odpvm_rnic_read32(uint64_t reg)
{
    return odpvm_read32(ODPVM_RNIC_BASE + reg);
}

static inline uint64_t odpvm_rnic_read64(uint64_t reg)
{
    return odpvm_read64(ODPVM_RNIC_BASE + reg);
}

/* Whether the VM has the RNIC (run with --rnic emulated, the default). */
static inline int odpvm_rnic_present(void)
{
    return odpvm_rnic_read32(ODPVM_RNIC_REG_ID) == ODPVM_RNIC_ID;
}

/* One queue pair and its rings, driven by one vCPU. */
struct odpvm_qp {
    uint64_t regs; /* its register bank */
    struct odpvm_wqe *sq;
    struct odpvm_rqe *rq;
    uint32_t sq_size, rq_size;
    uint32_t sq_pi, rq_pi; /* producer indexes (free running) */
    uint32_t lkey;         /* key of guest RAM */
};

/* A completion, as read from the CQE registers. */
struct odpvm_cqe {
    uint64_t wr_id;
    uint32_t status; /* ibv_wc_status: 0 = success */
    uint32_t opcode; /* ODPVM_RNIC_OP_* */
    uint32_t len;
};

/* Reset queue pair `q` and enable it with the given rings (sizes: powers
 * of two up to ODPVM_RNIC_MAX_RING; rings aligned to their entry size).
 * Returns 0, or the QP_ERROR code (non-zero) if the device refused. */
static inline uint32_t odpvm_qp_open(struct odpvm_qp *qp, unsigned q, struct odpvm_wqe *sq,
                                     uint32_t sq_size, struct odpvm_rqe *rq, uint32_t rq_size)
{
    qp->regs = ODPVM_RNIC_BASE + ODPVM_RNIC_QP_BANK * (q + 1);
    qp->sq = sq;
    qp->rq = rq;
    qp->sq_size = sq_size;
    qp->rq_size = rq_size;
    qp->sq_pi = 0;
    qp->rq_pi = 0;
    qp->lkey = odpvm_rnic_read32(ODPVM_RNIC_REG_LKEY);
    odpvm_write32(qp->regs + ODPVM_RNIC_QP_CTRL, ODPVM_RNIC_CTRL_RESET);
    odpvm_write64(qp->regs + ODPVM_RNIC_QP_SQ_BASE, (uint64_t)sq);
    odpvm_write32(qp->regs + ODPVM_RNIC_QP_SQ_SIZE, sq_size);
    odpvm_write64(qp->regs + ODPVM_RNIC_QP_RQ_BASE, (uint64_t)rq);
    odpvm_write32(qp->regs + ODPVM_RNIC_QP_RQ_SIZE, rq_size);
    odpvm_write32(qp->regs + ODPVM_RNIC_QP_CTRL, ODPVM_RNIC_CTRL_ENABLE);
    if (odpvm_read32(qp->regs + ODPVM_RNIC_QP_STATUS) & ODPVM_RNIC_STATUS_ENABLED)
        return 0;
    uint32_t err = odpvm_read32(qp->regs + ODPVM_RNIC_QP_ERROR);
    return err ? err : ODPVM_RNIC_ERR_NOT_ENABLED;
}

/* Put `w` in the next send-ring slot (the device sees it at the next
 * doorbell). The caller keeps at most sq_size WQEs outstanding. */
static inline void odpvm_post_send(struct odpvm_qp *qp, const struct odpvm_wqe *w)
{
    qp->sq[qp->sq_pi & (qp->sq_size - 1)] = *w;
    qp->sq_pi++;
}

static inline void odpvm_post_recv(struct odpvm_qp *qp, const struct odpvm_rqe *r)
{
    qp->rq[qp->rq_pi & (qp->rq_size - 1)] = *r;
    qp->rq_pi++;
}

/* Hand every posted WQE (receive) to the device. */
static inline void odpvm_ring_sq(struct odpvm_qp *qp)
{
    odpvm_compiler_barrier();
    odpvm_write32(qp->regs + ODPVM_RNIC_QP_SQ_PI, qp->sq_pi);
}

static inline void odpvm_ring_rq(struct odpvm_qp *qp)
{
    odpvm_compiler_barrier();
    odpvm_write32(qp->regs + ODPVM_RNIC_QP_RQ_PI, qp->rq_pi);
}

/* Take the oldest completion: 1 if there was one (in *c), 0 if none, -1 if
 * the device stopped the queue pair (QP_ERROR says why; reopen it). */
static inline int odpvm_poll_cq(struct odpvm_qp *qp, struct odpvm_cqe *c)
{
    if (odpvm_read32(qp->regs + ODPVM_RNIC_QP_CQ_COUNT) == 0) {
        if (odpvm_read32(qp->regs + ODPVM_RNIC_QP_STATUS) & ODPVM_RNIC_STATUS_DEVICE_ERROR)
            return -1;
        return 0;
    }
    c->wr_id = odpvm_read64(qp->regs + ODPVM_RNIC_QP_CQE_WR_ID);
    c->status = odpvm_read32(qp->regs + ODPVM_RNIC_QP_CQE_STATUS);
    c->opcode = odpvm_read32(qp->regs + ODPVM_RNIC_QP_CQE_OPCODE);
    c->len = odpvm_read32(qp->regs + ODPVM_RNIC_QP_CQE_LEN);
    odpvm_write32(qp->regs + ODPVM_RNIC_QP_CQ_POP, 1);
    return 1;
}

/* ---- what the compiler may call ----------------------------------------
 * GCC emits calls to these even in freestanding code (struct copies, zeroing
 * loops). Weak, so a program (or a second file including this header) may
 * bring its own. String instructions: the compiler cannot turn them back
 * into calls to themselves. */
#ifndef ODPVM_NO_MEM_FUNCTIONS
__attribute__((weak)) void *memcpy(void *dst, const void *src, size_t n)
{
    void *ret = dst;
    __asm__ volatile("rep movsb" : "+D"(dst), "+S"(src), "+c"(n) : : "memory");
    return ret;
}

__attribute__((weak)) void *memmove(void *dst, const void *src, size_t n)
{
    void *ret = dst;
    if ((uintptr_t)dst <= (uintptr_t)src || (uintptr_t)dst >= (uintptr_t)src + n) {
        __asm__ volatile("rep movsb" : "+D"(dst), "+S"(src), "+c"(n) : : "memory");
    } else {
        dst = (char *)dst + n - 1;
        src = (const char *)src + n - 1;
        __asm__ volatile("std; rep movsb; cld" : "+D"(dst), "+S"(src), "+c"(n) : : "memory");
    }
    return ret;
}

__attribute__((weak)) void *memset(void *dst, int c, size_t n)
{
    void *ret = dst;
    __asm__ volatile("rep stosb" : "+D"(dst), "+c"(n) : "a"(c) : "memory");
    return ret;
}

__attribute__((weak)) int memcmp(const void *a, const void *b, size_t n)
{
    const volatile unsigned char *x = (const volatile unsigned char *)a;
    const volatile unsigned char *y = (const volatile unsigned char *)b;
    for (size_t i = 0; i < n; i++)
        if (x[i] != y[i])
            return x[i] < y[i] ? -1 : 1;
    return 0;
}
#endif

#ifdef __cplusplus
}
#endif

#endif /* ODPVM_GUEST_H */
