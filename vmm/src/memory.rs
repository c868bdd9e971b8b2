//! Guest RAM: vm-memory mappings registered with userfaultfd, one per
//! region, never populated up front.
//!
//! Each region has a *current* mapping (what KVM's memslot points at) and
//! possibly *retired* ones holding the pages of earlier generations. A
//! teardown of private anonymous RAM keeps the current mapping and moves its
//! pages out to a retired range (`retire_in_place`: `mremap` with
//! `MREMAP_DONTUNMAP`, chunk by chunk, vCPUs running; the range stays
//! registered with userfaultfd, so the guest next sees fresh memory); those
//! are given back by `release_moved` on the KVM mirror's releaser thread.
//! Shared backings instead get a fresh mapping (`swap`; KVM's memslot is
//! moved to it with the vCPUs paused) and the old one is released by the
//! mmu's reclaimer (`release_retired`, then `drop_retired`). Tests:
//! `teardown::stamped_writers_see_no_stale_page_and_lose_no_write`,
//! `kvm::memfd_backing_runs_the_same_guest`, `kvm::teardown_while_*`.

use crate::payload::BootImage;
use crate::uffd::{UffdError, Userfault};
use parking_lot::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("mapping {size:#x} bytes of guest memory: {source}")]
    Map {
        size: u64,
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("creating a memfd for guest memory: {0}")]
    Memfd(std::io::Error),
    #[error("sizing the guest memory file to {size:#x} bytes: {source} (for hugetlbfs: are enough 2 MiB huge pages reserved in /proc/sys/vm/nr_hugepages?)")]
    Truncate { size: u64, source: std::io::Error },
    #[error("--backing hugetlbfs needs {need} free 2 MiB huge pages, only {free} are free (raise /proc/sys/vm/nr_hugepages)")]
    HugePages { need: u64, free: u64 },
    #[error("building the guest memory map: {0}")]
    Regions(String),
    #[error(transparent)]
    Uffd(#[from] UffdError),
    #[error("moving guest pages out for a teardown: {0}")]
    Retire(std::io::Error),
}

/// What backs guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Backing {
    /// Private anonymous memory (the default).
    #[default]
    Anonymous,
    /// A shared memfd (shmem).
    Memfd,
    /// 2 MiB huge pages (a hugetlbfs memfd); faults resolve 2 MiB at a time.
    Hugetlbfs,
}

impl std::str::FromStr for Backing {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "anon" | "anonymous" => Ok(Backing::Anonymous),
            "memfd" | "shmem" => Ok(Backing::Memfd),
            "hugetlbfs" | "hugetlb" | "huge" => Ok(Backing::Hugetlbfs),
            _ => Err(format!(
                "unknown memory backing {s:?} (anonymous, memfd or hugetlbfs)"
            )),
        }
    }
}

impl Backing {
    pub fn as_str(self) -> &'static str {
        match self {
            Backing::Anonymous => "anonymous",
            Backing::Memfd => "memfd",
            Backing::Hugetlbfs => "hugetlbfs",
        }
    }

    /// The size a fault must resolve at once.
    pub fn page_size(self) -> u64 {
        match self {
            Backing::Hugetlbfs => crate::layout::HUGE,
            _ => crate::layout::PAGE,
        }
    }
}

/// What a region reads as before it is written.
#[derive(Clone)]
pub enum Content {
    Zero,
    /// A boot image's pages (zero elsewhere).
    Image(Arc<BootImage>),
}

/// A region as the rest of the VMM sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionDesc {
    pub name: String,
    pub gpa: u64,
    pub size: u64,
    /// Host address of the current mapping.
    pub hva: u64,
}

/// A mapping that held a region's pages before a teardown.
enum Mapping {
    /// The old current mapping itself (slot-move teardowns).
    Region(Arc<MmapRegion>),
    /// Pages moved out from under the current mapping (`retire_in_place`):
    /// `[addr, addr + len)` lies in a reservation `[base, base + reserved)`
    /// this module unmaps as a whole.
    Moved { addr: u64, base: u64, reserved: u64 },
}

