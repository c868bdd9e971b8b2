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

mod host;
mod retire;

pub use host::{free_huge_pages, map_anonymous, reserve_huge_pages};
use host::{madvise_dontneed, pagemap};
pub use retire::RetireTiming;
use retire::Retired;

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

struct Region {
    name: String,
    gpa: u64,
    size: u64,
    content: Content,
    current: Arc<MmapRegion>,
    retired: Vec<Retired>,
    /// How many teardowns are about to retire `current` (nested: the whole
    /// teardown, and the mirror's retire inside it): while non-zero, faults
    /// on it may be served without tracking (their pages die with it).
    retiring: u32,
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
                retiring: 0,
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
                    retiring: r.retiring > 0,
                });
            }
            if r.retired.iter().any(|m| m.holds(hva, r.size)) {
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

    /// Mark the current mappings of `indices` as about to be retired, or
    /// end one such mark (marks nest: a mapping stays retiring until every
    /// mark on it has ended).
    pub fn set_retiring(&self, indices: &[usize], retiring: bool) {
        let mut regions = self.regions.write();
        for &i in indices {
            let r = &mut regions[i].retiring;
            *r = if retiring {
                *r + 1
            } else {
                r.saturating_sub(1)
            };
        }
    }

    /// Index of the region containing `gpa`.
    pub fn index_of(&self, gpa: u64) -> Option<usize> {
        self.regions
            .read()
            .iter()
            .position(|r| gpa >= r.gpa && gpa < r.gpa + r.size)
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
