//! Replaying a capture into the recorder (`edgerec loadgen --replay FILE.pcap`): a real
//! call, as `tcpdump -w` or `edgerec export --format pcap` saved it, sent again with its
//! own timing to a test or a new appliance.
//!
//! [`read`] takes the UDP datagrams out of a pcap file (Ethernet, raw IP or Linux cooked
//! capture; IPv4 or IPv6; what is not UDP is skipped and counted). [`Replay::new`] maps the
//! capture's destination ports onto the target range — the lowest port onto the first, the
//! others keeping their distance, so RTP and its RTCP port stay paired — and [`Replay::run`]
//! sends each datagram at its offset from the first one, each original source address from
//! its own socket (the recorder tells the legs of a call apart by SSRC and by address).

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use pcap_file::DataLink;
use pcap_file::pcap::PcapReader;

/// Why a capture cannot be replayed.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// Not a pcap file, or a damaged one.
    #[error("not a readable pcap file: {0} (a pcapng file converts with `editcap -F pcap`)")]
    Pcap(String),
    /// A link type this reader does not take apart.
    #[error("link type {0:?} is not supported (Ethernet, raw IP and Linux cooked are)")]
    LinkType(DataLink),
    /// No UDP datagram in it.
    #[error("the capture holds no UDP datagram")]
    Empty,
    /// The capture's ports do not fit the target range.
    #[error("the capture uses ports {first}-{last}, which do not fit in the target ports {to}")]
    Ports {
        /// Lowest destination port in the capture.
        first: u16,
        /// Highest.
        last: u16,
        /// The target range.
        to: String,
    },
}

/// One captured UDP datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Captured {
    /// Its capture time, from the first datagram of the file.
    pub offset: Duration,
    /// Where it came from.
    pub source: SocketAddr,
    /// The port it went to.
    pub port: u16,
    /// The UDP payload.
    pub payload: Vec<u8>,
}

/// The UDP datagrams of a pcap file, in file order, and how many frames were skipped (not
/// UDP, or not decodable).
pub fn read(r: impl Read) -> Result<(Vec<Captured>, u64), ReplayError> {
    let mut reader = PcapReader::new(r).map_err(|e| ReplayError::Pcap(e.to_string()))?;
    let link = reader.header().datalink;
    if !matches!(
        link,
        DataLink::ETHERNET | DataLink::RAW | DataLink::IPV4 | DataLink::IPV6 | DataLink::LINUX_SLL
    ) {
        return Err(ReplayError::LinkType(link));
    }
    let mut out = Vec::new();
    let mut skipped = 0;
    let mut first = None;
    while let Some(p) = reader.next_packet() {
        let p = p.map_err(|e| ReplayError::Pcap(e.to_string()))?;
        let Some(s) = slice(link, &p.data) else {
            skipped += 1;
            continue;
        };
        let ip: IpAddr = match &s.net {
            Some(NetSlice::Ipv4(v4)) => v4.header().source_addr().into(),
            Some(NetSlice::Ipv6(v6)) => v6.header().source_addr().into(),
            _ => {
                skipped += 1;
                continue;
            }
        };
        let Some(TransportSlice::Udp(udp)) = &s.transport else {
            skipped += 1;
            continue;
        };
        let t0 = *first.get_or_insert(p.timestamp);
        out.push(Captured {
            offset: p.timestamp.saturating_sub(t0),
            source: SocketAddr::new(ip, udp.source_port()),
            port: udp.destination_port(),
            payload: udp.payload().to_vec(),
        });
    }
    if out.is_empty() {
        return Err(ReplayError::Empty);
    }
    Ok((out, skipped))
}

/// Takes a frame of the capture's link type apart.
fn slice(link: DataLink, data: &[u8]) -> Option<SlicedPacket<'_>> {
    match link {
        DataLink::ETHERNET => SlicedPacket::from_ethernet(data).ok(),
        DataLink::LINUX_SLL => SlicedPacket::from_linux_sll(data).ok(),
        _ => SlicedPacket::from_ip(data).ok(),
    }
}

/// A capture ready to send.
#[derive(Debug)]
pub struct Replay {
    datagrams: Vec<Captured>,
    /// Index of each datagram's source among the distinct sources.
    source_of: Vec<usize>,
    sources: usize,
}

/// What a replay sent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sent {
    /// Datagrams sent.
    pub packets: u64,
    /// Their payload bytes.
    pub bytes: u64,
    /// Send errors (each a datagram not sent).
    pub errors: u64,
    /// Distinct sources (one socket each).
    pub sources: usize,
}

impl Replay {
    /// Maps the capture's ports onto `first ..= last`.
    pub fn new(mut datagrams: Vec<Captured>, first: u16, last: u16) -> Result<Replay, ReplayError> {
        let lo = datagrams
            .iter()
            .map(|d| d.port)
            .min()
            .ok_or(ReplayError::Empty)?;
        let hi = datagrams
            .iter()
            .map(|d| d.port)
            .max()
            .ok_or(ReplayError::Empty)?;
        let span = hi - lo;
        if first.checked_add(span).is_none_or(|top| top > last) {
            return Err(ReplayError::Ports {
                first: lo,
                last: hi,
                to: format!("{first}-{last}"),
            });
        }
        let mut ids = BTreeMap::new();
        let source_of = datagrams
            .iter()
            .map(|d| {
                let n = ids.len();
                *ids.entry(d.source).or_insert(n)
            })
            .collect();
        for d in &mut datagrams {
            d.port = first + (d.port - lo);
        }
        datagrams.sort_by_key(|d| d.offset);
        Ok(Replay {
            datagrams,
            source_of,
            sources: ids.len(),
        })
    }

