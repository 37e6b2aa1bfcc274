//! `edgerec loadgen`: paced G.711 µ-law streams, for sizing a box and for the tests.
//!
//! Stream `i` goes to port `A + (i / k) mod (B - A + 1)` for `k` streams per port: with two
//! (the default) the two streams of a port form a call (leg 0 and leg 1); with one, every
//! stream has a port of its own, as a SIPREC session's m-lines do. Even and odd streams (leg
//! 0 and leg 1) are sent from two sockets, so the two legs have distinct source addresses. Every stream has its own SSRC and sends one 20 ms packet (160 samples at
//! 8 kHz) per tick; leg 0 carries a 1,000 Hz tone, leg 1 a 1,500 Hz tone, both at -10 dBFS,
//! so a recording can be recognised after decryption. Packets of a tick are sent in batches
//! with `sendmmsg`; ticks follow an absolute schedule, so a late tick does not shift the rest.
//!
//! The plan and the packets are pure functions ([`Plan`], [`Plan::packet`]); [`run`] does the
//! sending.

use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use crate::media::g711::linear_to_ulaw;

/// Samples per 20 ms packet at 8 kHz.
pub const SAMPLES: u32 = 160;
/// Tone frequency of each leg.
pub const TONES_HZ: [f64; 2] = [1000.0, 1500.0];
/// Packet interval.
pub const PTIME: Duration = Duration::from_millis(20);

/// One planned stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamPlan {
    /// Destination port.
    pub port: u16,
    /// Leg 0 or 1 of its call.
    pub leg: usize,
    /// Its SSRC.
    pub ssrc: u32,
    /// Its first sequence number.
    pub seq0: u16,
}

/// Which streams go where.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The streams.
    pub streams: Vec<StreamPlan>,
    /// One period of each leg's tone, µ-law encoded, 8,000 samples (one second).
    tones: [Vec<u8>; 2],
}

impl Plan {
    /// `streams` streams over `ports` (a range's, or a media server's allocated ports, in
    /// order; none without ports), `per_port` (at least 1) to a port, SSRCs and first
    /// sequence numbers derived from `seed`.
    pub fn on(ports: &[u16], streams: usize, per_port: usize, seed: u32) -> Plan {
        let per_port = per_port.max(1);
        let streams = if ports.is_empty() { 0 } else { streams };
        let plan = (0..streams)
            .map(|i| {
                let h = (i as u32).wrapping_mul(0x9E37_79B9) ^ seed;
                StreamPlan {
                    port: ports[(i / per_port) % ports.len()],
                    leg: i % 2,
                    ssrc: h.rotate_left(7) ^ 0x5EED_0000,
                    seq0: (h >> 16) as u16,
                }
            })
            .collect();
        let tone = |hz: f64| {
            (0..8000)
                .map(|n| {
                    let x = (2.0 * std::f64::consts::PI * hz * f64::from(n) / 8000.0).sin();
                    linear_to_ulaw((x * 10_362.0) as i16) // -10 dBFS
                })
                .collect()
        };
        Plan {
            streams: plan,
            tones: [tone(TONES_HZ[0]), tone(TONES_HZ[1])],
        }
    }

    /// The RTP packet number `n` of stream `i` (PCMU, 160 samples), into `out`.
    pub fn packet(&self, i: usize, n: u32, out: &mut Vec<u8>) {
        let s = &self.streams[i];
        out.clear();
        out.push(0x80);
        out.push(if n == 0 { 0x80 } else { 0x00 }); // marker on the first packet, PT 0
        out.extend_from_slice(&s.seq0.wrapping_add(n as u16).to_be_bytes());
        out.extend_from_slice(&n.wrapping_mul(SAMPLES).to_be_bytes());
        out.extend_from_slice(&s.ssrc.to_be_bytes());
        let start = (n.wrapping_mul(SAMPLES) % 8000) as usize;
        out.extend_from_slice(&self.tones[s.leg][start..start + SAMPLES as usize]);
    }
}

/// What a run sent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Packets sent.
    pub packets: u64,
    /// Bytes of RTP sent.
    pub bytes: u64,
    /// Send errors (each a packet not sent).
    pub errors: u64,
    /// Ticks that started more than one packet interval late.
    pub late_ticks: u64,
    /// Ticks.
    pub ticks: u64,
}

