//! The mmu's one error type.

use crate::types::RegionId;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("{what} {value:#x} is not a multiple of {align:#x}")]
    Misaligned {
        what: &'static str,
        value: u64,
        align: u64,
    },
    #[error("empty range at {gpa:#x}")]
    EmptyRange { gpa: u64 },
    #[error("range at {gpa:#x} of {len:#x} bytes runs past the end of the address space")]
    Overflow { gpa: u64, len: u64 },
    #[error("region {name:?} [{gpa:#x}, {end:#x}) overlaps region {other:?} [{other_gpa:#x}, {other_end:#x})")]
    RegionOverlap {
        name: String,
        gpa: u64,
        end: u64,
        other: String,
        other_gpa: u64,
        other_end: u64,
    },
    #[error("guest-physical range [{gpa:#x}, {end:#x}) is not inside registered memory (or spans regions where it may not)")]
    OutsideRegions { gpa: u64, end: u64 },
    #[error("no region {0}")]
    NoSuchRegion(RegionId),
    #[error("translation of {gpa:#x} lies outside the faulting range [{start:#x}, {end:#x})")]
    OutsideTicket { gpa: u64, start: u64, end: u64 },
    /// An invalidation overlapping the ticket's range started after the
    /// ticket was taken: drop what was resolved and start over.
    #[error("an invalidation raced with this fault; retry")]
    Stale,
    /// `try_read_begin` only: an invalidation of the range is running.
    #[error("an invalidation of [{gpa:#x}, {end:#x}) is in progress")]
    Busy { gpa: u64, end: u64, teardown: bool },
    #[error("fault at {gpa:#x} raced with invalidations {retries} times in a row")]
    TooManyRetries { gpa: u64, retries: u32 },
    #[error("resolving {gpa:#x}: {reason}")]
    Resolve { gpa: u64, reason: String },
    #[error("no mirror with id {0}")]
    NoSuchMirror(u64),
    /// A ticket issued by another `Mmu` instance.
    #[error("the ticket was issued by another mmu")]
    ForeignTicket,
    /// A region whose guest-physical or host range reaches past
    /// [`ADDRESS_LIMIT`](crate::ADDRESS_LIMIT).
    #[error("{what} range [{start:#x}, {start:#x} + {len:#x}) reaches past the supported limit {limit:#x}")]
    AboveLimit {
        what: &'static str,
        start: u64,
        len: u64,
        limit: u64,
    },
    /// A `Config` tunable outside its supported range.
    #[error("mmu config: {what} = {value} is outside [{min}, {max}]")]
    InvalidConfig {
        what: &'static str,
        value: u64,
        min: u64,
        max: u64,
    },
    /// The region table is full (removed regions keep their entry until
    /// the reclaimer has freed their table: run `reclaim_all` or wait).
    #[error(
        "too many regions: {max} entries in use ({removed} by removed regions awaiting reclaim)"
    )]
    TooManyRegions { max: usize, removed: usize },
    /// A region larger than [`MAX_REGION_SIZE`](crate::MAX_REGION_SIZE).
    #[error("region of {size:#x} bytes is larger than the supported {max:#x}")]
    RegionTooLarge { size: u64, max: u64 },
    /// An allocation the request needs failed.
    #[error("cannot allocate {bytes} bytes for the {what}")]
    NoMemory { what: &'static str, bytes: u64 },
    /// Starting the background reclaimer thread failed.
    #[error("starting the mmu reclaimer thread: {0}")]
    Spawn(String),
    /// A method that may sleep, called from inside a mirror callback (where
    /// it could wait for the calling thread itself, or for another thread
    /// that waits for this callback to return).
    #[error("{0} may sleep and was called from inside a mirror callback")]
    Reentrant(&'static str),
}

impl Error {
    /// Whether the caller should take a new ticket and try again.
    pub fn is_retry(&self) -> bool {
        matches!(self, Error::Stale)
    }
}
