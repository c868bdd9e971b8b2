/* Regression (hostile-guest review): the RNIC's memory region covered all
 * guest-physical space, so a ring-3 program could RDMA-READ over the VMM's
 * boot region (parameters, page tables, IDT) below ODPVM_LOAD_BASE, copy
 * supervisor-only pages out with a WRITE, and put its rings there. Each
 * must now be refused; a valid WRITE still works afterwards.
 * Exit status: 0 all refused; otherwise the number of the first breach. */
#include "odpvm_guest.h"

static struct odpvm_wqe sq[64] __attribute__((aligned(4096)));
static struct odpvm_rqe rq[64] __attribute__((aligned(4096)));
static char buf[4096] __attribute__((aligned(4096)));

static uint32_t one(struct odpvm_qp *qp, uint32_t op, uint64_t local, uint32_t len)
{
    struct odpvm_wqe w = {0};
    w.wr_id = qp->sq_pi;
    w.opcode = op;
    w.flags = ODPVM_RNIC_WQE_SIGNALED;
    w.addr = local;
    w.length = len;
    w.lkey = qp->lkey;
    w.remote_addr = odpvm_rnic_read64(ODPVM_RNIC_REG_PEER_ADDR);
    w.rkey = odpvm_rnic_read32(ODPVM_RNIC_REG_PEER_RKEY);
    odpvm_post_send(qp, &w);
    odpvm_ring_sq(qp);
    struct odpvm_cqe c;
    for (;;) {
        int r = odpvm_poll_cq(qp, &c);
        if (r == 1)
            return c.status;
        if (r < 0)
            return 0xfffe;
    }
}

int _start(unsigned long vcpu, unsigned long n, const struct odpvm_params *p)
{
    (void)n;
    if (vcpu)
        return 0;
    uint64_t magic = p->magic;
    struct odpvm_qp qp;
    if (odpvm_qp_open(&qp, 0, sq, 64, rq, 64))
        return 10;
    /* 1: a READ landing on the parameter block. */
    if (one(&qp, ODPVM_RNIC_OP_READ, ODPVM_PARAMS_ADDR, 64) == 0 || p->magic != magic)
        return 1;
    /* 2: a WRITE sourced from the page tables (supervisor-only). */
    if (odpvm_qp_open(&qp, 0, sq, 64, rq, 64))
        return 10;
    if (one(&qp, ODPVM_RNIC_OP_WRITE, 0x4000, 64) == 0)
        return 2;
    /* 3: a WRITE straddling the boundary into program RAM. */
    if (odpvm_qp_open(&qp, 0, sq, 64, rq, 64))
        return 10;
    if (one(&qp, ODPVM_RNIC_OP_WRITE, ODPVM_LOAD_BASE - 64, 128) == 0)
        return 3;
    /* 4: rings inside the boot region. */
    if (odpvm_qp_open(&qp, 0, (struct odpvm_wqe *)0x3000, 64, rq, 64) != ODPVM_RNIC_ERR_BAD_RING)
        return 4;
    if (odpvm_qp_open(&qp, 0, sq, 64, (struct odpvm_rqe *)0x4000, 64) != ODPVM_RNIC_ERR_BAD_RING)
        return 5;
    /* The device still works for memory the program owns. */
    if (odpvm_qp_open(&qp, 0, sq, 64, rq, 64))
        return 10;
    if (one(&qp, ODPVM_RNIC_OP_WRITE, (uint64_t)buf, 4096) != 0)
        return 11;
    return 0;
}
