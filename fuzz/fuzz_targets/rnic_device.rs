//! Arbitrary guest writes against the paravirtual RNIC: registers of any
//! width and offset, ring and buffer contents, doorbells. Guest memory sits
//! between guard pages, so an access outside it crashes.
//!
//!   cargo +nightly fuzz run rnic_device -- -max_total_time=600
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vmm::devices::rnic::fuzz::harness().run(data);
});
