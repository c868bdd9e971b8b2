//! Structure-aware fuzzing of the paravirtual RNIC: mostly valid queue
//! pairs and WQEs with hostile fields (addresses across the whole u64
//! range), interleaved with invalidations, teardowns and resets; after
//! each input every WQE must finish within a bound and the device's state
//! must stay bounded (see `vmm::devices::rnic::fuzz`). Guest memory sits
//! between guard pages; overflow checks are on.
//!
//!   cargo +nightly fuzz run rnic_device corpus/rnic_device seeds/rnic_device -- -max_total_time=600
//!
//! (new inputs go to the ignored `corpus/`; `seeds/` is the checked-in
//! corpus the test suite replays).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(v) = vmm::devices::rnic::fuzz::harness().run(data) {
        panic!("{v}");
    }
});
