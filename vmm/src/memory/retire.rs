//! Teardowns of guest RAM: retiring a region's pages (moved out in place,
//! or the whole mapping swapped for a fresh one) and giving them back.

use super::*;

/// A mapping that held a region's pages before a teardown.
pub(super) enum Mapping {
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

pub(super) struct Retired {
    mapping: Mapping,
    /// The generation that retired it; dropped once the mmu has reclaimed
    /// every generation below this one.
    generation: u64,
    /// Bytes of it already given back (`release_moved`).
    released: u64,
}

impl Retired {
    /// Whether host address `hva` lies in this mapping of `size` bytes.
    pub(super) fn holds(&self, hva: u64, size: u64) -> bool {
        let base = self.mapping.addr();
        hva >= base && hva < base + size
    }
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

impl GuestRam {
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
            let burst = t1.elapsed();
            let ns = burst.as_nanos() as u64;
            mremap_ns += ns;
            chunk_max_ns = chunk_max_ns.max(ns);
            off += n;
            if off < size {
                crate::contention::breathe(burst);
            }
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
        let mut short = super::host::memory_is_short();
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
            let t = std::time::Instant::now();
            madvise_dontneed(hva, n, Backing::Anonymous);
            released += n;
            // Paced, unless the host needs the memory back now (the guest
            // refills fresh pages meanwhile: the peak is up to twice its
            // size).
            if released % (256 << 20) < n {
                short = super::host::memory_is_short();
            }
            if !short {
                crate::contention::breathe(t.elapsed());
            }
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
