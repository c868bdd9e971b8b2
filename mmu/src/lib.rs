//! # mmu — a userspace secondary MMU with O(1) teardown
//!
//! The mmu tracks which guest-physical pages are mapped to which host pages
//! (*translations*), keeps every secondary MMU that caches them (*mirrors*:
//! KVM's side of guest memory, an RNIC's ODP page table) coherent, and
//! makes tearing down any amount of mapped memory cost O(1).
//!
//! ## Objects
//!
//! * **Region** — a guest-physical range backed by a host-virtual range, like
//!   a KVM memslot. Regions never overlap.
//! * **Translation** — one guest page (4 KiB, or 2 MiB) → one host page.
//!   Stored in a per-region radix table: a directory of 2 MiB slots, each
//!   empty or holding one *leaf* (512 4 KiB entries, or one 2 MiB entry).
//!   A leaf is the analogue of a KVM shadow page.
//! * **Mirror** — a secondary MMU subscribed to invalidations
//!   ([`Mirror`]). `Cache` mirrors cache translations of memory they do not
//!   own (an RNIC); `Backing` mirrors own the host memory and release it
//!   when they invalidate (KVM's side: `MADV_DONTNEED` zaps the shadow
//!   entries and frees the pages).
//! * **Ticket** — what `read_begin` returns: a range and the sequence
//!   number seen. Opaque (no public fields) and stamped with the number of
//!   the `Mmu` that issued it; any other mmu refuses it.
//!
//! ## The lock
//!
//! One lock, the *mmu lock*, protects the region list, every table, the
//! sequence number, the in-flight and recently-ended invalidations, the
//! mirror list pointer, the leaf free/obsolete lists and which thread runs
//! the reclaim step. It is a
//! **spinlock** ([`LockPolicy::Spin`]; [`LockPolicy::Mutex`] exists for
//! comparison) and every hold is short and bounded:
//!
//! | hold                          | work under the lock, at most                          |
//! |-------------------------------|-------------------------------------------------------|
//! | `read_begin`, `read_retry`, `translate` | region lookup, ≤ 128 range compares       |
//! | `install`                     | the staleness check, ≤ `install_batch` entry writes    |
//! | invalidation start / end      | take or drop one in-flight slot (≤ 64), log it         |
//! | invalidation zap              | ≤ `zap_batch` entries examined                         |
//! | teardown                      | one generation bump per region (≤ 64 regions)          |
//! | reclaim                       | ≤ `reclaim_batch` leaves detached, ≤ `reclaim_scan` slots examined, ≤ 8 regions reported; then ≤ 256 leaves recycled |
//!
//! **Never under the lock:** calling a mirror, calling a resolver, sleeping,
//! waiting for anything, allocating or freeing memory (leaves are allocated
//! with the lock dropped and pushed onto an intrusive free list; mirror
//! lists are built outside and swapped in). The one exception is
//! [`Mmu::teardown_all_by_walk`], the O(n) baseline kept for benchmarks.
//!
//! **Waiting for it:** spin, then yield, then sleep in 20 µs naps. Holders
//! may be preempted (this is user space), and a real-time waiter (the
//! VMM's fault thread is `SCHED_FIFO`) that only yields never lets a
//! normal-priority holder on its CPU run: the two livelocked for ~0.95 s,
//! until the kernel's real-time throttling
//! (`lock::tests::a_real_time_waiter_lets_a_preempted_holder_finish`).
//!
//! **May sleep** (so never call them holding a spinlock of your own):
//! `read_begin` (waits for colliding invalidations), `fault_in` (and the
//! resolver it runs), `invalidate`, `teardown_*`, `remove_region` (mirror
//! callbacks), `unregister_mirror` (waits for invalidations and the reclaim
//! step that may still call the mirror), `reclaim_step`/`reclaim_all`
//! (mirror callbacks; wait for another thread's step), `add_region` only
//! when removed regions fill the region table (it runs reclaim steps), and
//! every [`Mirror`] callback.
//!
//! **Inside a mirror callback** (of any mmu, on the calling thread) every
//! method that may sleep — `read_begin`, `fault_in`, `invalidate`,
//! `teardown_*`, `remove_region`, `unregister_mirror` — returns
//! [`Error::Reentrant`] at once and changes nothing; `reclaim_step` and
//! `reclaim_all` do nothing; `add_region` runs no reclaim step. A sleeping
//! callback could wait for its own thread (nested invalidations holding
//! every in-flight slot) or for another thread's callback waiting for it
//! in turn (a `reclaimed` calling `read_begin` while an `invalidate_wait`
//! calls `reclaim_step`). Callbacks may use the non-sleeping methods
//! (`try_read_begin`, `read_retry`, `translate*`, `install`, `lookup`,
//! `set_region_hva`, …). Tests: `tests/reclaim_order.rs`
//! `callbacks_calling_back_never_wait_for_themselves`; `tests/regressions.rs`
//! `sleeping_methods_from_a_callback_return_reentrant`,
//! `invalidate_from_a_callback_is_reentrant_not_a_nested_hang`,
//! `reclaim_step_and_read_begin_in_callbacks_do_not_deadlock`,
//! `read_begin_from_two_invalidate_callbacks_does_not_deadlock`.
//!
//! **Lock order:** a mirror's own *update lock* (the lock its invalidate
//! callback takes and under which it programs its table) may be held while
//! calling `read_retry`/`translate`, which take the mmu lock. The mmu lock
//! is never held while calling a mirror. So: mirror lock → mmu lock, never
//! the reverse.
//!
//! ## Sequence numbers
//!
//! `seq` counts invalidations started. Each range invalidation and each
//! teardown takes the next value as its *id* when it starts, under the
//! lock, and is *in flight* until it ends. A range is **odd** while an
//! in-flight invalidation overlaps it and **even** otherwise (Linux keeps
//! one odd/even counter per interval subscription; here the ranges are
//! arbitrary, so the in-flight set is kept instead of a parity bit).
//!
//! A ticket `T = read_begin(range)` waits until the range is even and
//! records `T.seq = seq`. An invalidation `I` **collides** with `T` when
//! `I.id > T.seq` and `I`'s range overlaps `T`'s. `read_retry(T)` is true
//! iff a colliding invalidation exists, in flight or ended. Ended
//! invalidations are remembered in a log of the last 64; if a ticket is
//! older than everything the log forgot, `read_retry` answers true (a
//! spurious retry, never a missed one).
//!
//! | state of `T`'s range                           | `read_begin` | `read_retry(T)` / `install(T)` |
//! |------------------------------------------------|--------------|--------------------------------|
//! | even, nothing started since `T`                | returns      | false / installs               |
//! | an overlapping invalidation started after `T`  | —            | true / `Err(Stale)`            |
//! | odd (overlapping invalidation in flight)       | sleeps       | true / `Err(Stale)` (it started after `T`, since `read_begin` waited) |
//! | only non-overlapping invalidations since `T`   | returns      | false / installs               |
//!
//! The interleaving that forces a retry:
//!
//! ```text
//!   fault thread                          invalidating thread
//!   T = read_begin(r)       (r even)
//!   resolve: populate pages (may sleep)
//!                                         lock; id = ++seq; in-flight += r; unlock   (r odd)
//!                                         mirrors: start all, wait all (may sleep)
//!   lock; read_retry(T): id > T.seq and overlaps → stale; unlock
//!   retry: read_begin(r) sleeps ...
//!                                         zap r's entries, ≤ zap_batch per hold
//!                                         lock; in-flight -= r; log += r; unlock; wake   (r even)
//!   ... wakes; T' = read_begin(r); resolve; install(T') succeeds
//! ```
//!
//! If instead `install(T)` takes the lock before the invalidation starts,
//! its entries are in the table when the invalidation's zap runs (the zap
//! takes the lock after the start), and every mirror is told before that:
//! either way no translation survives that predates the invalidation.
//!
//! ## Generations: O(1) teardown
//!
//! Each region has a current generation (`valid_gen`, as in KVM's
//! `mmu_valid_gen`). A leaf records the generation current when it was
//! filled; its entries are visible only while that is still the region's
//! generation. A teardown takes a sequence number (so it collides with
//! every ticket in its scope: faults in flight retry) and sets a new
//! generation for its regions in the same lock hold: every old translation
//! is invisible at once, however many there are. Each mirror then gets one
//! [`InvalidationKind::Generation`] notice — O(1) for a mirror that stamps
//! its own entries with generations — through the same two passes.
//!
//! The **reclaimer** (a background thread, or [`Mmu::reclaim_step`]) then
//! frees obsolete leaves. A teardown does not wake the background thread
//! (a futex wake is a syscall, often an inter-processor interrupt: several
//! times the rest of the teardown here); it sets a flag the thread polls,
//! every 1 ms while it finds work and backing off to every 16 ms when idle,
//! so reclaim starts at most 16 ms after a teardown (`tests/teardown_path.rs`
//! `a_teardown_makes_no_futex_call_and_is_still_reclaimed`). Per lock hold it
//! detaches at most `reclaim_batch`
//! of them (KVM's `BATCH_ZAP_PAGES` is 10) and examines at most
//! `reclaim_scan` directory slots, then drops the lock, reports the freed
//! translations to the mirrors (`Mirror::reclaimed`, e.g. so the backing
//! can give the old host memory back) and frees the leaves. A fault that
//! finds an obsolete leaf in its slot moves it to the obsolete list in
//! O(1). Because the set of obsolete leaves is fixed when the generation
//! moves, the reclaimer always finishes, however fast faults create new
//! leaves (the livelock KVM's fast zap was reintroduced to avoid).
//!
//! **When reclaimed memory may be released.** The reclaimer leaves a
//! region alone while a teardown of it is in flight, so a leaf of the old
//! generation reaches `Mirror::reclaimed` only after every mirror's
//! `invalidate_wait` for that teardown's notice has returned: a `Backing`
//! mirror may release what `reclaimed` reports — no device still uses it
//! (loom `loom_reclaim_waits_for_the_cache_mirrors_confirmation`;
//! `tests/reclaim_order.rs`
//! `backing_memory_is_released_only_after_every_device_confirmed`).
//! Reclaim steps run one at a time (a second one sleeps until the first
//! made its last mirror call), so `generation_reclaimed(region, below)`
//! comes after every `reclaimed` batch of those generations has returned,
//! whoever runs the steps (loom
//! `loom_overlapping_reclaim_steps_report_the_generation_last`;
//! `overlapping_reclaim_steps_report_a_generation_after_its_last_batch`).
//! [`Mmu::reclaim_pending`] stays true until the step that took the last
//! obsolete state has told every mirror and counted it in the statistics,
//! so a caller waiting for it to turn false never runs ahead of a mirror
//! (`tests/reclaim_order.rs` `reclaim_is_pending_until_the_mirrors_are_told`).
//!
//! ## Fan-out: two passes
//!
//! `invalidate` and `teardown_*` call `invalidate_start` on every `Cache`
//! mirror, then `invalidate_wait` on each (slow devices flush in parallel,
//! not in series), then the same two passes over `Backing` mirrors — only
//! after every device has confirmed it stopped using the memory may the
//! memory be released. Mirror callbacks run outside the lock and may sleep.
//! The mirror list is copied when an invalidation or a reclaim step starts;
//! registering or unregistering never blocks one. **`unregister_mirror`**
//! swaps the list, then waits for everything that copied the old one: every
//! invalidation and teardown that started before the swap, and the reclaim
//! step in flight at the swap. When it returns nothing calls the mirror
//! again, and the caller may free it (loom
//! `loom_unregister_waits_for_a_reclaim_step`; `tests.rs`
//! `unregister_waits_for_invalidations_that_may_call_the_mirror`,
//! `tests/reclaim_order.rs` `unregister_waits_for_a_reclaim_step_in_flight`).
//!
//! ## Guarantees
//!
//! 1. **No stale install.** `install(T, …)` writes only in lock holds where
//!    no invalidation colliding with `T` exists; anything it wrote is
//!    removed by every invalidation that starts later.
//! 2. After `invalidate(r)` returns, no translation in `r` that existed
//!    when it was called is visible in the table, and every mirror's
//!    `invalidate_wait` for it has returned.
//! 3. After `teardown_*` returns, no translation of the old generation is
//!    visible, and every mirror's `invalidate_wait` for the notice has
//!    returned. Its cost does not depend on how much memory is mapped, and
//!    it wakes no thread unless one waits on the mmu (a `read_begin` or
//!    `unregister_mirror` sleeper): no futex call of its own
//!    (`tests/teardown_path.rs`).
//! 4. Overlapping and nested invalidations may run concurrently; a range is
//!    even only when all of them have ended.
//! 5. Bad input (misaligned, empty or overflowing ranges, ranges outside
//!    the regions, overlapping regions, a ticket of another mmu, a tunable
//!    out of range) returns an [`Error`]; nothing panics or hangs, with
//!    overflow checks on as well (`scripts/test` runs the mmu tests in the
//!    `release-checked` profile). Tests: `tests/hostile.rs`
//!    (`addresses_near_u64_max_are_errors_everywhere`,
//!    `tickets_of_another_mmu_are_errors`,
//!    `config_rejects_every_degenerate_tunable`), `tests/model.rs`,
//!    `tests/adversary_model.rs`; `tests/regressions.rs`
//!    (`install_refuses_host_pages_past_the_limit_and_extents_never_wrap`,
//!    `install_refuses_a_huge_page_at_the_top_of_the_host_space`,
//!    `a_huge_region_is_an_error_not_an_abort`,
//!    `a_full_region_table_is_too_many_regions`).
//! 6. **A panicking mirror callback wedges nothing.** An invalidation or
//!    teardown in flight is a drop guard: unwinding through it (zapping a
//!    range invalidation's range first) ends it, so the range is even again,
//!    the region unfenced and `unregister_mirror` returns; a reclaim step
//!    gives up its ownership likewise (`tests/regressions.rs`
//!    `a_panicking_invalidate_callback_still_ends_its_span`,
//!    `a_panicking_teardown_callback_still_ends_its_span`,
//!    `a_panicking_reclaimed_callback_does_not_wedge_the_reclaimer`).
//! 7. **Removed regions drain.** A removed region keeps its entry in the
//!    64-entry region table until the reclaimer freed its table. The
//!    reclaimer scans and finishes removed regions first, counts the leaves
//!    each region has on the obsolete list (so faults elsewhere cannot hold
//!    a region back) and alternates list and scan, and `add_region` runs
//!    steps itself when only removed regions fill the table; a table full
//!    of live regions is [`Error::TooManyRegions`] (`tests/regressions.rs`
//!    `remove_and_readd_never_runs_out_of_region_entries`,
//!    `removed_regions_drain_under_fault_load`).
//!
//! **Not guaranteed: bounded `read_begin` waits.** `read_begin` sleeps
//! until no overlapping invalidation is in flight, with no fairness toward
//! waiting faults: a stream of overlapping invalidations that never all
//! end at once (two threads invalidating the same page back to back)
//! starves it for as long as the stream lasts. Linux's
//! `mmu_interval_read_begin` behaves the same; invalidations come from
//! the VMM, not the guest, so the VMM bounds them.
//!
//! ## Address-space limits
//!
//! A region must end at or below [`ADDRESS_LIMIT`] (2^63) in guest-physical
//! *and* host-virtual addresses; `add_region` and `set_region_hva` return
//! [`Error::AboveLimit`] otherwise (x86-64 has at most 52 physical and 57
//! virtual address bits), and so does `install` for a translation whose
//! host page does not end below it. A region is at most
//! [`MAX_REGION_SIZE`] (64 TiB) long ([`Error::RegionTooLarge`], checked
//! before anything is allocated); its directory is allocated fallibly
//! ([`Error::NoMemory`]). Below the limit every path is exact up to the
//! last page (`a_region_ending_at_the_limit_is_correct_on_every_path`);
//! addresses above it are simply outside every region
//! (`regions_past_the_address_limit_are_rejected`).

mod clock;
mod config;
mod error;
pub mod hist;
mod lock;
mod mirror;
mod seq;
mod stats;
mod sync;
mod table;
mod tracker;
mod types;

pub use clock::{ticks, ticks_to_ns};
pub use config::{Config, INSTALL_BATCH_MAX, RECLAIM_BATCH_MAX, RECLAIM_SCAN_MAX, ZAP_BATCH_MAX};
pub use error::Error;
pub use lock::LockPolicy;
pub use mirror::{FaultResolver, Mirror, MirrorId, MirrorRole};
pub use stats::{Stats, StatsSnapshot};
pub use table::Extent;
pub use tracker::{
    DirectResolver, FaultOutcome, Mmu, ReclaimProgress, TeardownReport, MAX_REGIONS,
    MAX_REGION_SIZE,
};
pub use types::*;

#[cfg(all(test, loom))]
mod loom_tests;
#[cfg(all(test, not(loom)))]
mod tests;
