//! Plain data shared by the protocol's users.

use std::fmt;

/// The base page size; every address and length handed to the mmu is a
/// multiple of it.
pub const PAGE_SIZE: u64 = 4096;
/// The huge page size tracked as one entry.
pub const HUGE_PAGE_SIZE: u64 = 2 << 20;
/// Regions must end at or below this, in guest-physical and in host-virtual
/// addresses (`add_region` and `set_region_hva` return
/// [`Error::AboveLimit`](crate::Error::AboveLimit) otherwise). x86-64 has at
/// most 52 physical and 57 virtual address bits; the margin keeps every
/// address the table derives (slot ends rounded up to 2 MiB, host addresses
/// of a page) from wrapping.
pub const ADDRESS_LIMIT: u64 = 1 << 63;

/// Names a region for its whole life; never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RegionId(pub u64);

impl fmt::Display for RegionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// What to register: a guest-physical range backed by a host-virtual range
/// (a KVM memslot, in effect).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionSpec {
    pub name: String,
    pub gpa: u64,
    pub size: u64,
    /// Host virtual address of `gpa`. The mmu stores and reports it but
    /// never dereferences it.
    pub hva: u64,
}

/// A registered region as seen from outside.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionInfo {
    pub id: RegionId,
    pub name: String,
    pub gpa: u64,
    pub size: u64,
    pub hva: u64,
    /// The region's current generation.
    pub generation: u64,
    /// Bytes of guest memory with a current translation.
    pub mapped_bytes: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PageSize {
    /// 4 KiB.
    Small,
    /// 2 MiB.
    Huge,
}

impl PageSize {
    pub fn bytes(self) -> u64 {
        match self {
            PageSize::Small => PAGE_SIZE,
            PageSize::Huge => HUGE_PAGE_SIZE,
        }
    }
}

/// One guest page mapped to one host page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    pub gpa: u64,
    pub hva: u64,
    pub size: PageSize,
    pub writable: bool,
}

impl Translation {
    pub fn small(gpa: u64, hva: u64) -> Self {
        Translation {
            gpa,
            hva,
            size: PageSize::Small,
            writable: true,
        }
    }

    pub fn huge(gpa: u64, hva: u64) -> Self {
        Translation {
            gpa,
            hva,
            size: PageSize::Huge,
            writable: true,
        }
    }
}

/// Proof of a `read_begin`: the range it covers and the sequence number it
/// saw. Valid for `install`/`translate`/`read_retry` until an invalidation
/// overlapping the range starts.
///
/// Opaque: only the [`Mmu`](crate::Mmu) that issued a ticket creates one,
/// and every use checks that it is that mmu's (a ticket of another mmu is
/// [`Error::ForeignTicket`](crate::Error::ForeignTicket)). Its range always
/// lies inside one region, so `gpa + len` never overflows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ticket {
    /// The issuing mmu's instance number (never reused in a process).
    pub(crate) mmu: u64,
    pub(crate) seq: u64,
    pub(crate) gpa: u64,
    pub(crate) len: u64,
    pub(crate) region: RegionId,
    /// The region's guest-physical and host base when the ticket was taken.
    pub(crate) region_gpa: u64,
    pub(crate) region_hva: u64,
}

impl Ticket {
    /// The sequence number this ticket observed.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// First guest-physical address of the ticket's range.
    pub fn gpa(&self) -> u64 {
        self.gpa
    }

    /// Length of the ticket's range in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Never true: `read_begin` refuses empty ranges.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// End (exclusive) of the ticket's range.
    pub fn end(&self) -> u64 {
        self.gpa + self.len
    }

    /// The region the range lies in.
    pub fn region(&self) -> RegionId {
        self.region
    }

    /// Host address of `gpa` under the region's host base at ticket time;
    /// `Err(OutsideTicket)` for an address outside the ticket's range.
    pub fn host_addr(&self, gpa: u64) -> Result<u64, crate::Error> {
        if gpa < self.gpa || gpa >= self.end() {
            return Err(crate::Error::OutsideTicket {
                gpa,
                start: self.gpa,
                end: self.end(),
            });
        }
        // In range: the region's host range was checked not to overflow.
        Ok(self.region_hva + (gpa - self.region_gpa))
    }
}

/// Which translations a generation notice retires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Every region.
    All,
    /// One region.
    Region(RegionId),
}

/// What a mirror is told to drop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InvalidationKind {
    /// Every translation in `[gpa, gpa + len)`.
    Range { gpa: u64, len: u64 },
    /// Every translation in `scope` older than `generation`; O(1) for a
    /// mirror that stamps its entries with generations. `removed` means the
    /// region is going away, not just being emptied.
    Generation {
        scope: Scope,
        generation: u64,
        removed: bool,
    },
}

/// One invalidation as passed to every mirror (both passes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalidation {
    /// Unique, increasing: the sequence number this invalidation took.
    pub id: u64,
    pub kind: InvalidationKind,
}
