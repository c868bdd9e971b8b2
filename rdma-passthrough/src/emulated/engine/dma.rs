//! The device's DMA: one page copy at a time, under the update locks of
//! both memory regions it touches.

use crate::emulated::mr::MrState;
use mmu::PAGE_SIZE;
use std::time::Duration;

/// What one page copy came to.
pub(super) enum CopyOutcome {
    Copied,
    SrcDead,
    DstDead,
    SrcMissing,
    DstMissing,
}

/// Copy `n` bytes (within one page on each side) from `siova` of `s` to
/// `diova` of `d`, holding both MRs' update locks across the lookups and
/// the copy and checking under them that both MRs are live. A fence takes
/// the same lock, so it waits for this copy and none starts after it.
/// `delay_us` is the copy-delay test hook.
pub(super) fn copy_page(
    s: &MrState,
    siova: u64,
    d: &MrState,
    diova: u64,
    n: u64,
    delay_us: u64,
) -> CopyOutcome {
    let same = std::ptr::eq(s, d);
    // One order for every pair (keys are unique), so two lock holders can
    // never wait on each other.
    let (first, second) = if s.key <= d.key { (s, d) } else { (d, s) };
    let g1 = first.table.lock();
    let g2 = (!same).then(|| second.table.lock());
    let (st, dt) = match &g2 {
        None => (&*g1, &*g1),
        Some(g2) if s.key <= d.key => (&*g1, &**g2),
        Some(g2) => (&**g2, &*g1),
    };
    if !s.live() {
        return CopyOutcome::SrcDead;
    }
    if !d.live() {
        return CopyOutcome::DstDead;
    }
    let Some(src_page) = st.get(siova & !(PAGE_SIZE - 1)) else {
        return CopyOutcome::SrcMissing;
    };
    let Some(dst_page) = dt.get(diova & !(PAGE_SIZE - 1)) else {
        return CopyOutcome::DstMissing;
    };
    if delay_us > 0 {
        std::thread::sleep(Duration::from_micros(delay_us));
    }
    let src = src_page + (siova & (PAGE_SIZE - 1));
    let dst = dst_page + (diova & (PAGE_SIZE - 1));
    // SAFETY: both addresses come from the device page tables of MRs whose
    // bounds, keys and rights were checked; the mmu resolved them to mapped
    // host pages of the MR's address space, which stay mapped while
    // translated: an invalidation zaps them under the locks held here
    // (from this thread, between chunks, or by a fence that waits for
    // these locks) before the memory goes. `n` stays within both pages.
    // The ranges may overlap (loopback), hence `copy`.
    unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, n as usize) };
    CopyOutcome::Copied
}