impl Mapping {
    fn addr(&self) -> u64 {
        match self {
            Mapping::Region(m) => m.as_ptr() as u64,
            Mapping::Moved { addr, .. } => *addr,
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if let Mapping::Moved { base, reserved, .. } = *self {
            // Piece by piece: each munmap holds the mmap lock for writing,
            // and every vCPU refault queues behind a writer.
            let mut off = 0;
            while off < reserved {
                let n = UNMAP_CHUNK.min(reserved - off);
                // SAFETY: the reservation was mapped by `retire_in_place`
                // and is referred to by nothing else (no memslot, no mmu
                // region, no device: mirrors stopped using it before it
                // was retired); `[base + off, +n)` lies inside it.
                unsafe { libc::munmap((base + off) as *mut libc::c_void, n as usize) };
                off += n;
            }
        }
    }
}

/// Bytes of a retired reservation unmapped per `munmap` (its pages are
/// given back already: this frees page tables only, ~0.1 ms a piece).
const UNMAP_CHUNK: u64 = 64 << 20;

struct Retired {
    mapping: Mapping,
    /// The generation that retired it; dropped once the mmu has reclaimed
    /// every generation below this one.
    generation: u64,
    /// Bytes of it already given back (`release_moved`).
    released: u64,
}

/// How long the parts of `retire_in_place` took.
#[derive(Clone, Copy, Debug, Default)]
pub struct RetireTiming {
    /// Reserving the destination (an empty PROT_NONE mapping).
    pub reserve_ns: u64,
    /// The `mremap`s: the kernel's MMU-notifier invalidation of the range
    /// (KVM zaps its shadow entries for it) and the page-table move.
    pub mremap_ns: u64,
    /// The longest single chunk: how long a vCPU touching it may wait.
    pub chunk_max_ns: u64,
}

struct Region {
    name: String,
    gpa: u64,
    size: u64,
    content: Content,
    current: Arc<MmapRegion>,
    retired: Vec<Retired>,
    /// A teardown is about to retire `current`: faults on it may be served
    /// without tracking (their pages die with the mapping).
    retiring: bool,
    /// Pages resolved speculatively (fault-around) and not yet counted as
    /// used or wasted: one bit per 4 KiB page of the current mapping.
    speculative: Vec<AtomicU64>,
}

fn bitmap(size: u64) -> Vec<AtomicU64> {
    (0..(size / crate::layout::PAGE).div_ceil(64))
        .map(|_| AtomicU64::new(0))
        .collect()
}

impl Region {
    fn hva(&self) -> u64 {
        self.current.as_ptr() as u64
    }
}

/// Where a faulting host address lies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HvaHit {
    /// In region `index`'s current mapping, at `gpa`; `retiring` while a
    /// teardown is replacing that mapping.
    Current {
        index: usize,
        gpa: u64,
        retiring: bool,
    },
    /// In a retired mapping (a fault still in flight from before a teardown).
    Retired,
}

pub struct GuestRam {
    backing: Backing,
    /// None: memory is not registered (the kernel fills it on first touch;
    /// a benchmark baseline with no fault tracking at all).
    uffd: Option<Arc<Userfault>>,
    regions: RwLock<Vec<Region>>,
    memory: RwLock<Arc<GuestMemoryMmap>>,
}

/// Map a region. With `reserve`, hugetlbfs pages are reserved by the kernel
/// now (mmap fails if they are not there) instead of failing at fault time.
fn map(
    backing: Backing,
    name: &str,
    size: u64,
    reserve: bool,
) -> Result<Arc<MmapRegion>, MemoryError> {
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    let region = match backing {
        Backing::Anonymous => MmapRegion::build(
            None,
            size as usize,
            prot,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
        ),
        Backing::Memfd | Backing::Hugetlbfs => {
            let mut flags = libc::MFD_CLOEXEC;
            if backing == Backing::Hugetlbfs {
                flags |= libc::MFD_HUGETLB | libc::MFD_HUGE_2MB;
            }
            let cname = std::ffi::CString::new(format!("odpvm-{name}")).expect("no NUL in names");
            // SAFETY: memfd_create with a valid C string; the fd is owned
            // by the File below.
            let fd = unsafe { libc::memfd_create(cname.as_ptr(), flags) };
            if fd < 0 {
                return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
            }
            // SAFETY: fd was just created and is not owned elsewhere.
            let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
            file.set_len(size)
                .map_err(|source| MemoryError::Truncate { size, source })?;
            let noreserve = if reserve && backing == Backing::Hugetlbfs {
                0
            } else {
                libc::MAP_NORESERVE
            };
            MmapRegion::build(
                Some(FileOffset::new(file, 0)),
                size as usize,
                prot,
                libc::MAP_SHARED | noreserve,
            )
        }
    };
    region
        .map(Arc::new)
        .map_err(|source| MemoryError::Map { size, source })
}