/// Sends the plan to `target` for `seconds`.
pub fn run(target: IpAddr, plan: &Plan, seconds: f64) -> io::Result<Report> {
    let any: IpAddr = if target.is_ipv4() {
        IpAddr::from([0u8; 4])
    } else {
        IpAddr::from([0u16; 8])
    };
    let legs = [
        UdpSocket::bind(SocketAddr::new(any, 0))?,
        UdpSocket::bind(SocketAddr::new(any, 0))?,
    ];
    let dests: Vec<rustix::net::SocketAddrAny> = plan
        .streams
        .iter()
        .map(|s| rustix::net::SocketAddrAny::from(SocketAddr::new(target, s.port)))
        .collect();
    let by_leg: [Vec<usize>; 2] = [0, 1].map(|leg| {
        (0..plan.streams.len())
            .filter(|i| plan.streams[*i].leg == leg)
            .collect()
    });
    let ticks = (seconds / PTIME.as_secs_f64()).round() as u32;
    let mut report = Report::default();
    let mut packets: Vec<Vec<u8>> =
        vec![Vec::with_capacity(12 + SAMPLES as usize); plan.streams.len()];
    let start = Instant::now();
    for n in 0..ticks {
        let due = start + PTIME * n;
        let now = Instant::now();
        if now < due {
            std::thread::sleep(due - now);
        } else if now - due > PTIME {
            report.late_ticks += 1;
        }
        report.ticks += 1;
        for (i, p) in packets.iter_mut().enumerate() {
            plan.packet(i, n, p);
        }
        for (leg, socket) in legs.iter().enumerate() {
            for batch in by_leg[leg].chunks(256) {
                let (sent, errors) = send_batch(socket, batch, &packets, &dests);
                report.packets += sent as u64;
                report.errors += errors as u64;
                report.bytes += batch[..sent]
                    .iter()
                    .map(|i| packets[*i].len() as u64)
                    .sum::<u64>();
            }
        }
    }
    Ok(report)
}

/// Sends one batch with `sendmmsg`; returns (sent, failed).
fn send_batch(
    socket: &UdpSocket,
    batch: &[usize],
    packets: &[Vec<u8>],
    dests: &[rustix::net::SocketAddrAny],
) -> (usize, usize) {
    use rustix::net::{MMsgHdr, SendAncillaryBuffer, SendFlags, sendmmsg};
    let iovs: Vec<[io::IoSlice<'_>; 1]> = batch
        .iter()
        .map(|i| [io::IoSlice::new(&packets[*i])])
        .collect();
    let mut controls: Vec<SendAncillaryBuffer<'_, '_, '_>> = batch
        .iter()
        .map(|_| SendAncillaryBuffer::default())
        .collect();
    let mut msgs: Vec<MMsgHdr<'_>> = batch
        .iter()
        .zip(iovs.iter())
        .zip(controls.iter_mut())
        .map(|((i, iov), control)| MMsgHdr::new_with_addr(&dests[*i], iov, control))
        .collect();
    let mut sent = 0;
    let mut failed = 0;
    while sent + failed < msgs.len() {
        match sendmmsg(socket, &mut msgs[sent + failed..], SendFlags::empty()) {
            Ok(0) => failed += 1,
            Ok(k) => sent += k,
            Err(rustix::io::Errno::INTR) => {}
            Err(_) => failed += 1, // that message failed (e.g. ECONNREFUSED); go on
        }
    }
    (sent, failed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::rtp::{Datagram, classify};

    fn range(first: u16, last: u16) -> Vec<u16> {
        (first..=last).collect()
    }

    #[test]
    fn two_legs_per_port_distinct_ssrcs() {
        let p = Plan::on(&range(40000, 40001), 6, 2, 1);
        let ports: Vec<_> = p.streams.iter().map(|s| (s.port, s.leg)).collect();
        assert_eq!(
            ports,
            vec![
                (40000, 0),
                (40000, 1),
                (40001, 0),
                (40001, 1),
                (40000, 0),
                (40000, 1)
            ]
        );
        let mut ssrcs: Vec<_> = p.streams.iter().map(|s| s.ssrc).collect();
        ssrcs.sort_unstable();
        ssrcs.dedup();
        assert_eq!(ssrcs.len(), 6);
    }

    #[test]
    fn one_stream_per_port_alternates_legs() {
        let p = Plan::on(&range(40000, 40002), 3, 1, 1);
        let ports: Vec<_> = p.streams.iter().map(|s| (s.port, s.leg)).collect();
        assert_eq!(ports, vec![(40000, 0), (40001, 1), (40002, 0)]);
        let p = Plan::on(&[50000, 50016, 50028], 4, 1, 1);
        let ports: Vec<_> = p.streams.iter().map(|s| s.port).collect();
        assert_eq!(ports, vec![50000, 50016, 50028, 50000]);
    }

    #[test]
    fn packets_are_valid_pcmu_rtp_in_sequence() {
        let p = Plan::on(&range(40000, 40000), 2, 2, 7);
        let mut pkt = Vec::new();
        for n in 0..3 {
            p.packet(1, n, &mut pkt);
            let Ok(Datagram::Rtp(h)) = classify(&pkt) else {
                panic!("not RTP")
            };
            assert_eq!(h.payload_type, 0);
            assert_eq!(h.seq, p.streams[1].seq0.wrapping_add(n as u16));
            assert_eq!(h.timestamp, n * 160);
            assert_eq!(h.payload_len, 160);
            assert_eq!(h.marker, n == 0);
        }
    }

    #[test]
    fn sends_on_loopback() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = rx.local_addr().unwrap().port();
        let plan = Plan::on(&range(port, port), 2, 2, 3);
        let r = run("127.0.0.1".parse().unwrap(), &plan, 0.1).unwrap();
        assert_eq!((r.ticks, r.packets, r.errors), (5, 10, 0));
        let mut buf = [0u8; 2048];
        let (n, _) = rx.recv_from(&mut buf).unwrap();
        assert_eq!(n, 172);
    }
}
