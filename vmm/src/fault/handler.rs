//! The fault handler's work: resolving one fault through the mmu protocol
//! (with fault-around for sequential streams), deferring those that race
//! with an invalidation, and the same protocol for device faults
//! (`GuestResolver`). The protocol and its guarantees: the parent module.

use super::{present, FaultStats, Injected, Tracking};
use crate::memory::{GuestRam, HvaHit};
use crate::uffd::{Fill, Userfault};
use mmu::{Error as MmuError, Mmu, PageSize, Translation};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use userfaultfd::Event;
use vmm_sys_util::eventfd::EventFd;

/// A sequential access stream seen by fault-around.
#[derive(Clone, Copy, Default)]
struct Stream {
    /// Where its next fault is expected.
    next: u64,
    /// Its window, in pages.
    pages: u64,
    used: u64,
}

/// Streams tracked per region (vCPUs walking their own areas).
const STREAMS: usize = 8;
/// Largest fault-around window, in 4 KiB pages (2 MiB).
pub const MAX_FAULT_AROUND: u64 = 512;

fn zeros() -> &'static [u8] {
    static Z: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    Z.get_or_init(|| vec![0; crate::layout::HUGE as usize])
}

/// First retry of deferred faults, and the longest gap between retries.
const RETRY_FIRST_NS: u64 = 50_000;
const RETRY_MAX_NS: u64 = 2_000_000;
/// How long a fault waits for huge pages an earlier generation still holds.
const HUGE_PAGE_WAIT: Duration = Duration::from_secs(10);

pub(super) struct Handler {
    tracking: Tracking,
    uffd: Arc<Userfault>,
    ram: Arc<GuestRam>,
    mmu: Arc<Mmu>,
    stats: Arc<FaultStats>,
    page_size: u64,
    /// Faulting (address, write) pairs to retry.
    pending: Vec<(u64, bool)>,
    /// Largest window in pages (0 or 1: off).
    fault_around: u64,
    /// Per region: zero-filled (fault-around applies) and its end.
    zero_region: Vec<bool>,
    region_ends: Vec<u64>,
    streams: Vec<[Stream; STREAMS]>,
    clock: u64,
    /// Since when a fault has waited for a free huge page.
    huge_wait_since: Option<Instant>,
}

impl Handler {
    pub(super) fn new(
        tracking: Tracking,
        fault_around: u64,
        uffd: Arc<Userfault>,
        ram: Arc<GuestRam>,
        mmu: Arc<Mmu>,
        stats: Arc<FaultStats>,
    ) -> Handler {
        let regions = ram.regions();
        Handler {
            tracking,
            fault_around: fault_around.min(MAX_FAULT_AROUND),
            zero_region: (0..regions.len()).map(|i| !ram.has_image(i)).collect(),
            region_ends: regions.iter().map(|r| r.gpa + r.size).collect(),
            streams: vec![[Stream::default(); STREAMS]; regions.len()],
            clock: 1,
            huge_wait_since: None,
            page_size: ram.backing().page_size(),
            uffd,
            ram,
            mmu,
            stats,
            pending: Vec::new(),
        }
    }
}

/// Populate `page` (a host address in region `at`'s current mapping, or a
/// retiring one when `at` is None) with its initial content, without
/// waking anyone.
fn populate(
    uffd: &Userfault,
    ram: &GuestRam,
    page_size: u64,
    at: Option<(usize, u64)>,
    page: u64,
) -> Fill {
    if let Some((index, gpa)) = at {
        if let Some(img) = ram.image(index) {
            if page_size == crate::layout::PAGE {
                if let Some(p) = img.page(gpa) {
                    return uffd.copy(page, p);
                }
            } else {
                let mut buf = vec![0u8; page_size as usize];
                for off in (0..page_size).step_by(crate::layout::PAGE as usize) {
                    if let Some(p) = img.page(gpa + off) {
                        buf[off as usize..(off + crate::layout::PAGE) as usize].copy_from_slice(p);
                    }
                }
                return uffd.copy(page, &buf);
            }
        }
    }
    if page_size == crate::layout::PAGE {
        uffd.zero(page, page_size)
    } else {
        // hugetlbfs has no UFFDIO_ZEROPAGE.
        uffd.copy(page, zeros())
    }
}

/// Makes guest pages present and tracked on behalf of a device (the RNIC's
/// page-fault thread): the same protocol as a vCPU fault, driven from
/// another thread.
pub struct GuestResolver {
    uffd: Option<Arc<Userfault>>,
    ram: Arc<GuestRam>,
    mmu: std::sync::Weak<Mmu>,
    stats: Arc<FaultStats>,
}