impl GuestRam {
    /// Map and register every region. Nothing is populated.
    pub fn new(
        backing: Backing,
        uffd: Option<Arc<Userfault>>,
        layout: Vec<(String, u64, u64, Content)>,
    ) -> Result<Self, MemoryError> {
        if backing == Backing::Hugetlbfs {
            // Checked up front: a shortage found at fault time leaves the
            // guest faulting on a page that never comes.
            let need = layout.iter().map(|l| l.2).sum::<u64>() / crate::layout::HUGE;
            let free = free_huge_pages();
            if free < need {
                return Err(MemoryError::HugePages { need, free });
            }
        }
        let mut regions = Vec::new();
        for (name, gpa, size, content) in layout {
            let current = map(backing, &name, size, true)?;
            match &uffd {
                Some(u) => u.register(current.as_ptr() as u64, size)?,
                None => {
                    // Nobody serves faults: write initial content now.
                    if let Content::Image(img) = &content {
                        for (page, bytes) in img.pages() {
                            // SAFETY: the page lies inside the fresh mapping
                            // of this region (the image fits its region).
                            unsafe {
                                std::ptr::copy_nonoverlapping(
                                    bytes.as_ptr(),
                                    current.as_ptr().add((page - gpa) as usize),
                                    bytes.len(),
                                )
                            };
                        }
                    }
                }
            }
            regions.push(Region {
                name,
                gpa,
                size,
                content,
                current,
                retired: Vec::new(),
                retiring: false,
                speculative: bitmap(size),
            });
        }
        let memory = Arc::new(Self::memory_map(&regions)?);
        Ok(GuestRam {
            backing,
            uffd,
            regions: RwLock::new(regions),
            memory: RwLock::new(memory),
        })
    }