    /// The datagrams, with their target ports.
    pub fn datagrams(&self) -> &[Captured] {
        &self.datagrams
    }

    /// Sends everything to `target`, each datagram at its offset.
    pub fn run(&self, target: IpAddr) -> io::Result<Sent> {
        let any: IpAddr = if target.is_ipv4() {
            IpAddr::from([0u8; 4])
        } else {
            IpAddr::from([0u16; 8])
        };
        let sockets = (0..self.sources)
            .map(|_| UdpSocket::bind(SocketAddr::new(any, 0)))
            .collect::<io::Result<Vec<_>>>()?;
        let mut sent = Sent {
            sources: self.sources,
            ..Sent::default()
        };
        let start = Instant::now();
        for (d, src) in self.datagrams.iter().zip(&self.source_of) {
            let due = start + d.offset;
            let now = Instant::now();
            if now < due {
                std::thread::sleep(due - now);
            }
            match sockets[*src].send_to(&d.payload, SocketAddr::new(target, d.port)) {
                Ok(_) => {
                    sent.packets += 1;
                    sent.bytes += d.payload.len() as u64;
                }
                Err(_) => sent.errors += 1,
            }
        }
        Ok(sent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pcap_file::pcap::{PcapHeader, PcapPacket, PcapWriter};

    fn frame(link: DataLink, src: &str, dst: &str, payload: &[u8]) -> Vec<u8> {
        let (s, d): (SocketAddr, SocketAddr) = (src.parse().unwrap(), dst.parse().unwrap());
        let (IpAddr::V4(si), IpAddr::V4(di)) = (s.ip(), d.ip()) else {
            panic!("v4 only here")
        };
        let b = match link {
            DataLink::ETHERNET => etherparse::PacketBuilder::ethernet2([1; 6], [2; 6]).ipv4(
                si.octets(),
                di.octets(),
                64,
            ),
            _ => etherparse::PacketBuilder::ipv4(si.octets(), di.octets(), 64),
        };
        let mut out = Vec::new();
        b.udp(s.port(), d.port()).write(&mut out, payload).unwrap();
        out
    }

    fn pcap(link: DataLink, frames: &[(u64, Vec<u8>)]) -> Vec<u8> {
        let header = PcapHeader {
            datalink: link,
            ..PcapHeader::default()
        };
        let mut w = PcapWriter::with_header(Vec::new(), header).unwrap();
        for (ms, f) in frames {
            let ts = Duration::from_millis(1_700_000_000_000 + ms);
            w.write_packet(&PcapPacket::new(ts, f.len() as u32, f))
                .unwrap();
        }
        w.into_writer()
    }

    #[test]
    fn udp_datagrams_come_out_with_offsets_sources_and_ports() {
        for link in [DataLink::ETHERNET, DataLink::RAW] {
            let file = pcap(
                link,
                &[
                    (0, frame(link, "10.0.0.1:5000", "10.0.0.9:30000", b"a")),
                    (20, frame(link, "10.0.0.2:6000", "10.0.0.9:30000", b"b")),
                    (25, b"not a frame".to_vec()),
                    (40, frame(link, "10.0.0.1:5001", "10.0.0.9:30001", b"c")),
                ],
            );
            let (got, skipped) = read(&file[..]).unwrap();
            assert_eq!(skipped, 1);
            assert_eq!(got.len(), 3);
            assert_eq!(got[1].offset, Duration::from_millis(20));
            assert_eq!(got[1].source, "10.0.0.2:6000".parse().unwrap());
            assert_eq!(got[2].port, 30001);
            assert_eq!(got[2].payload, b"c");
            // Ports move as a block: 30000 → 40000, 30001 → 40001; three sources.
            let r = Replay::new(got.clone(), 40000, 40001).unwrap();
            let ports: Vec<u16> = r.datagrams().iter().map(|d| d.port).collect();
            assert_eq!(ports, [40000, 40000, 40001]);
            assert_eq!(r.sources, 3);
            assert!(matches!(
                Replay::new(got, 40000, 40000),
                Err(ReplayError::Ports { .. })
            ));
        }
    }

    #[test]
    fn what_cannot_be_replayed_says_why() {
        assert!(matches!(read(&b"garbage"[..]), Err(ReplayError::Pcap(_))));
        assert!(matches!(
            read(&pcap(DataLink::RAW, &[])[..]),
            Err(ReplayError::Empty)
        ));
        assert!(matches!(
            read(&pcap(DataLink::USB_LINUX, &[(0, vec![0; 10])])[..]),
            Err(ReplayError::LinkType(_))
        ));
    }

    #[test]
    fn the_replay_arrives_on_the_mapped_ports_from_distinct_sources() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = rx.local_addr().unwrap().port();
        let link = DataLink::RAW;
        let file = pcap(
            link,
            &[
                (0, frame(link, "10.0.0.1:5000", "10.0.0.9:30000", b"leg a")),
                (5, frame(link, "10.0.0.2:5000", "10.0.0.9:30000", b"leg b")),
            ],
        );
        let r = Replay::new(read(&file[..]).unwrap().0, port, port).unwrap();
        let sent = r.run("127.0.0.1".parse().unwrap()).unwrap();
        assert_eq!((sent.packets, sent.errors, sent.sources), (2, 0, 2));
        let mut buf = [0u8; 64];
        let (n1, from1) = rx.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n1], b"leg a");
        let (n2, from2) = rx.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n2], b"leg b");
        assert_ne!(from1, from2);
    }
}
