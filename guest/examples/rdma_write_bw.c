/* RDMA WRITE bandwidth from every vCPU to the host peer, with data the
 * host checks: each vCPU owns a span of the peer buffer's first half, and
 * the first 8 bytes of every page it writes carry (message << 32) | the
 * page's index in the peer buffer. The VMM's device checks each landed
 * page against that stamp (stale or misplaced data counts as a stale
 * access, which fails the run's checks).
 *
 *   cc -static -nostdlib -ffreestanding -fno-pie -no-pie -O2 \
 *      -I guest/include -T guest/link.ld guest/examples/rdma_write_bw.c -o rdma_write_bw
 *   odpvm run --payload rdma_write_bw --vcpus 2 --payload-arg 65536 --payload-arg 2000 --json
 *
 * Arguments: message size in bytes (a multiple of 4096, default 64 KiB),
 * messages per vCPU (default 2000). Built with -DSTAMP_SKEW=1, every stamp
 * names the wrong page: the host's check then counts stale accesses. */
#include <odpvm_guest.h>

#ifndef STAMP_SKEW
#define STAMP_SKEW 0
#endif

#define RING 64
#define BATCH 16 /* messages per signaled completion and per doorbell */
#define SLOTS 4  /* source buffers per vCPU, reused in turn */

static struct odpvm_wqe sq[ODPVM_MAX_VCPUS][RING] __attribute__((aligned(4096)));
static struct odpvm_rqe rq[ODPVM_MAX_VCPUS][RING] __attribute__((aligned(4096)));

static void say(unsigned long vcpu, const char *what)
{
    odpvm_puts("vCPU ");
    odpvm_print_u64(vcpu);
    odpvm_puts(": ");
    odpvm_puts(what);
}

int _start(unsigned long vcpu, unsigned long nvcpus, const struct odpvm_params *p)
{
    uint64_t msg = p->nargs > 0 ? p->args[0] : 65536;
    uint64_t iters = p->nargs > 1 ? p->args[1] : 2000;
    iters = (iters + BATCH - 1) / BATCH * BATCH;
    if (msg == 0 || msg % ODPVM_PAGE_SIZE || msg > (1 << 20)) {
        say(vcpu, "message size must be a multiple of 4096 up to 1 MiB\n");
        return 2;
    }
    if (!odpvm_rnic_present()) {
        say(vcpu, "no RNIC (run with --rnic emulated)\n");
        return 2;
    }

    /* Where this vCPU's messages come from and go to. */
    uint64_t src = p->free_start + vcpu * SLOTS * msg;
    if (p->free_start + nvcpus * SLOTS * msg > p->ram_low_end) {
        say(vcpu, "not enough RAM for the message buffers\n");
        return 2;
    }
    uint64_t peer = odpvm_rnic_read64(ODPVM_RNIC_REG_PEER_ADDR);
    uint64_t span = odpvm_rnic_read64(ODPVM_RNIC_REG_PEER_LEN) / 2 / nvcpus;
    span -= span % ODPVM_PAGE_SIZE;
    if (span < SLOTS * msg) {
        say(vcpu, "the peer buffer is too small for this message size\n");
        return 2;
    }
    uint64_t dst_off = vcpu * span; /* offset of this vCPU's span in the peer buffer */
    uint32_t rkey = odpvm_rnic_read32(ODPVM_RNIC_REG_PEER_RKEY);

    struct odpvm_qp qp;
    uint32_t err = odpvm_qp_open(&qp, (unsigned)vcpu, sq[vcpu], RING, rq[vcpu], RING);
    if (err) {
        say(vcpu, "the RNIC refused the queue pair\n");
        return 2;
    }
    say(vcpu, "ready\n");
    odpvm_barrier();

    uint64_t posted = 0, done = 0, errors = 0;
    uint64_t t0 = odpvm_rdtsc();
    while (done < iters && !errors) {
        /* At most two batches in flight. */
        while (posted < iters && posted - done < 2 * BATCH) {
            uint64_t slot = posted % SLOTS;
            uint64_t page0 = (dst_off + slot * msg) / ODPVM_PAGE_SIZE;
            for (uint64_t off = 0; off < msg; off += ODPVM_PAGE_SIZE)
                *(volatile uint64_t *)(src + slot * msg + off) =
                    posted << 32 | (page0 + off / ODPVM_PAGE_SIZE + STAMP_SKEW);
            struct odpvm_wqe w = {
                .wr_id = posted,
                .opcode = ODPVM_RNIC_OP_WRITE,
                .flags = posted % BATCH == BATCH - 1 ? ODPVM_RNIC_WQE_SIGNALED : 0,
                .addr = src + slot * msg,
                .length = (uint32_t)msg,
                .lkey = qp.lkey,
                .remote_addr = peer + dst_off + slot * msg,
                .rkey = rkey,
            };
            odpvm_post_send(&qp, &w);
            posted++;
            if (posted % BATCH == 0)
                odpvm_ring_sq(&qp);
        }
        struct odpvm_cqe c;
        int got = odpvm_poll_cq(&qp, &c);
        if (got < 0) {
            errors++;
        } else if (got > 0) {
            if (c.status != 0)
                errors++;
            else
                done += BATCH;
        } else {
            odpvm_pause();
        }
    }
    uint64_t cycles = odpvm_rdtsc() - t0;

    say(vcpu, "wrote ");
    odpvm_print_u64(done);
    odpvm_puts(" messages of ");
    odpvm_print_u64(msg);
    odpvm_puts(" bytes in ");
    odpvm_print_u64(cycles);
    odpvm_puts(" cycles, ");
    odpvm_print_u64(errors);
    odpvm_puts(" errors\n");
    odpvm_barrier();
    return errors ? 1 : 0;
}