    fn memory_map(regions: &[Region]) -> Result<GuestMemoryMmap, MemoryError> {
        let list = regions
            .iter()
            .map(|r| {
                GuestRegionMmap::with_arc(r.current.clone(), GuestAddress(r.gpa))
                    .ok_or_else(|| MemoryError::Regions(format!("region {} overflows", r.name)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        GuestMemoryMmap::from_regions(list).map_err(|e| MemoryError::Regions(e.to_string()))
    }

    pub fn backing(&self) -> Backing {
        self.backing
    }

    pub fn regions(&self) -> Vec<RegionDesc> {
        self.regions
            .read()
            .iter()
            .map(|r| RegionDesc {
                name: r.name.clone(),
                gpa: r.gpa,
                size: r.size,
                hva: r.hva(),
            })
            .collect()
    }

    /// The current guest memory map (vm-memory), for loaders and tools.
    pub fn memory(&self) -> Arc<GuestMemoryMmap> {
        self.memory.read().clone()
    }

    /// Which mapping a faulting host address belongs to.
    pub fn find_hva(&self, hva: u64) -> Option<HvaHit> {
        let regions = self.regions.read();
        for (index, r) in regions.iter().enumerate() {
            let base = r.hva();
            if hva >= base && hva < base + r.size {
                return Some(HvaHit::Current {
                    index,
                    gpa: r.gpa + (hva - base),
                    retiring: r.retiring,
                });
            }
            if r.retired.iter().any(|m| {
                let b = m.mapping.addr();
                hva >= b && hva < b + r.size
            }) {
                return Some(HvaHit::Retired);
            }
        }
        None
    }

    /// Region `index`'s boot image, if it has one.
    pub fn image(&self, index: usize) -> Option<Arc<BootImage>> {
        match &self.regions.read().get(index)?.content {
            Content::Image(img) => Some(img.clone()),
            Content::Zero => None,
        }
    }

    /// Whether region `index` starts from a boot image (not zeros).
    pub fn has_image(&self, index: usize) -> bool {
        matches!(self.regions.read()[index].content, Content::Image(_))
    }

    /// Host address of `gpa` in the current mapping.
    pub fn hva(&self, gpa: u64) -> Option<u64> {
        self.regions
            .read()
            .iter()
            .find(|r| gpa >= r.gpa && gpa < r.gpa + r.size)
            .map(|r| r.hva() + (gpa - r.gpa))
    }

    /// Release the host pages behind `[gpa, gpa + len)` in the current
    /// mappings (`MADV_DONTNEED`: the kernel zaps KVM's shadow entries for
    /// them before returning; the next guest access faults through
    /// userfaultfd and sees fresh memory). Returns bytes released.
    ///
    /// Also returns how many speculatively resolved pages in the range were
    /// never written (still the shared zero page): fault-around's waste.
    pub fn discard(&self, gpa: u64, len: u64) -> (u64, u64) {
        // The region lock is not held across madvise: a REMOVE event makes
        // madvise wait for the fault thread, which may need the lock.
        let mut ranges = Vec::new();
        let mut wasted = 0;
        {
            let regions = self.regions.read();
            let end = gpa + len;
            for r in regions.iter() {
                let (s, e) = (gpa.max(r.gpa), end.min(r.gpa + r.size));
                if s < e {
                    wasted += take_unwritten(r, s, e);
                    ranges.push((r.hva() + (s - r.gpa), e - s));
                }
            }
        }
        let mut done = 0;
        for (hva, n) in ranges {
            madvise_dontneed(hva, n, self.backing);
            done += n;
        }
        (done, wasted)
    }

    /// Note pages fault-around resolved without a fault of their own.
    pub fn mark_speculative(&self, index: usize, gpa: u64, pages: u64) {
        let regions = self.regions.read();
        let r = &regions[index];
        let first = (gpa - r.gpa) / crate::layout::PAGE;
        for p in first..first + pages {
            r.speculative[(p / 64) as usize].fetch_or(1 << (p % 64), Ordering::Relaxed);
        }
    }

    /// Speculatively resolved pages never written so far (all regions);
    /// their marks are cleared.
    pub fn take_wasted(&self) -> u64 {
        let regions = self.regions.read();
        regions
            .iter()
            .map(|r| take_unwritten(r, r.gpa, r.gpa + r.size))
            .sum()
    }

    /// Mark the current mappings of `indices` as about to be retired (or
    /// not any more).
    pub fn set_retiring(&self, indices: &[usize], retiring: bool) {
        let mut regions = self.regions.write();
        for &i in indices {
            regions[i].retiring = retiring;
        }
    }

    /// Index of the region containing `gpa`.
    pub fn index_of(&self, gpa: u64) -> Option<usize> {
        self.regions
            .read()
            .iter()
            .position(|r| gpa >= r.gpa && gpa < r.gpa + r.size)
    }

    /// Give region `index` a fresh, registered mapping (O(1) in how much of
    /// the old one is populated); the old one is retired at `generation`.
    /// Returns (gpa, size, new hva). The caller moves the KVM memslot and
    /// the mmu region to the new mapping while vCPUs are paused.
    pub fn swap(&self, index: usize, generation: u64) -> Result<(u64, u64, u64), MemoryError> {
        let (name, size) = {
            let r = &self.regions.read()[index];
            (r.name.clone(), r.size)
        };
        // Not reserved: the retired mapping still holds its reservation, and
        // its pages return to the pool as the reclaimer releases them.
        let fresh = map(self.backing, &name, size, false)?;
        if let Some(u) = &self.uffd {
            u.register(fresh.as_ptr() as u64, size)?;
        }
        let mut regions = self.regions.write();
        let r = &mut regions[index];
        let old = std::mem::replace(&mut r.current, fresh);
        // Nothing may fault on the old mapping any more; unregistering
        // also keeps reclaim's MADV_DONTNEED from queueing REMOVE events.
        if let Some(u) = &self.uffd {
            u.unregister(old.as_ptr() as u64, size);
        }
        r.retired.push(Retired {
            mapping: Mapping::Region(old),
            generation,
            released: 0,
        });
        // Marks describe the old mapping; the new one starts clean.
        for w in &r.speculative {
            w.store(0, Ordering::Relaxed);
        }
        let out = (r.gpa, r.size, r.hva());
        let map = Self::memory_map(&regions)?;
        *self.memory.write() = Arc::new(map);
        Ok(out)
    }

    /// Whether `retire_in_place` works for this memory: private anonymous
    /// memory registered with userfaultfd (moving shared pages away would
    /// leave the file's pages visible at the old address).
    pub fn can_retire_in_place(&self) -> bool {
        self.backing == Backing::Anonymous && self.uffd.is_some()
    }

    /// Give region `index` fresh memory at the same host address, without
    /// touching KVM's memslot: `mremap(MREMAP_DONTUNMAP)` moves every
    /// page (whole page tables, 2 MiB at a time when both sides are
    /// aligned) to a retired range and leaves the current mapping empty and
    /// still registered with userfaultfd, so the next access faults as on
    /// first touch. The kernel's MMU notifier makes KVM drop its shadow
    /// entries for the range before the call returns: O(what KVM has mapped
    /// there), done `chunk` bytes per call so a vCPU only waits if it
    /// touches the chunk being moved, and only for that chunk. Faults in
    /// the region meanwhile are served untracked (`set_retiring`). The
    /// retired pages are given back later by `release_moved`.
    pub fn retire_in_place(
        &self,
        index: usize,
        generation: u64,
        chunk: u64,
    ) -> Result<RetireTiming, MemoryError> {
        let (src, size) = {
            let r = &self.regions.read()[index];
            (r.hva(), r.size)
        };
        let t0 = std::time::Instant::now();
        let reserved = size + crate::layout::HUGE;
        // SAFETY: a new inaccessible reservation at an address the kernel
        // picks; nothing refers to it yet.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                reserved as usize,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(MemoryError::Retire(std::io::Error::last_os_error()));
        }
        let base = base as u64;
        // 2 MiB aligned like the source, so the kernel moves whole page
        // tables instead of single entries.
        let addr = base.next_multiple_of(crate::layout::HUGE);
        let reserve_ns = t0.elapsed().as_nanos() as u64;
        let mapping = Mapping::Moved {
            addr,
            base,
            reserved,
        };
        // Chunk by chunk: KVM's MMU-notifier invalidation of a chunk blocks
        // only vCPU accesses to that chunk, and only for as long as it
        // takes (O(chunk)); the rest of RAM stays usable meanwhile.
        let chunk = chunk.max(crate::layout::HUGE);
        let (mut mremap_ns, mut chunk_max_ns) = (0, 0);
        let mut off = 0;
        while off < size {
            let n = chunk.min(size - off);
            let t1 = std::time::Instant::now();
            // SAFETY: `[src + off, +n)` lies in region `index`'s live
            // mapping (owned by this module) and `[addr + off, +n)` in our
            // reservation. Afterwards the source stays mapped (empty,
            // registered) and every reference to its old pages is gone:
            // KVM's through the MMU notifier, devices' because the mmu told
            // them first.
            let moved = unsafe {
                libc::mremap(
                    (src + off) as *mut libc::c_void,
                    n as usize,
                    n as usize,
                    libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED | libc::MREMAP_DONTUNMAP,
                    (addr + off) as *mut libc::c_void,
                )
            };
            if moved == libc::MAP_FAILED {
                // Chunks already moved hold old pages: keep them retired
                // (the caller falls back to a memslot move for the rest).
                let e = std::io::Error::last_os_error();
                if off > 0 {
                    self.push_retired(index, mapping, generation);
                }
                return Err(MemoryError::Retire(e));
            }
            let ns = t1.elapsed().as_nanos() as u64;
            mremap_ns += ns;
            chunk_max_ns = chunk_max_ns.max(ns);
            off += n;
        }
        self.push_retired(index, mapping, generation);
        Ok(RetireTiming {
            reserve_ns,
            mremap_ns,
            chunk_max_ns,
        })
    }

    fn push_retired(&self, index: usize, mapping: Mapping, generation: u64) {
        let mut regions = self.regions.write();
        let r = &mut regions[index];
        r.retired.push(Retired {
            mapping,
            generation,
            released: 0,
        });
        for w in &r.speculative {
            w.store(0, Ordering::Relaxed);
        }
    }

    /// Give back the pages of the moved-out retired mappings of the region
    /// at `gpa`, `chunk` bytes per `MADV_DONTNEED` (each call holds the
    /// mmap lock for reading only, so faults and the next teardown
    /// interleave with it). Any generation: once `retire_in_place` has
    /// returned nothing uses those pages. Returns bytes released.
    pub fn release_moved(&self, gpa: u64, chunk: u64) -> u64 {
        let mut released = 0;
        loop {
            let next = {
                let mut regions = self.regions.write();
                let Some(r) = regions.iter_mut().find(|r| r.gpa == gpa) else {
                    return released;
                };
                let size = r.size;
                r.retired
                    .iter_mut()
                    .filter(|m| matches!(m.mapping, Mapping::Moved { .. }))
                    .find(|m| m.released < size)
                    .map(|m| {
                        let n = chunk.min(size - m.released);
                        let at = m.mapping.addr() + m.released;
                        m.released += n;
                        (at, n)
                    })
            };
            let Some((hva, n)) = next else {
                return released;
            };
            // Anonymous memory (the only kind moved out): DONTNEED frees it.
            // The retired range is not registered with userfaultfd, so no
            // REMOVE event waits for the fault thread. The mapping stays
            // mapped until `drop_retired`, which only this thread runs.
            madvise_dontneed(hva, n, Backing::Anonymous);
            released += n;
        }
    }

    /// Release host pages of retired mappings (extents from the mmu's
    /// reclaimer). Extents in a current mapping are ignored: they belong to
    /// a live generation.
    pub fn release_retired(&self, extents: &[mmu::Extent]) -> u64 {
        let ranges: Vec<(u64, u64)> = {
            let regions = self.regions.read();
            extents
                .iter()
                .filter(|e| {
                    regions.iter().any(|r| {
                        r.retired.iter().any(|m| {
                            let b = m.mapping.addr();
                            e.hva >= b && e.hva + e.len <= b + r.size
                        })
                    })
                })
                .map(|e| (e.hva, e.len))
                .collect()
        };
        // Retired mappings stay mapped until `drop_retired`, which only the
        // caller's thread (the reclaimer) runs after this returns.
        let mut released = 0;
        for (hva, len) in ranges {
            madvise_dontneed(hva, len, self.backing);
            released += len;
        }
        released
    }

    /// Unmap the retired mappings of the region at `gpa` whose generation
    /// is at most `below`, and the moved-out ones already released in
    /// full. Returns how many were unmapped.
    pub fn drop_retired(&self, gpa: u64, below: u64) -> usize {
        let dropped: Vec<Retired> = {
            let mut regions = self.regions.write();
            let Some(r) = regions.iter_mut().find(|r| r.gpa == gpa) else {
                return 0;
            };
            let size = r.size;
            let (keep, drop): (Vec<_>, Vec<_>) =
                r.retired.drain(..).partition(|m| match m.mapping {
                    Mapping::Region(_) => m.generation > below,
                    Mapping::Moved { .. } => m.released < size,
                });
            r.retired = keep;
            drop
        };
        // munmap outside the lock; the pages are mostly released already.
        dropped.len()
    }

    /// Retired mappings not yet unmapped (all regions).
    pub fn retired_count(&self) -> usize {
        self.regions.read().iter().map(|r| r.retired.len()).sum()
    }
}

/// A fresh private anonymous mapping of `len` bytes (populated up front
/// with `populate`), for the VMM's own buffers. The caller owns it.
pub fn map_anonymous(len: u64, populate: bool) -> Result<u64, String> {
    let extra = if populate {
        libc::MAP_POPULATE
    } else {
        libc::MAP_NORESERVE
    };
    // SAFETY: a new mapping at an address the kernel picks; nothing else
    // refers to it yet.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | extra,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(format!(
            "mapping {len} bytes: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(p as u64)
}

/// 2 MiB huge pages free and not reserved by anyone (`/proc/meminfo`).
pub fn free_huge_pages() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| -> u64 {
        meminfo
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    field("HugePages_Free:").saturating_sub(field("HugePages_Rsvd:"))
}

/// Make sure `n` 2 MiB huge pages are free, raising
/// `/proc/sys/vm/nr_hugepages` if needed (root). Err says why not.
pub fn reserve_huge_pages(n: u64) -> Result<(), String> {
    let free = || -> u64 {
        std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find(|l| l.starts_with("HugePages_Free:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse().ok())
            })
            .unwrap_or(0)
    };
    let have = free();
    if have >= n {
        return Ok(());
    }
    let total: u64 = std::fs::read_to_string("/proc/sys/vm/nr_hugepages")
        .map_err(|e| format!("reading /proc/sys/vm/nr_hugepages: {e}"))?
        .trim()
        .parse()
        .unwrap_or(0);
    std::fs::write("/proc/sys/vm/nr_hugepages", format!("{}", total + n - have))
        .map_err(|e| format!("cannot reserve 2 MiB huge pages ({e})"))?;
    match free() {
        f if f >= n => Ok(()),
        f => Err(format!(
            "only {f} free 2 MiB huge pages after asking for {n}"
        )),
    }
}

/// Count and clear the speculative marks of `[start, end)` whose page is
/// still the shared zero page (resolved, never written).
fn take_unwritten(r: &Region, start: u64, end: u64) -> u64 {
    let page = crate::layout::PAGE;
    let (first, last) = ((start - r.gpa) / page, (end - r.gpa) / page);
    let mut wasted = 0;
    let mut p = first;
    while p < last {
        let word = &r.speculative[(p / 64) as usize];
        let bits = word.load(Ordering::Relaxed);
        if bits == 0 {
            p = (p / 64 + 1) * 64;
            continue;
        }
        if bits & (1 << (p % 64)) != 0 {
            word.fetch_and(!(1 << (p % 64)), Ordering::Relaxed);
            if pagemap::is_zero_page(r.hva() + p * page) {
                wasted += 1;
            }
        }
        p += 1;
    }
    wasted
}

/// `/proc/self/pagemap`: whether a virtual page maps the kernel's shared
/// zero page (needs CAP_SYS_ADMIN to see frame numbers; without it nothing
/// counts as zero).
mod pagemap {
    use std::os::unix::fs::FileExt;
    use std::sync::OnceLock;

    struct Pagemap {
        file: std::fs::File,
        zero_pfn: u64,
    }

    const PFN_MASK: u64 = (1 << 55) - 1;
    const PRESENT: u64 = 1 << 63;

    fn entry(f: &std::fs::File, va: u64) -> Option<u64> {
        let mut b = [0u8; 8];
        f.read_exact_at(&mut b, va / 4096 * 8).ok()?;
        let e = u64::from_le_bytes(b);
        (e & PRESENT != 0).then_some(e & PFN_MASK)
    }

    fn get() -> Option<&'static Pagemap> {
        static PM: OnceLock<Option<Pagemap>> = OnceLock::new();
        PM.get_or_init(|| {
            let file = std::fs::File::open("/proc/self/pagemap").ok()?;
            // A fresh private page, read once, maps the zero page.
            let probe = vec![0u8; 3 * 4096];
            let va = (probe.as_ptr() as u64).next_multiple_of(4096);
            // SAFETY: reading (not writing) a byte of an allocation we own;
            // the allocator may have touched it already, then it is not the
            // zero page and the probe fails below.
            let _ = unsafe { std::ptr::read_volatile(va as *const u8) };
            let zero_pfn = entry(&file, va).filter(|p| *p != 0)?;
            // Only trust it if an anonymous untouched page maps there too.
            // SAFETY: a fresh anonymous mapping, read once, then unmapped.
            let ok = unsafe {
                let p = libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                if p == libc::MAP_FAILED {
                    return None;
                }
                let _ = std::ptr::read_volatile(p as *const u8);
                let pfn = entry(&file, p as u64);
                libc::munmap(p, 4096);
                pfn
            };
            (ok == Some(zero_pfn)).then_some(Pagemap { file, zero_pfn })
        })
        .as_ref()
    }

    pub fn is_zero_page(va: u64) -> bool {
        get().is_some_and(|pm| entry(&pm.file, va) == Some(pm.zero_pfn))
    }
}

fn madvise_dontneed(hva: u64, len: u64, backing: Backing) {
    // Shared memory keeps its pages in the file after DONTNEED; punching
    // them out is what makes them fresh (and gives the memory back).
    let advice = match backing {
        Backing::Anonymous => libc::MADV_DONTNEED,
        Backing::Memfd | Backing::Hugetlbfs => libc::MADV_REMOVE,
    };
    // SAFETY: the range lies in a mapping this module owns; discarding its
    // pages is the intent, and nothing in the VMM holds references into it
    // (devices only use translations the mmu has invalidated by now).
    let rc = unsafe { libc::madvise(hva as *mut libc::c_void, len as usize, advice) };
    if rc != 0 {
        log::warn!(
            "madvise({hva:#x}, {len:#x}): {}",
            std::io::Error::last_os_error()
        );
    }
}

impl crate::devices::rnic::GuestMemory for GuestRam {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), crate::devices::rnic::NotGuestRam> {
        use vm_memory::Bytes;
        self.memory()
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|_| crate::devices::rnic::NotGuestRam {
                gpa,
                len: buf.len() as u64,
            })
    }

    fn contains(&self, gpa: u64, len: u64) -> bool {
        let Some(end) = gpa.checked_add(len) else {
            return false;
        };
        self.regions
            .read()
            .iter()
            .any(|r| gpa >= r.gpa && end <= r.gpa + r.size)
    }
}
