//! Arbitrary UDP payloads against the RoCEv2 packet parser and ICRC check:
//! no input may panic, and an accepted packet re-serializes to a packet
//! that parses to the same fields.
//!
//!   cargo +nightly fuzz run roce_packet -- -max_total_time=300
#![no_main]

use rdma_passthrough::roce::{icrc, wire};
use std::net::Ipv4Addr;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let ip = icrc::Ipv4Meta::linux_df(Ipv4Addr::LOCALHOST, Ipv4Addr::new(127, 0, 0, 2));
    let _ = icrc::verify(&ip, wire::ROCE_PORT, wire::ROCE_PORT, data);
    if let Ok(p) = wire::parse(data) {
        let mut again = Vec::new();
        wire::build(&mut again, p.bth, p.reth.as_ref(), p.aeth.as_ref(), p.payload);
        let q = wire::parse(&again).expect("a built packet parses");
        assert_eq!((q.bth.op, q.bth.psn, q.bth.dest_qp), (p.bth.op, p.bth.psn, p.bth.dest_qp));
        assert_eq!((q.reth, q.payload), (p.reth, p.payload));
    }
});