impl GuestResolver {
    pub fn new(
        uffd: Option<Arc<Userfault>>,
        ram: Arc<GuestRam>,
        mmu: &Arc<Mmu>,
        stats: Arc<FaultStats>,
    ) -> Self {
        GuestResolver {
            uffd,
            ram,
            mmu: Arc::downgrade(mmu),
            stats,
        }
    }
}

impl mmu::FaultResolver for GuestResolver {
    fn resolve(&self, gpa: u64, len: u64, _write: bool) -> Result<(), MmuError> {
        let mmu = self.mmu.upgrade().ok_or(MmuError::Resolve {
            gpa,
            reason: "the VM is gone".into(),
        })?;
        let ps = self.ram.backing().page_size();
        let start = gpa & !(ps - 1);
        let end = (gpa + len).next_multiple_of(ps);
        let index = self
            .ram
            .index_of(start)
            .ok_or(MmuError::OutsideRegions { gpa, end })?;
        let size = if ps == crate::layout::HUGE {
            PageSize::Huge
        } else {
            PageSize::Small
        };
        let mut woken = Vec::new();
        let outcome = mmu.fault_in(start, end - start, |t, out| {
            woken.clear();
            let mut page = t.gpa();
            while page < t.end() {
                let hva = t.host_addr(page)?;
                if let Some(uffd) = &self.uffd {
                    let mut tries = 0;
                    loop {
                        match populate(uffd, &self.ram, ps, Some((index, page)), hva) {
                            Fill::Exists if !present(hva, ps) && tries < 1000 => {
                                tries += 1;
                                std::thread::sleep(std::time::Duration::from_micros(20));
                            }
                            Fill::Done | Fill::Filled(_) => break,
                            Fill::Exists if present(hva, ps) => break,
                            Fill::Again if tries < 1000 => {
                                tries += 1;
                                std::thread::sleep(std::time::Duration::from_micros(20));
                            }
                            other => {
                                return Err(MmuError::Resolve {
                                    gpa: page,
                                    reason: format!("populating: {other:?}"),
                                })
                            }
                        }
                    }
                    woken.push(hva);
                }
                out.push(Translation {
                    gpa: page,
                    hva,
                    size,
                    writable: true,
                });
                page += ps;
            }
            Ok(())
        })?;
        // vCPUs may be waiting on these pages too.
        if let Some(uffd) = &self.uffd {
            for hva in &woken {
                uffd.wake(*hva, ps);
            }
        }
        self.stats
            .device_pages
            .fetch_add((end - start) / crate::layout::PAGE, Ordering::Relaxed);
        self.stats
            .retries
            .fetch_add(u64::from(outcome.retries), Ordering::Relaxed);
        Ok(())
    }
}

/// How many times a single fault may race before it is deferred.
const INLINE_RETRIES: u32 = 8;

enum Step {
    Done,
    Defer,
}

impl Handler {
    /// The fault-around window for a fault at `gpa` in region `index`:
    /// sequential streams double their window up to the maximum, anything
    /// else starts a new stream of one page.
    fn window(&mut self, index: usize, gpa: u64, region_end: u64) -> u64 {
        let ps = self.page_size;
        if self.fault_around <= 1 || ps != crate::layout::PAGE || !self.zero_region[index] {
            return ps;
        }
        let streams = &mut self.streams[index];
        // A stream with no window is an unused slot, not one expecting
        // gpa 0 (Linux's first fault is there).
        let pages = match streams.iter_mut().find(|s| s.pages > 0 && s.next == gpa) {
            Some(s) => {
                s.pages = (s.pages * 2).min(self.fault_around);
                s.used = self.clock;
                s.pages
            }
            None => {
                let lru = streams
                    .iter_mut()
                    .min_by_key(|s| s.used)
                    .expect("streams are preallocated");
                *lru = Stream {
                    next: 0,
                    pages: 1,
                    used: self.clock,
                };
                1
            }
        };
        self.clock += 1;
        (pages * ps).min(region_end - gpa)
    }

    /// Remember where the stream that resolved `[gpa, gpa + len)` goes on.
    fn advance(&mut self, index: usize, gpa: u64, len: u64) {
        if let Some(s) = self.streams[index].iter_mut().max_by_key(|s| s.used) {
            if s.next == gpa || s.next == 0 {
                s.next = gpa + len;
            }
        }
    }

