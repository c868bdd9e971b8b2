//! The page-fault thread: resolves device page faults (and prefetches)
//! through the mmu, the way `ib_umem_odp_map_dma_and_lock` does:
//!
//! ```text
//!   T = read_begin(range) → translate, or resolve what is missing (may
//!   sleep) → take the MR's update lock → read_retry(T)? start over
//!                                       : program the device page table
//! ```

use super::mr::MrState;
use super::{Command, Shared};
use mmu::{Error as MmuError, PAGE_SIZE};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

/// Why a range could not be mapped into a device page table.
#[derive(Debug, thiserror::Error)]
pub(crate) enum MapError {
    #[error("iova {0:#x} is not backed by memory")]
    NotBacked(u64),
    #[error(transparent)]
    Mmu(#[from] MmuError),
    #[error("the MR is fenced or deregistered")]
    NotLive,
    #[error("[{start:#x}, {end:#x}) kept racing with invalidations")]
    Raced { start: u64, end: u64 },
}

/// Pages resolved per ticket (the mmu translates at most this many per
/// lock hold).
const SEGMENT_PAGES: u64 = 512;
/// Give up on a range that keeps racing with invalidations.
const MAX_RACES: u32 = 10_000;

pub(crate) fn run(shared: Arc<Shared>) {
    loop {
        let req = {
            let mut q = shared.faults.lock();
            loop {
                if shared.stop.load(Ordering::SeqCst) {
                    return;
                }
                if let Some(r) = q.pop_front() {
                    break r;
                }
                shared.fault_cv.wait(&mut q);
            }
        };
        let t0 = Instant::now();
        let result = map_range(&shared, &req.mr, req.start, req.end, req.write, true);
        shared.stats.fault_ns.record(t0.elapsed().as_nanos() as u64);
        if let Err(e) = &result {
            shared.stats.fault_failures.fetch_add(1, Ordering::Relaxed);
            log::debug!(
                "rnic fault on MR {:#x} at {:#x}: {e}",
                req.mr.key,
                req.start
            );
        }
        shared.post(Command::FaultDone {
            mr: req.mr.key,
            start: req.start,
            end: req.end,
            ok: result.is_ok(),
        });
    }
}

/// Map `[start, end)` of `mr` into its device page table. With
/// `allow_fault`, missing pages are resolved (populated) first; without,
/// only pages the mmu already translates are mapped.
pub(crate) fn map_range(
    shared: &Shared,
    mr: &MrState,
    start: u64,
    end: u64,
    write: bool,
    allow_fault: bool,
) -> Result<u64, MapError> {
    let mmu = &mr.space.mmu;
    let regions = mmu.regions();
    let mut pos = start;
    let mut mapped = 0;
    while pos < end {
        let Some(r) = regions
            .iter()
            .find(|r| r.gpa <= pos && pos < r.gpa + r.size)
        else {
            if allow_fault {
                return Err(MapError::NotBacked(pos));
            }
            // Nothing to map here; skip to the next region.
            match regions.iter().filter(|r| r.gpa > pos).map(|r| r.gpa).min() {
                Some(next) => {
                    pos = next;
                    continue;
                }
                None => break,
            }
        };
        let seg_end = end
            .min(r.gpa + r.size)
            .min(pos.saturating_add(SEGMENT_PAGES * PAGE_SIZE));
        mapped += map_segment(mr, pos, seg_end, write, allow_fault)?;
        pos = seg_end;
    }
    shared
        .stats
        .fault_pages
        .fetch_add(mapped, Ordering::Relaxed);
    Ok(mapped)
}

fn map_segment(
    mr: &MrState,
    start: u64,
    end: u64,
    write: bool,
    allow_fault: bool,
) -> Result<u64, MapError> {
    let mmu = &mr.space.mmu;
    let mut entries = Vec::with_capacity(((end - start) / PAGE_SIZE) as usize);
    'retry: for _ in 0..MAX_RACES {
        let t = mmu.read_begin(start, end - start)?;
        entries.clear();
        let mut pos = start;
        while pos < end {
            match mmu.translate_range(&t, pos, end, &mut entries) {
                Err(MmuError::Stale) => continue 'retry,
                Err(e) => return Err(e.into()),
                Ok(None) => break,
                Ok(Some(hole)) if allow_fault => {
                    mr.space.resolver.resolve(hole, end - hole, write)?;
                    continue 'retry;
                }
                Ok(Some(hole)) => pos = hole.saturating_add(PAGE_SIZE),
            }
        }
        let mut table = mr.table.lock();
        if !mr.live() {
            return Err(MapError::NotLive);
        }
        if mmu.read_retry(&t) {
            continue;
        }
        for &(page, hva) in &entries {
            table.insert(page, hva);
        }
        return Ok(entries.len() as u64);
    }
    Err(MapError::Raced { start, end })
}

/// The host ranges behind a (pinned) MR's table, coalesced.
pub(crate) fn host_extents(mr: &MrState) -> Vec<(u64, u64)> {
    let table = mr.table.lock();
    let mut pages: Vec<(u64, u64)> = table.iter().collect();
    pages.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (_, hva) in pages {
        match out.last_mut() {
            Some((h, l)) if *h + *l == hva => *l += PAGE_SIZE,
            _ => out.push((hva, PAGE_SIZE)),
        }
    }
    out
}
