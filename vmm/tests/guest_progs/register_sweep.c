/* Hostile register sweep through the guest SDK (from the hostile-guest
 * review): every width and offset of the RNIC window, bad rings, wild
 * doorbells, ring changes while enabled, a reset storm; after each group a
 * valid WRITE must still complete. Built exactly as README says, GCC 12 at
 * -O2 once turned the SDK's register stores into `movq %xmm, (mmio)`, which
 * KVM cannot emulate ("KVM internal error"): the SDK's accessors must stay
 * general-register moves whatever the optimiser does around them. */
#include "odpvm_guest.h"
#define R(q, reg) (ODPVM_RNIC_BASE + ODPVM_RNIC_QP_BANK * ((q) + 1) + (reg))
static void say(const char *s) { odpvm_puts(s); }
static void sayx(const char *s, uint64_t v) { odpvm_puts(s); odpvm_print_hex(v); odpvm_puts("\n"); }
static uint32_t st(unsigned q) { return odpvm_read32(R(q, ODPVM_RNIC_QP_STATUS)); }
static uint32_t er(unsigned q) { return odpvm_read32(R(q, ODPVM_RNIC_QP_ERROR)); }
/* post one WQE and wait for its completion (bounded spins); returns status or 0xffff on timeout, 0xfffe on device error */
static uint32_t one(struct odpvm_qp *qp, uint32_t op, uint64_t addr, uint32_t len, uint32_t lkey,
                    uint64_t raddr, uint32_t rkey, uint32_t *olen)
{
    struct odpvm_wqe w = {0};
    w.wr_id = 0xabc0000 + qp->sq_pi; w.opcode = op; w.flags = 1; w.addr = addr; w.length = len;
    w.lkey = lkey; w.remote_addr = raddr; w.rkey = rkey;
    odpvm_post_send(qp, &w);
    odpvm_ring_sq(qp);
    struct odpvm_cqe c;
    for (long i = 0; i < 20000000; i++) {
        int r = odpvm_poll_cq(qp, &c);
        if (r == 1) { if (olen) *olen = c.len; return c.status; }
        if (r < 0) return 0xfffe;
    }
    return 0xffff;
}
static struct odpvm_wqe sq[1024] __attribute__((aligned(4096)));
static struct odpvm_rqe rq[1024] __attribute__((aligned(4096)));
static char buf[8192] __attribute__((aligned(4096)));
static uint64_t pa, pk, lk;
static int check(unsigned q, const char *what)
{
    struct odpvm_qp qp;
    uint32_t e = odpvm_qp_open(&qp, q, sq, 64, rq, 64);
    if (e) { say(what); sayx(": reopen failed ", e); return 1; }
    uint32_t s = one(&qp, 1, (uint64_t)buf, 4096, lk, pa, pk, 0);
    if (s) { say(what); sayx(": valid write after attack status ", s); return 1; }
    return 0;
}
static void w8(uint64_t a, uint8_t v) { *(volatile uint8_t *)a = v; }
static void w16(uint64_t a, uint16_t v) { *(volatile uint16_t *)a = v; }
static uint8_t r8(uint64_t a) { return *(volatile uint8_t *)a; }
int _start(unsigned long vcpu, unsigned long n, const struct odpvm_params *p)
{
    (void)n;
    if (vcpu) return 0;
    unsigned nq = odpvm_rnic_read32(ODPVM_RNIC_REG_NUM_QPS);
    pa = odpvm_rnic_read64(ODPVM_RNIC_REG_PEER_ADDR); pk = odpvm_rnic_read32(ODPVM_RNIC_REG_PEER_RKEY);
    lk = odpvm_rnic_read32(ODPVM_RNIC_REG_LKEY);
    int bad = 0, tests = 0;
    sayx("num_qps ", nq);
    /* 1. every offset of the window (and a bit past) with 1/2/4/8-byte reads */
    uint64_t sum = 0;
    for (uint64_t o = 0; o < ODPVM_RNIC_WINDOW_SIZE; o++) {
        sum += r8(ODPVM_RNIC_BASE + o);
        if (!(o & 1)) sum += *(volatile uint16_t *)(ODPVM_RNIC_BASE + o);
        if (!(o & 3)) sum += odpvm_read32(ODPVM_RNIC_BASE + o);
        if (!(o & 7)) sum += odpvm_read64(ODPVM_RNIC_BASE + o);
    }
    sayx("read sweep ok ", sum); tests++;
    /* 2. writes of every width to every QP register offset, on every bank (incl. past NUM_QPS) */
    for (unsigned q = 0; q < (ODPVM_RNIC_WINDOW_SIZE / 0x100); q++) {
        for (uint64_t o = 0; o < 0x100; o++) {
            uint64_t a = ODPVM_RNIC_BASE + 0x100 * q + o;
            if (q >= 1 && q - 1 < nq && (o & ~7ull) == ODPVM_RNIC_QP_CTRL) continue; /* ctrl later */
            w8(a, 0xff);
            if (!(o & 1)) w16(a, 0xffff);
            if (!(o & 3)) odpvm_write32(a, 0xffffffff);
            if (!(o & 7)) odpvm_write64(a, ~0ull);
            /* unaligned 4 and 8 */
            if ((o & 3) == 1) odpvm_write32(a, 0x12345678);
            if ((o & 7) == 3) odpvm_write64(a, 0x1122334455667788ull);
        }
    }
    say("write sweep ok\n"); tests++;
    for (unsigned q = 0; q < nq; q++) bad += check(q, "after write sweep"), tests++;
    /* 3. bad rings */
    uint64_t bases[] = {0, 0x1000, 0xc0000000ull - 64*64 + 64, 0xd0100000ull, 0xd0100100ull, p->ram_low_end - 64, p->ram_low_end,
                        ~0ull - 63, ~0ull & ~63ull, 0x8000000000000000ull, (uint64_t)sq + 1, (uint64_t)sq + 32};
    uint32_t sizes[] = {0, 1, 3, 1000, 1024, 2048, 0x80000000u, 0xffffffffu};
    for (unsigned b = 0; b < sizeof bases / 8; b++)
        for (unsigned s = 0; s < sizeof sizes / 4; s++)
            for (int which = 0; which < 2; which++) {
                uint64_t r = R(0, 0);
                odpvm_write32(r + ODPVM_RNIC_QP_CTRL, 1);
                odpvm_write64(r + ODPVM_RNIC_QP_SQ_BASE, which ? (uint64_t)sq : bases[b]);
                odpvm_write32(r + ODPVM_RNIC_QP_SQ_SIZE, which ? 64 : sizes[s]);
                odpvm_write64(r + ODPVM_RNIC_QP_RQ_BASE, which ? bases[b] : (uint64_t)rq);
                odpvm_write32(r + ODPVM_RNIC_QP_RQ_SIZE, which ? sizes[s] : 64);
                odpvm_write32(r + ODPVM_RNIC_QP_CTRL, 2);
                uint32_t stt = st(0);
                if (stt & 1) { /* enabled: ring doorbells hard */
                    odpvm_write32(r + ODPVM_RNIC_QP_SQ_PI, sizes[s]);
                    odpvm_write32(r + ODPVM_RNIC_QP_RQ_PI, sizes[s]);
                    odpvm_write32(r + ODPVM_RNIC_QP_SQ_PI, 1);
                }
                tests++;
            }
    bad += check(0, "after bad rings"); tests++;
    /* 4. doorbells far ahead / behind / wrap */
    uint32_t pis[] = {65, 0xffffffff, 0x80000000u, 64, 1, 0, 0xfffffff0u};
    for (unsigned i = 0; i < sizeof pis / 4; i++) {
        struct odpvm_qp qp;
        odpvm_qp_open(&qp, 0, sq, 64, rq, 64);
        for (int k = 0; k < 64; k++) { struct odpvm_wqe w = {k, 1, 0, (uint64_t)buf, 64, (uint32_t)lk, pa, (uint32_t)pk, {0}}; sq[k] = w; }
        odpvm_write32(qp.regs + ODPVM_RNIC_QP_SQ_PI, pis[i]);
        odpvm_write32(qp.regs + ODPVM_RNIC_QP_RQ_PI, pis[i]);
        sayx("pi ", pis[i]); sayx("  status ", st(0)); sayx("  error ", er(0)); sayx("  sq_ci ", odpvm_read32(qp.regs + ODPVM_RNIC_QP_SQ_CI));
        tests++;
    }
    bad += check(0, "after doorbells"); tests++;
    /* 5. modify rings while enabled, CQ_POP on empty, enable twice */
    {
        struct odpvm_qp qp; odpvm_qp_open(&qp, 0, sq, 64, rq, 64);
        for (int k = 0; k < 10000; k++) odpvm_write32(qp.regs + ODPVM_RNIC_QP_CQ_POP, 1);
        odpvm_write32(qp.regs + ODPVM_RNIC_QP_CTRL, 2);
        odpvm_write32(qp.regs + ODPVM_RNIC_QP_CTRL, 3);
        odpvm_write64(qp.regs + ODPVM_RNIC_QP_SQ_BASE, 0);
        sayx("ring change while enabled: status ", st(0)); sayx("  error ", er(0));
        tests++;
    }
    bad += check(0, "after ring change"); tests++;
    /* 6. reset/enable storm (no traffic here) */
    for (int k = 0; k < 20000; k++) {
        odpvm_write32(R(0, ODPVM_RNIC_QP_CTRL), 1);
        odpvm_write64(R(0, ODPVM_RNIC_QP_SQ_BASE), (uint64_t)sq);
        odpvm_write32(R(0, ODPVM_RNIC_QP_SQ_SIZE), 1024);
        odpvm_write64(R(0, ODPVM_RNIC_QP_RQ_BASE), (uint64_t)rq);
        odpvm_write32(R(0, ODPVM_RNIC_QP_RQ_SIZE), 1024);
        odpvm_write32(R(0, ODPVM_RNIC_QP_CTRL), 2);
    }
    tests++;
    bad += check(0, "after reset storm"); tests++;
    sayx("tests ", tests); sayx("bad ", bad);
    return bad;
}