    fn handle(&mut self, addr: u64, write: bool) -> Step {
        let page = addr & !(self.page_size - 1);
        if self.tracking == Tracking::RawUffd {
            let at = match self.ram.find_hva(page) {
                Some(HvaHit::Current { index, gpa, .. }) => Some((index, gpa)),
                _ => None,
            };
            return match self.fill(at, page) {
                Fill::Again => Step::Defer,
                _ => {
                    self.stats.faults.fetch_add(1, Ordering::Relaxed);
                    self.stats
                        .pages
                        .fetch_add(self.page_size / crate::layout::PAGE, Ordering::Relaxed);
                    if let Some((index, _)) = at {
                        self.stats.per_region[index].fetch_add(1, Ordering::Relaxed);
                    }
                    self.uffd.wake(page, self.page_size);
                    Step::Done
                }
            };
        }
        for _ in 0..INLINE_RETRIES {
            let (index, gpa, retiring) = match self.ram.find_hva(page) {
                None => {
                    // Only registered mappings report faults: this one was
                    // retired by a teardown and unmapped since.
                    self.race(&format!("fault at {addr:#x} on a mapping gone since"));
                    self.uffd.wake(page, self.page_size);
                    return Step::Done;
                }
                Some(HvaHit::Retired) => {
                    self.untracked(None, page);
                    return Step::Done;
                }
                Some(HvaHit::Current {
                    index,
                    gpa,
                    retiring,
                }) => (index, gpa, retiring),
            };
            let region_end = self.region_ends[index];
            let len = self.window(index, gpa, region_end);
            let t = match self.mmu.try_read_begin(gpa, len) {
                Err(MmuError::Busy { teardown: true, .. }) if retiring => {
                    self.untracked(Some((index, gpa)), page);
                    return Step::Done;
                }
                Err(MmuError::Busy { .. }) => return Step::Defer,
                Err(e) => {
                    self.error(&format!("fault at gpa {gpa:#x}: {e}"));
                    self.fill(Some((index, gpa)), page);
                    self.uffd.wake(page, self.page_size);
                    return Step::Done;
                }
                Ok(t) => t,
            };
            if t.host_addr(gpa) != Ok(page) {
                continue; // the mapping moved under us: look again
            }
            // Populate the window; the kernel stops at the first page
            // already present, so fault-around never overwrites anything.
            let filled = match self.fill_window(index, gpa, page, len, write) {
                Fill::Done => len,
                Fill::Filled(n) => n.max(self.page_size),
                Fill::Exists if present(page, self.page_size) => self.page_size,
                // "Exists" with nothing there: hugetlbfs out of huge pages
                // answers so; otherwise a racing discard, so look again.
                Fill::Exists => {
                    if self.page_size == crate::layout::HUGE
                        && crate::memory::free_huge_pages() == 0
                    {
                        return self.huge_page_shortage(gpa);
                    }
                    return Step::Defer;
                }
                Fill::Again => return Step::Defer,
                Fill::Failed(libc::ENOMEM) => {
                    self.stats
                        .fail(format!("out of memory populating gpa {gpa:#x}"));
                    self.uffd.wake(page, self.page_size);
                    return Step::Done;
                }
                Fill::Failed(libc::ENOENT) => {
                    // The mapping was unregistered by a teardown meanwhile.
                    self.race(&format!(
                        "populating gpa {gpa:#x} of a mapping just retired"
                    ));
                    self.uffd.wake(page, self.page_size);
                    return Step::Done;
                }
                Fill::Failed(errno) => {
                    self.error(&format!(
                        "populating gpa {gpa:#x}: {}",
                        std::io::Error::from_raw_os_error(errno)
                    ));
                    self.uffd.wake(page, self.page_size);
                    return Step::Done;
                }
            };
            let size = if self.page_size == crate::layout::HUGE {
                PageSize::Huge
            } else {
                PageSize::Small
            };
            let trs: Vec<Translation> = (0..filled / self.page_size)
                .map(|i| Translation {
                    gpa: gpa + i * self.page_size,
                    hva: page + i * self.page_size,
                    size,
                    writable: true,
                })
                .collect();
            match self.mmu.install(&t, &trs) {
                Ok(_) => {
                    let pages = filled / crate::layout::PAGE;
                    self.stats.faults.fetch_add(1, Ordering::Relaxed);
                    self.stats.pages.fetch_add(pages, Ordering::Relaxed);
                    self.stats.per_region[index].fetch_add(1, Ordering::Relaxed);
                    self.stats.pages_per_fault.record(pages);
                    if filled > self.page_size {
                        let extra = (filled - self.page_size) / crate::layout::PAGE;
                        self.stats.speculative.fetch_add(extra, Ordering::Relaxed);
                        self.ram
                            .mark_speculative(index, gpa + self.page_size, extra);
                    }
                    self.advance(index, gpa, filled);
                    self.uffd.wake(page, filled);
                    return Step::Done;
                }
                Err(MmuError::Stale) => {
                    self.stats.retries.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    self.error(&format!("installing gpa {gpa:#x}: {e}"));
                    self.uffd.wake(page, filled);
                    return Step::Done;
                }
            }
        }
        Step::Defer
    }

