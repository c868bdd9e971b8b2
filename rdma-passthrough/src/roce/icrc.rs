//! The invariant CRC of a RoCEv2 packet, as Linux rxe computes it
//! (`rxe_icrc.c`): a CRC32 (the zlib/Ethernet polynomial, reflected) over
//!
//! ```text
//!   8 bytes of 0xff          (the masked LRH of native InfiniBand)
//!   IPv4 header, 20 bytes    TOS, TTL and header checksum set to ones
//!   UDP header, 8 bytes      checksum set to ones
//!   BTH, 12 bytes            the byte holding FECN/BECN/resv6 set to ones
//!   the rest of the packet   extension headers, payload, pad
//! ```
//!
//! stored after the pad in little-endian byte order (rxe stores the CPU
//! word; scapy's `BTH.pack_icrc` reverses the big-endian packing).
//!
//! The IPv4 header is covered, Identification and flags included, so the
//! sender must know what the kernel will put there. This port sends from
//! an unconnected UDP socket with `IP_MTU_DISCOVER = IP_PMTUDISC_DO`, for
//! which Linux sets DF and Identification 0 (`ip_select_ident_segs`: a
//! DF packet of a socket without a destination gets ID 0); rxe's own
//! tunnel socket sends the same way, so a received packet is checked with
//! the same assumption. Proven against scapy's RoCE layer on a `tcpdump`
//! capture by `tests/roce_netns.rs::capture_parses_with_scapy_and_icrc_verifies`
//! and against a scapy-computed vector by
//! `roce::icrc::tests::matches_scapy_vector`.

use std::net::Ipv4Addr;

/// The IPv4 fields the ICRC covers that are not masked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Meta {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    /// Identification (0 for DF packets of an unconnected socket).
    pub id: u16,
    /// Don't-fragment flag.
    pub df: bool,
}

impl Ipv4Meta {
    /// What Linux sends from an unconnected `IP_PMTUDISC_DO` UDP socket.
    pub fn linux_df(src: Ipv4Addr, dst: Ipv4Addr) -> Ipv4Meta {
        Ipv4Meta {
            src,
            dst,
            id: 0,
            df: true,
        }
    }
}

const IPV4_HDR: usize = 20;
const UDP_HDR: usize = 8;

/// ICRC of `roce`, the UDP payload including the 4 trailing ICRC bytes
/// (not read), sent with UDP ports `sport` → `dport`.
pub fn compute(ip: &Ipv4Meta, sport: u16, dport: u16, roce: &[u8]) -> u32 {
    debug_assert!(roce.len() >= super::wire::BTH_LEN + super::wire::ICRC_LEN);
    let udp_len = (UDP_HDR + roce.len()) as u16;
    let total_len = (IPV4_HDR + UDP_HDR + roce.len()) as u16;
    let mut pseudo = [0u8; 8 + IPV4_HDR + UDP_HDR + super::wire::BTH_LEN];
    pseudo[..8].fill(0xff);
    let ip_hdr = &mut pseudo[8..8 + IPV4_HDR];
    ip_hdr[0] = 0x45; // version 4, IHL 5
    ip_hdr[1] = 0xff; // TOS, masked
    ip_hdr[2..4].copy_from_slice(&total_len.to_be_bytes());
    ip_hdr[4..6].copy_from_slice(&ip.id.to_be_bytes());
    ip_hdr[6] = if ip.df { 0x40 } else { 0 };
    ip_hdr[7] = 0;
    ip_hdr[8] = 0xff; // TTL, masked
    ip_hdr[9] = 17; // UDP
    ip_hdr[10] = 0xff; // header checksum, masked
    ip_hdr[11] = 0xff;
    ip_hdr[12..16].copy_from_slice(&ip.src.octets());
    ip_hdr[16..20].copy_from_slice(&ip.dst.octets());
    let udp = &mut pseudo[8 + IPV4_HDR..8 + IPV4_HDR + UDP_HDR];
    udp[0..2].copy_from_slice(&sport.to_be_bytes());
    udp[2..4].copy_from_slice(&dport.to_be_bytes());
    udp[4..6].copy_from_slice(&udp_len.to_be_bytes());
    udp[6] = 0xff; // UDP checksum, masked
    udp[7] = 0xff;
    let bth = &mut pseudo[8 + IPV4_HDR + UDP_HDR..];
    bth.copy_from_slice(&roce[..super::wire::BTH_LEN]);
    bth[4] = 0xff; // FECN, BECN, resv6
    let mut h = crc32fast::Hasher::new();
    h.update(&pseudo);
    h.update(&roce[super::wire::BTH_LEN..roce.len() - super::wire::ICRC_LEN]);
    h.finalize()
}

