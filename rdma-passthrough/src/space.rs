//! An address space an RNIC's memory regions live in: an mmu (whose
//! translations map iova → host address, and which invalidates the MRs as
//! mirrors) plus the resolver that makes missing pages present.

use mmu::{FaultResolver, Mmu};
use std::sync::Arc;

pub struct AddressSpace {
    pub name: String,
    pub mmu: Arc<Mmu>,
    pub resolver: Arc<dyn FaultResolver>,
}

impl AddressSpace {
    pub fn new(name: &str, mmu: Arc<Mmu>, resolver: Arc<dyn FaultResolver>) -> Arc<Self> {
        Arc::new(AddressSpace {
            name: name.into(),
            mmu,
            resolver,
        })
    }
}