    /// Populate `[page, page + len)` of a region: the boot image page by
    /// page, zero RAM in one ioctl (writable copies for a write fault, so
    /// the guest's writes do not take a copy-on-write fault each).
    fn fill_window(&self, index: usize, gpa: u64, page: u64, len: u64, write: bool) -> Fill {
        if len == self.page_size {
            return self.fill(Some((index, gpa)), page);
        }
        let filled = if write {
            self.uffd.copy(page, &zeros()[..len as usize])
        } else {
            self.uffd.zero(page, len)
        };
        match filled {
            // One ioctl fills one VMA: a window across a VMA boundary in
            // guest RAM (split by anything) is refused whole, and the same
            // fault would get the same window again, forever. The faulting
            // page alone lies in one VMA.
            // `Done` would claim the whole window: only the page is filled.
            Fill::Failed(libc::ENOENT) => match self.fill(Some((index, gpa)), page) {
                Fill::Done => Fill::Filled(self.page_size),
                other => other,
            },
            other => other,
        }
    }

    fn fill(&self, at: Option<(usize, u64)>, page: u64) -> Fill {
        populate(&self.uffd, &self.ram, self.page_size, at, page)
    }

    fn untracked(&self, at: Option<(usize, u64)>, page: u64) {
        self.stats.untracked.fetch_add(1, Ordering::Relaxed);
        match self.fill(at, page) {
            Fill::Done | Fill::Filled(_) | Fill::Exists | Fill::Again => {}
            // Unregistered by the teardown already: the page dies with it.
            Fill::Failed(libc::ENOENT) => self.race("populating a page of a retired mapping"),
            Fill::Failed(errno) => self.error(&format!(
                "populating a retiring page: {}",
                std::io::Error::from_raw_os_error(errno)
            )),
        }
        self.uffd.wake(page, self.page_size);
    }

    /// An expected race with a teardown: counted, not an error.
    fn race(&self, what: &str) {
        self.stats.teardown_races.fetch_add(1, Ordering::Relaxed);
        log::debug!("fault handler: teardown race: {what}");
    }

    fn error(&self, what: &str) {
        if self.stats.errors.fetch_add(1, Ordering::Relaxed) < 10 {
            log::error!("fault handler: {what}");
        }
    }

    fn drain(&mut self) -> Result<(), crate::uffd::UffdError> {
        // An injected failure takes effect before the next event is read.
        while self.stats.inject.load(Ordering::SeqCst) == 0 {
            let Some(ev) = self.uffd.read_event()? else {
                break;
            };
            match ev {
                Event::Pagefault { addr, rw, .. } => {
                    let write = rw == userfaultfd::ReadWrite::Write;
                    if let Step::Defer = self.handle(addr as u64, write) {
                        self.stats.deferred.fetch_add(1, Ordering::Relaxed);
                        self.pending.push((addr as u64, write));
                    }
                }
                Event::Remove { .. } => {
                    self.stats.removes.fetch_add(1, Ordering::Relaxed);
                }
                other => log::debug!("userfaultfd event ignored: {other:?}"),
            }
        }
        Ok(())
    }

    /// hugetlbfs has no free huge page for `gpa` (the kernel answers EEXIST
    /// for a page that is not there). While an earlier generation's
    /// mappings still hold huge pages the reclaimer is about to give back
    /// (a teardown swapped in an unreserved fresh mapping), the fault waits
    /// for them; otherwise, or after `HUGE_PAGE_WAIT`, the pool is truly
    /// short and the VM stops with the reason
    /// (`a_teardown_storm_on_a_hugetlbfs_guest_does_not_run_the_pool_dry`).
    fn huge_page_shortage(&mut self, gpa: u64) -> Step {
        let since = *self.huge_wait_since.get_or_insert_with(Instant::now);
        if self.ram.retired_count() > 0 && since.elapsed() < HUGE_PAGE_WAIT {
            return Step::Defer;
        }
        self.stats.fail(format!(
            "no free 2 MiB huge page for gpa {gpa:#x} (the kernel answers EEXIST for a page that is not there)"
        ));
        Step::Defer
    }