/// Fill the last 4 bytes of `roce` with its ICRC.
pub fn seal(ip: &Ipv4Meta, sport: u16, dport: u16, roce: &mut [u8]) {
    let crc = compute(ip, sport, dport, roce);
    let n = roce.len();
    roce[n - 4..].copy_from_slice(&crc.to_le_bytes());
}

/// Whether the ICRC at the end of `roce` is right. False for datagrams too
/// short to hold a BTH and an ICRC.
pub fn verify(ip: &Ipv4Meta, sport: u16, dport: u16, roce: &[u8]) -> bool {
    let n = roce.len();
    if n < super::wire::BTH_LEN + super::wire::ICRC_LEN {
        return false;
    }
    let want = u32::from_le_bytes([roce[n - 4], roce[n - 3], roce[n - 2], roce[n - 1]]);
    compute(ip, sport, dport, roce) == want
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::roce::wire::*;

    fn meta() -> Ipv4Meta {
        Ipv4Meta::linux_df(Ipv4Addr::new(127, 0, 0, 1), Ipv4Addr::new(127, 0, 0, 2))
    }

    /// Vector computed by scapy 2.5's `scapy.contrib.roce` for
    /// `IP(src="127.0.0.1", dst="127.0.0.2", id=0, flags="DF") /
    /// UDP(sport=4791, dport=4791) / BTH(opcode=0x0a, padcount=1,
    /// dqpn=0x123, ackreq=1, psn=0xabcdef) / RETH bytes / payload`:
    /// see the generator in the test body's comment.
    #[test]
    fn matches_scapy_vector() {
        // python3: from scapy.all import *; from scapy.contrib.roce import *
        // p = IP(src="127.0.0.1",dst="127.0.0.2",id=0,flags="DF")/UDP(sport=4791,dport=4791)/
        //     BTH(opcode=0x0a,migreq=1,padcount=1,dqpn=0x123,ackreq=1,psn=0xabcdef)/
        //     Raw(bytes(range(16)) + b"abc" + b"\0")
        // raw(p)[-4:].hex()
        let mut buf = Vec::new();
        let mut bth = Bth::new(Op::WriteOnly, 0x123, 0xabcdef);
        bth.ack_req = true;
        let reth = Reth {
            va: 0x0001_0203_0405_0607,
            rkey: 0x0809_0a0b,
            dma_len: 0x0c0d_0e0f,
        };
        build(&mut buf, bth, Some(&reth), None, b"abc");
        seal(&meta(), ROCE_PORT, ROCE_PORT, &mut buf);
        let n = buf.len();
        assert_eq!(hex(&buf), SCAPY_PACKET);
        assert_eq!(hex(&buf[n - 4..]), SCAPY_ICRC);
        assert!(verify(&meta(), ROCE_PORT, ROCE_PORT, &buf));
    }

    /// `raw(p)[28:]`: the UDP payload scapy builds.
    const SCAPY_PACKET: &str =
        "0a50ffff0000012380abcdef000102030405060708090a0b0c0d0e0f61626300747f67df";
    const SCAPY_ICRC: &str = "747f67df";

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn masked_fields_do_not_matter_and_covered_ones_do() {
        let mut buf = Vec::new();
        build(
            &mut buf,
            Bth::new(Op::SendOnly, 7, 42),
            None,
            None,
            &[0x55; 33],
        );
        seal(&meta(), 4791, 4791, &mut buf);
        // FECN/BECN/resv6 are masked.
        let mut b = buf.clone();
        b[4] = 0xc0;
        assert!(verify(&meta(), 4791, 4791, &b));
        // The IP identification, addresses, ports, PSN and payload are not.
        let mut m = meta();
        m.id = 1;
        assert!(!verify(&m, 4791, 4791, &buf));
        assert!(!verify(&meta(), 4792, 4791, &buf));
        let mut b = buf.clone();
        b[11] ^= 1;
        assert!(!verify(&meta(), 4791, 4791, &b));
        let mut b = buf.clone();
        b[20] ^= 0x80;
        assert!(!verify(&meta(), 4791, 4791, &b));
        assert!(!verify(&meta(), 4791, 4791, &buf[..7]));
    }
}