    /// Retry the deferred faults; whether any of them was served.
    fn retry_pending(&mut self) -> bool {
        let pending = std::mem::take(&mut self.pending);
        let before = pending.len();
        for (addr, write) in pending {
            if let Step::Defer = self.handle(addr, write) {
                self.pending.push((addr, write));
            }
        }
        if self.pending.is_empty() {
            self.huge_wait_since = None;
        }
        self.pending.len() < before
    }

    pub(super) fn run(mut self, stop: EventFd) {
        let mut fds = [
            libc::pollfd {
                fd: self.uffd.fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // Deferred faults wait for an invalidation to end (or for huge
        // pages to come back): look again after `RETRY_FIRST`, then ever
        // less often up to `RETRY_MAX` while nothing moves, so a long
        // invalidation costs this real-time thread a few hundred wakeups a
        // second, not 20 000
        // (`a_deferred_fault_does_not_make_the_fifo_fault_thread_poll_every_50us`).
        let mut retry_ns = RETRY_FIRST_NS;
        loop {
            self.stats.heartbeat.fetch_add(1, Ordering::SeqCst);
            match self.stats.inject.load(Ordering::SeqCst) {
                x if x == Injected::Exit as u8 => {
                    return self.stats.fail("ended on an injected error".into());
                }
                x if x == Injected::Stall as u8 => {
                    // Serve nothing, beat no heartbeat; end when told to.
                    let mut stop_fd = [fds[1]];
                    // SAFETY: one valid pollfd; blocks until stop.
                    unsafe { libc::poll(stop_fd.as_mut_ptr(), 1, -1) };
                    return;
                }
                _ => {}
            }
            let retry_after = libc::timespec {
                tv_sec: 0,
                tv_nsec: retry_ns as libc::c_long,
            };
            let timeout = if self.pending.is_empty() {
                std::ptr::null()
            } else {
                &retry_after as *const libc::timespec
            };
            // SAFETY: `fds` outlives the call; a null timeout means block.
            let n = unsafe { libc::ppoll(fds.as_mut_ptr(), 2, timeout, std::ptr::null()) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return self.stats.fail(format!("poll: {e}"));
            }
            if fds[1].revents != 0 {
                return;
            }
            if let Err(e) = self.drain() {
                return self.stats.fail(e.to_string());
            }
            if !self.pending.is_empty() {
                retry_ns = if n > 0 || self.retry_pending() {
                    RETRY_FIRST_NS
                } else {
                    (retry_ns * 2).min(RETRY_MAX_NS)
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{Backing, Content};

    /// Issue 11 item 14: a fault at gpa 0 matched an unused stream slot
    /// (expecting gpa 0 with no window), got an empty fault-around window
    /// and was never tracked ("empty range at 0x0" on every Linux boot).
    /// Real userfaultfd, guest RAM and mmu; the fault is resolved as the
    /// fault thread would, from this thread.
    #[test]
    fn the_first_fault_at_gpa_zero_is_tracked() {
        let uffd = Arc::new(Userfault::new().expect("userfaultfd"));
        let size = 2 << 20;
        let ram = Arc::new(
            GuestRam::new(
                Backing::Anonymous,
                Some(uffd.clone()),
                vec![("ram0".into(), 0, size, Content::Zero)],
            )
            .unwrap(),
        );
        let mmu = Mmu::new(mmu::Config::default()).unwrap();
        let r = &ram.regions()[0];
        mmu.add_region(mmu::RegionSpec {
            name: r.name.clone(),
            gpa: 0,
            size,
            hva: r.hva,
        })
        .unwrap();
        let stats = Arc::new(FaultStats::new(1));
        let mut h = Handler {
            tracking: Tracking::Mmu,
            fault_around: 64,
            zero_region: vec![true],
            region_ends: vec![size],
            streams: vec![[Stream::default(); STREAMS]],
            clock: 1,
            huge_wait_since: None,
            uffd,
            ram: ram.clone(),
            mmu: mmu.clone(),
            stats: stats.clone(),
            page_size: crate::layout::PAGE,
            pending: Vec::new(),
        };
        assert!(matches!(h.handle(r.hva, false), Step::Done));
        assert_eq!(FaultStats::get(&stats.errors), 0);
        assert!(mmu.lookup(0).is_some(), "gpa 0 is not tracked");
        // The next fault continues the stream: a wider window.
        assert!(matches!(h.handle(r.hva + 4096, false), Step::Done));
        assert!(mmu.lookup(4096).is_some());
        assert_eq!(FaultStats::get(&stats.faults), 2);
    }
}
