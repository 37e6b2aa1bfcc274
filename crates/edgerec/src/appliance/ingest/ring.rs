//! `[ingest] mode = "ring"`: datagrams taken from a memory-mapped `AF_PACKET` ring
//! (`TPACKET_V3`) instead of the sockets. The kernel copies each datagram of the ingest
//! ports into the ring as it arrives (a BPF filter picks UDP to the ports' ranges, on every
//! interface), and this thread reads the ring a block at a time: no system call per datagram
//! or per socket, only a `poll` when the ring is empty. Arrival times are the kernel's
//! stamps in the ring.
//!
//! The UDP sockets stay bound — the kernel never answers "port unreachable" for a port being
//! recorded — and each carries a filter that drops every datagram, so their queues never
//! fill. Before that filter goes on, what a socket already holds (kept by the service
//! manager over a restart) is read; at a planned stop the filters come off first, so what
//! arrives while no process runs waits in the sockets for the next one. A datagram that
//! arrives in the moment between is read twice, and the recorder counts the copy as a
//! duplicate; it is never stored twice.
//!
//! What the sockets would refuse, this refuses too: a datagram to a port of no socket, to an
//! address a socket is not bound to, not addressed to this host (`PACKET_HOST`), or with a
//! bad UDP checksum (checked here when the device did not). IPv4 fragments are reassembled
//! by the kernel first (`PACKET_FANOUT_FLAG_DEFRAG`); a fragmented IPv6 datagram is not
//! taken (docs/operations.md, "Ingest").
//!
//! Invariants: a block is read only while the kernel has handed it over (`TP_STATUS_USER`,
//! read with acquire ordering) and given back (release ordering) only after every datagram
//! in it is in the batch and the journal; every read is bounds-checked against the block, so
//! a malformed block cannot make it read outside the ring.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};

use super::recvmmsg::{self, Reader};
use super::{Context, STOP_CHECK, Sink, arrived};
use crate::appliance::metrics::Metrics;

/// One block of the ring: what the kernel hands over at once (when full, or when it has
/// waited `round`).
const BLOCK_BYTES: usize = 1 << 20;
/// `tp_frame_size`: for `TPACKET_V3` only a unit of accounting, the frames are packed.
const FRAME_BYTES: u32 = 2048;
/// `TPACKET_ALIGN(sizeof(struct tpacket3_hdr))`: where a frame's `sockaddr_ll` starts.
const FRAME_HEADER: usize = 48;
/// Bytes of a packet the filter passes (its IP header, UDP header and payload): more than
/// any UDP datagram has; one that is longer all the same is cut and counted as `too_large`.
const SNAP: u32 = 256 << 10;
/// How often the ring's own drop count is read into the metrics.
const STATS_EVERY: Duration = Duration::from_secs(1);

/// Runs until `stop` is set or the recorder is gone.
pub(super) fn run(ctx: &Context, mut sink: Sink, ring: &Ring) -> io::Result<()> {
    let by_port = by_port(&ctx.locals);
    let mut host = HostAddrs::new();
    tracing::info!(
        blocks = ring.blocks,
        mib = (ring.blocks * BLOCK_BYTES) >> 20,
        "ingest reads a packet ring"
    );
    // The ring has every datagram since it was opened, and the sockets drop them since: what
    // they held before (kept over a restart) is read once.
    recvmmsg::prepare(&ctx.sockets);
    let mut reader = Reader::new();
    for (i, (socket, &local)) in ctx.sockets.iter().zip(&ctx.locals).enumerate() {
        let (alive, _) = reader.drain(socket, i, local, &mut sink, 4096);
        if !alive {
            return Ok(());
        }
    }
    if !sink.hand_over() {
        return Ok(());
    }
    // A ring taken over mid-way continues at its oldest handed-over block.
    let mut next = (!ring.adopted()).then_some(0);
    let mut stats_at = Instant::now();
    let mut stop_by = None;
    loop {
        ctx.beat.beat();
        if stop_by.is_none() && ctx.stop.is_triggered() {
            if ring.kept() {
                // The service manager holds the ring: what it takes from now on is the next
                // process's. What is handed over already is read, then this one stops.
                stop_by = Some(Instant::now());
            } else {
                // What arrives from now on waits in the sockets for the next process; what
                // the kernel put into the ring before is read first (a partly filled block
                // is handed over after at most `round`).
                undrop_all(&ctx.sockets);
                stop_by = Some(Instant::now() + ctx.round + STOP_CHECK);
            }
        }
        if next.is_none() {
            next = ring.oldest_ready();
        }
        if let Some(i) = next
            && let Some(block) = ring.take(i)
        {
            sink.refresh();
            let (read_at, wall) = (Instant::now(), SystemTime::now());
            host.refresh();
            walk(block, |frame| {
                take(frame, (&by_port, &host), ctx, &mut sink, (read_at, wall));
            });
            sink.keep(read_at, wall);
            ring.release(i);
            next = Some((i + 1) % ring.blocks);
            if !sink.hand_over_if_full() {
                return Ok(());
            }
            // A flood that keeps the ring full does not hold a stop up.
            if stop_by.is_some_and(|by| Instant::now() >= by) {
                ring.count_drops(&sink.metrics);
                sink.hand_over();
                return Ok(());
            }
            continue;
        }
        // The kernel fills the blocks in turn, so with the next one not handed over no other
        // is; if one is, this thread lost its place (it must not wait on the wrong block).
        if let Some(j) = ring.oldest_ready()
            && next != Some(j)
        {
            tracing::warn!(expected = ?next, found = j, "packet ring out of step: resumed at its oldest block");
            next = Some(j);
            continue;
        }
        // Caught up: the round's datagrams go to the recorder.
        if !sink.hand_over() {
            return Ok(());
        }
        if stats_at.elapsed() >= STATS_EVERY {
            stats_at = Instant::now();
            ring.count_drops(&sink.metrics);
        }
        let wait = match stop_by {
            Some(by) => match by.checked_duration_since(Instant::now()) {
                Some(rest) => rest.min(STOP_CHECK),
                None => {
                    ring.count_drops(&sink.metrics);
                    return Ok(());
                }
            },
            None => STOP_CHECK,
        };
        ring.wait(wait);
    }
}

/// One frame of a block: its datagram checked and taken, or counted.
fn take(
    frame: Frame<'_>,
    (by_port, host): (&HashMap<u16, usize>, &HostAddrs),
    ctx: &Context,
    sink: &mut Sink,
    (read_at, wall): (Instant, SystemTime),
) {
    if !frame.to_us {
        return;
    }
    if frame.cut {
        Metrics::inc(&sink.metrics.datagrams_rejected, "too_large", 1);
        return;
    }
    let Some(d) = udp(frame.ip, frame.checksum_unverified) else {
        return;
    };
    let Some(&i) = by_port.get(&d.dst.port()) else {
        return;
    };
    let local = ctx.locals[i];
    if !accepts(local, d.dst.ip(), host) {
        return;
    }
    let at = arrived(frame.stamp, read_at, wall);
    sink.take(i, local, d.src, at, d.payload, false);
}

/// Whether a socket bound to `local` takes a datagram to `dst`: its own address; or, bound
/// to the unspecified address, any address of this host (`host`) of a family it takes (an
/// IPv4 socket no IPv6, an IPv6 one both: Linux's dual-stack default).
fn accepts(local: SocketAddr, dst: IpAddr, host: &HostAddrs) -> bool {
    if !local.ip().is_unspecified() {
        return local.ip() == dst;
    }
    (local.is_ipv6() || dst.is_ipv4()) && host.has(dst)
}

/// This host's addresses, read again now and then (an address may come or go).
struct HostAddrs {
    addrs: std::collections::HashSet<IpAddr>,
    read: Option<Instant>,
}

impl HostAddrs {
    fn new() -> HostAddrs {
        let mut h = HostAddrs {
            addrs: Default::default(),
            read: None,
        };
        h.refresh();
        h
    }

    /// Reads them again if a second has gone by; keeps the last ones if they cannot be read.
    fn refresh(&mut self) {
        if self.read.is_some_and(|at| at.elapsed() < STATS_EVERY) {
            return;
        }
        self.read = Some(Instant::now());
        match nix::ifaddrs::getifaddrs() {
            Ok(list) => {
                self.addrs = list
                    .filter_map(|a| a.address)
                    .filter_map(|a| {
                        a.as_sockaddr_in()
                            .map(|v4| IpAddr::from(v4.ip()))
                            .or_else(|| a.as_sockaddr_in6().map(|v6| IpAddr::from(v6.ip())))
                    })
                    .collect();
            }
            Err(e) => tracing::warn!(error = %e, "cannot read this host's addresses"),
        }
    }

    /// Whether `ip` is one of them (any, if none could ever be read: a call is not refused
    /// for want of the list).
    fn has(&self, ip: IpAddr) -> bool {
        self.addrs.is_empty() || self.addrs.contains(&ip)
    }
}

/// The socket index of each port.
fn by_port(locals: &[SocketAddr]) -> HashMap<u16, usize> {
    locals
        .iter()
        .enumerate()
        .map(|(i, a)| (a.port(), i))
        .collect()
}

/// The ports of `locals` as the fewest inclusive ranges.
fn ranges(locals: &[SocketAddr]) -> Vec<(u16, u16)> {
    let mut ports: Vec<u16> = locals.iter().map(SocketAddr::port).collect();
    ports.sort_unstable();
    ports.dedup();
    let mut out: Vec<(u16, u16)> = Vec::new();
    for p in ports {
        match out.last_mut() {
            Some((_, hi)) if hi.checked_add(1) == Some(p) => *hi = p,
            _ => out.push((p, p)),
        }
    }
    out
}

/// A UDP datagram taken out of an IP packet.
#[derive(Debug, PartialEq, Eq)]
struct Udp<'a> {
    src: SocketAddr,
    dst: SocketAddr,
    payload: &'a [u8],
}

/// The UDP datagram of an IPv4 or IPv6 packet (no fragments, no IPv6 extension headers:
/// what the filter passes), if its checksum holds where `verify` asks it checked.
fn udp(ip: &[u8], verify: bool) -> Option<Udp<'_>> {
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};
    let p = SlicedPacket::from_ip(ip).ok()?;
    let Some(TransportSlice::Udp(u)) = p.transport else {
        return None;
    };
    let (src, dst, sum_ok) = match p.net? {
        NetSlice::Ipv4(v4) => {
            // The stack drops a bad IPv4 header checksum whatever the device did.
            if v4.payload().fragmented || !header_sum_holds(v4.header().slice()) {
                return None;
            }
            let (s, d) = (v4.header().source(), v4.header().destination());
            let ok = !verify
                || u.checksum() == 0
                || u.to_header()
                    .calc_checksum_ipv4_raw(s, d, u.payload())
                    .is_ok_and(|c| c == u.checksum());
            (
                IpAddr::from(Ipv4Addr::from(s)),
                IpAddr::from(Ipv4Addr::from(d)),
                ok,
            )
        }
        NetSlice::Ipv6(v6) => {
            if v6.payload().fragmented {
                return None;
            }
            let (s, d) = (v6.header().source(), v6.header().destination());
            let ok = !verify
                || u.to_header()
                    .calc_checksum_ipv6_raw(s, d, u.payload())
                    .is_ok_and(|c| c == u.checksum());
            (
                IpAddr::from(Ipv6Addr::from(s)),
                IpAddr::from(Ipv6Addr::from(d)),
                ok,
            )
        }
        _ => return None,
    };
    sum_ok.then(|| Udp {
        src: SocketAddr::new(src, u.source_port()),
        dst: SocketAddr::new(dst, u.destination_port()),
        payload: u.payload(),
    })
}

/// Whether an IPv4 header's checksum holds (RFC 1071: the one's-complement sum of the
/// header as sent, its checksum field included, is all ones). Summed over the raw bytes, as
/// the stack does: etherparse's `calc_header_checksum` rebuilds the header from its fields
/// and would leave out the reserved flag bit.
fn header_sum_holds(header: &[u8]) -> bool {
    etherparse::checksum::Sum16BitWords::new()
        .add_slice(header)
        .ones_complement()
        == 0
}

/// One frame of a block.
struct Frame<'a> {
    /// From the IP header on.
    ip: &'a [u8],
    /// When the kernel received it (wall clock).
    stamp: Duration,
    /// Longer than [`SNAP`].
    cut: bool,
    /// The device neither checked its UDP checksum nor left it to be filled in (a
    /// loopback datagram's is never filled in).
    checksum_unverified: bool,
    /// Addressed to this host (not one it forwards or sends).
    to_us: bool,
}

/// Calls `each` for every frame of a block (the bytes of one block the kernel handed
/// over); stops at the first frame that does not fit in it.
fn walk(block: &[u8], mut each: impl FnMut(Frame<'_>)) {
    let u32_at = |at: usize| -> Option<u32> {
        let b = block.get(at..at.checked_add(4)?)?;
        Some(u32::from_ne_bytes(b.try_into().ok()?))
    };
    let u16_at = |at: usize| -> Option<u16> {
        let b = block.get(at..at.checked_add(2)?)?;
        Some(u16::from_ne_bytes(b.try_into().ok()?))
    };
    // struct tpacket_block_desc: version, offset_to_priv, then tpacket_hdr_v1:
    // block_status (8), num_pkts (12), offset_to_first_pkt (16).
    let (Some(count), Some(first)) = (u32_at(12), u32_at(16)) else {
        return;
    };
    let mut at = first as usize;
    for _ in 0..count {
        // struct tpacket3_hdr: tp_next_offset, tp_sec, tp_nsec, tp_snaplen, tp_len,
        // tp_status, tp_mac (u16), tp_net (u16); the sockaddr_ll after FRAME_HEADER.
        let frame = || -> Option<(Frame<'_>, u32)> {
            let next = u32_at(at)?;
            let (sec, nsec) = (u32_at(at + 4)?, u32_at(at + 8)?);
            let (snap, len, status) = (u32_at(at + 12)?, u32_at(at + 16)?, u32_at(at + 20)?);
            let net = usize::from(u16_at(at + 26)?);
            let start = at.checked_add(net)?;
            let ip = block.get(start..start.checked_add(snap as usize)?)?;
            let pkttype = *block.get(at + FRAME_HEADER + 10)?;
            let checked = libc::TP_STATUS_CSUM_VALID | libc::TP_STATUS_CSUMNOTREADY;
            Some((
                Frame {
                    ip,
                    stamp: Duration::new(u64::from(sec), nsec.min(999_999_999)),
                    cut: snap < len,
                    checksum_unverified: status & checked == 0,
                    to_us: pkttype == libc::PACKET_HOST,
                },
                next,
            ))
        };
        let Some((f, next)) = frame() else {
            return;
        };
        each(f);
        if next == 0 {
            return;
        }
        at = match at.checked_add(next as usize) {
            Some(a) if a < block.len() => a,
            _ => return,
        };
    }
}

/// The classic BPF program the ring's socket runs on every packet of every interface:
/// IPv4 or IPv6 UDP (IPv4 not a fragment; IPv6 with UDP as its first next header) to a
/// port in one of `ranges`, addressed to this host. Offsets are from the IP header (a
/// `SOCK_DGRAM` packet socket).
fn filter(ranges: &[(u16, u16)]) -> Vec<libc::sock_filter> {
    use libc::{
        BPF_ABS, BPF_B, BPF_H, BPF_IMM, BPF_IND, BPF_JEQ, BPF_JGE, BPF_JGT, BPF_JMP, BPF_JSET,
        BPF_K, BPF_LD, BPF_LDX, BPF_MSH, BPF_RET, BPF_W, SKF_AD_OFF, SKF_AD_PKTTYPE,
        SKF_AD_PROTOCOL,
    };
    let op = |code: u32, k: u32| libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    let jump = |code: u32, k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    let ad = |off: i32| (SKF_AD_OFF + off) as u32;
    // Jump offsets count the instructions after the jump; `DROP` and `KEEP` are patched at
    // the end (the last two instructions).
    const DROP: u8 = u8::MAX;
    const KEEP: u8 = u8::MAX - 1;
    // A == k, else drop.
    let unless = |k: u32| jump(BPF_JMP | BPF_JEQ | BPF_K, k, 0, DROP);
    let udp = u32::from(libc::IPPROTO_UDP as u8);
    let mut p = vec![
        op(BPF_LD | BPF_W | BPF_ABS, ad(SKF_AD_PKTTYPE)),
        unless(u32::from(libc::PACKET_HOST)),
        op(BPF_LD | BPF_W | BPF_ABS, ad(SKF_AD_PROTOCOL)),
        jump(BPF_JMP | BPF_JEQ | BPF_K, libc::ETH_P_IP as u32, 0, 6),
        // IPv4: UDP, not a fragment; the destination port after the header's own length.
        op(BPF_LD | BPF_B | BPF_ABS, 9),
        unless(udp),
        op(BPF_LD | BPF_H | BPF_ABS, 6),
        jump(BPF_JMP | BPF_JSET | BPF_K, 0x3fff, DROP, 0),
        op(BPF_LDX | BPF_B | BPF_MSH, 0),
        jump(BPF_JMP | BPF_JEQ | BPF_K, 0, 4, 4), // to the port ranges with the port loaded
        unless(libc::ETH_P_IPV6 as u32),
        // IPv6: UDP right after the fixed header.
        op(BPF_LD | BPF_B | BPF_ABS, 6),
        unless(udp),
        op(BPF_LDX | BPF_W | BPF_IMM, 40),
    ];
    // The jump of index 9 lands here: A = the destination port (X + 2).
    p.push(op(BPF_LD | BPF_H | BPF_IND, 2));
    for &(lo, hi) in ranges {
        // port >= lo and port <= hi: keep; else the next range.
        p.push(jump(BPF_JMP | BPF_JGE | BPF_K, u32::from(lo), 0, 1));
        p.push(jump(BPF_JMP | BPF_JGT | BPF_K, u32::from(hi), 0, KEEP));
    }
    p.push(op(BPF_RET | BPF_K, 0));
    p.push(op(BPF_RET | BPF_K, SNAP));
    let (drop_at, keep_at) = (p.len() - 2, p.len() - 1);
    for (i, ins) in p.iter_mut().enumerate() {
        for j in [&mut ins.jt, &mut ins.jf] {
            let to = match *j {
                DROP => drop_at,
                KEEP => keep_at,
                _ => continue,
            };
            *j = u8::try_from(to - i - 1).expect("the program is shorter than 256 instructions");
        }
    }
    p
}

/// A socket filter that drops every datagram (`ret #0`).
fn drop_all(socket: &UdpSocket) -> io::Result<()> {
    let program = [libc::sock_filter {
        code: (libc::BPF_RET | libc::BPF_K) as u16,
        jt: 0,
        jf: 0,
        k: 0,
    }];
    attach(socket.as_raw_fd(), &program)
}

/// Takes the drop filters a ring process may have left on `sockets` off (a kept socket
/// keeps its filter over a `kill -9`); sockets without one are left as they are.
pub(super) fn undrop_all(sockets: &[UdpSocket]) {
    for s in sockets {
        match undrop(s) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => tracing::warn!(error = %e, "cannot take a drop filter off a socket"),
        }
    }
}

/// Takes a socket's filter off.
fn undrop(socket: &UdpSocket) -> io::Result<()> {
    sys::set_option(
        socket.as_raw_fd(),
        libc::SOL_SOCKET,
        libc::SO_DETACH_FILTER,
        &0i32,
    )
}

fn attach(fd: RawFd, program: &[libc::sock_filter]) -> io::Result<()> {
    let prog = libc::sock_fprog {
        len: u16::try_from(program.len())
            .map_err(|_| io::Error::other("the BPF program is too long"))?,
        filter: program.as_ptr().cast_mut(),
    };
    sys::set_option(fd, libc::SOL_SOCKET, libc::SO_ATTACH_FILTER, &prog)
}

/// The packet socket and its mapped ring.
pub(super) struct Ring {
    fd: OwnedFd,
    map: memmap2::MmapRaw,
    blocks: usize,
    adopted: bool,
    /// In the service manager's descriptor store.
    kept: bool,
}

impl Ring {
    /// The ring for `sockets` (bound to `locals`): the one the service manager kept
    /// (`passed`) where it fits — with what arrived while no process ran —, else a new one:
    /// a `SOCK_DGRAM` packet socket on every interface with the filter of the ports, a ring
    /// of `mib` MiB whose blocks are handed over after at most `round`, in a fanout group of
    /// its own (for the kernel's reassembly of IPv4 fragments). Then the sockets' drop
    /// filters go on. Fails without `CAP_NET_RAW`, saying so.
    pub(super) fn open(
        sockets: &[UdpSocket],
        locals: &[SocketAddr],
        mib: usize,
        round: Duration,
        passed: Option<OwnedFd>,
    ) -> io::Result<Ring> {
        let ranges = ranges(locals);
        let blocks = (mib.max(2) << 20) / BLOCK_BYTES;
        let ring = match passed.map(|fd| Ring::adopt(fd, &ranges, blocks)) {
            Some(Ok(r)) => {
                tracing::info!("packet ring from the service manager taken over");
                r
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "the kept packet ring does not fit: a new one");
                Ring::new(&ranges, blocks, round)?
            }
            None => Ring::new(&ranges, blocks, round)?,
        };
        // From here on the ring takes every datagram: the sockets need not.
        for s in sockets {
            drop_all(s)?;
        }
        Ok(ring)
    }

    fn new(ranges: &[(u16, u16)], blocks: usize, round: Duration) -> io::Result<Ring> {
        let denied = |e: io::Error| {
            if e.kind() == io::ErrorKind::PermissionDenied {
                io::Error::new(
                    e.kind(),
                    "ingest.mode = \"ring\" needs CAP_NET_RAW (the unit grants it with \
                     AmbientCapabilities=CAP_NET_RAW)",
                )
            } else {
                e
            }
        };
        // Protocol 0: nothing arrives before the filter and the ring are in place.
        let fd = socket(
            AddressFamily::Packet,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| denied(io::Error::from(e)))?;
        let raw = fd.as_raw_fd();
        sys::set_option(
            raw,
            libc::SOL_PACKET,
            libc::PACKET_VERSION,
            &(libc::tpacket_versions::TPACKET_V3 as i32),
        )?;
        // Not the copies of what this host sends (on loopback, every datagram twice).
        if let Err(e) = sys::set_option(raw, libc::SOL_PACKET, libc::PACKET_IGNORE_OUTGOING, &1i32)
        {
            tracing::debug!(error = %e, "PACKET_IGNORE_OUTGOING not supported; the filter skips them");
        }
        attach(raw, &filter(ranges))?;
        let req = libc::tpacket_req3 {
            tp_block_size: BLOCK_BYTES as u32,
            tp_block_nr: blocks as u32,
            tp_frame_size: FRAME_BYTES,
            tp_frame_nr: (blocks * BLOCK_BYTES) as u32 / FRAME_BYTES,
            tp_retire_blk_tov: u32::try_from(round.as_millis().max(1)).unwrap_or(u32::MAX),
            tp_sizeof_priv: 0,
            tp_feature_req_word: 0,
        };
        sys::set_option(raw, libc::SOL_PACKET, libc::PACKET_RX_RING, &req)?;
        let map = sys::map(&fd, blocks * BLOCK_BYTES)?;
        sys::bind_all(raw)?;
        // A group id the kernel picks among the unused ones: never another ring's group.
        let fanout = (libc::PACKET_FANOUT_HASH
            | libc::PACKET_FANOUT_FLAG_DEFRAG
            | libc::PACKET_FANOUT_FLAG_UNIQUEID)
            << 16;
        sys::set_option(raw, libc::SOL_PACKET, libc::PACKET_FANOUT, &fanout)?;
        Ok(Ring {
            fd,
            map,
            blocks,
            adopted: false,
            kept: false,
        })
    }

    /// The ring a killed process left (a `TPACKET_V3` packet socket with its ring, bound,
    /// still taking datagrams), if it is of `blocks` blocks; its filter is set to `ranges`
    /// (the ports may have changed).
    fn adopt(fd: OwnedFd, ranges: &[(u16, u16)], blocks: usize) -> io::Result<Ring> {
        let raw = fd.as_raw_fd();
        if sys::int_option(raw, libc::SOL_PACKET, libc::PACKET_VERSION)?
            != libc::tpacket_versions::TPACKET_V3 as i32
        {
            return Err(io::Error::other("not a TPACKET_V3 packet ring"));
        }
        // The kernel maps only a ring of exactly its size: another ring_mib fails here.
        let map = sys::map(&fd, blocks * BLOCK_BYTES)?;
        attach(raw, &filter(ranges))?;
        Ok(Ring {
            fd,
            map,
            blocks,
            adopted: true,
            kept: false,
        })
    }

    /// Whether it came from the service manager's store.
    pub(super) fn adopted(&self) -> bool {
        self.adopted
    }

    /// Whether the service manager's store holds it.
    fn kept(&self) -> bool {
        self.kept
    }

    /// Notes that the service manager's store holds it.
    pub(super) fn set_kept(&mut self) {
        self.kept = true;
    }

    /// Its socket (for the service manager's store).
    pub(super) fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The handed-over block the kernel filled first (the lowest sequence number), for a
    /// ring taken over mid-way.
    fn oldest_ready(&self) -> Option<usize> {
        (0..self.blocks)
            .filter_map(|i| {
                let b = self.take(i)?;
                let seq = b.get(24..32)?.try_into().ok().map(u64::from_ne_bytes)?;
                Some((seq, i))
            })
            .min()
            .map(|(_, i)| i)
    }

    /// The status word of block `i` (the third `u32` of its descriptor), which the kernel
    /// and this thread share.
    fn status(&self, i: usize) -> &AtomicU32 {
        assert!(i < self.blocks && self.map.len() >= self.blocks * BLOCK_BYTES);
        sys::status_word(&self.map, i * BLOCK_BYTES + 8)
    }

    /// The bytes of block `i` if the kernel has handed it over: valid until
    /// [`Ring::release`] gives it back (not to be used after).
    fn take(&self, i: usize) -> Option<&[u8]> {
        if i >= self.blocks || self.status(i).load(Ordering::Acquire) & libc::TP_STATUS_USER == 0 {
            return None;
        }
        Some(sys::handed_over(&self.map, i * BLOCK_BYTES, BLOCK_BYTES))
    }

    /// Gives block `i` back to the kernel.
    fn release(&self, i: usize) {
        self.status(i)
            .store(libc::TP_STATUS_KERNEL, Ordering::Release);
    }

    /// Waits up to `wait` for a block.
    fn wait(&self, wait: Duration) {
        let mut fds = [PollFd::new(
            self.fd.as_fd(),
            PollFlags::POLLIN | PollFlags::POLLERR,
        )];
        let ms = PollTimeout::try_from(wait).unwrap_or(PollTimeout::MAX);
        let _ = poll(&mut fds, ms);
    }

    /// The datagrams the kernel had no room for in the ring since the last call, into
    /// `socket_buffer_full`.
    fn count_drops(&self, metrics: &Metrics) {
        match sys::ring_stats(self.fd.as_raw_fd()) {
            Ok(s) if s.tp_drops > 0 => Metrics::inc(
                &metrics.datagrams_rejected,
                "socket_buffer_full",
                u64::from(s.tp_drops),
            ),
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "cannot read the ring's statistics"),
        }
    }
}

/// The system calls the ring needs that neither `nix` nor `memmap2` wraps.
#[allow(unsafe_code)]
mod sys {
    use std::io;
    use std::os::fd::{OwnedFd, RawFd};
    use std::sync::atomic::AtomicU32;

    /// `setsockopt` with a plain C value.
    pub(super) fn set_option<T>(fd: RawFd, level: i32, name: i32, value: &T) -> io::Result<()> {
        let len = libc::socklen_t::try_from(size_of::<T>()).expect("a socket option is small");
        // SAFETY: `value` points to a live `T` of `len` bytes for the duration of the call;
        // the kernel only reads it.
        let rc = unsafe { libc::setsockopt(fd, level, name, (value as *const T).cast(), len) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// `getsockopt` of an `int` option.
    pub(super) fn int_option(fd: RawFd, level: i32, name: i32) -> io::Result<i32> {
        let mut value: libc::c_int = 0;
        let mut len =
            libc::socklen_t::try_from(size_of::<libc::c_int>()).expect("a socket option is small");
        // SAFETY: `value` is a live c_int of `len` bytes the kernel writes at most `len` of.
        let rc =
            unsafe { libc::getsockopt(fd, level, name, (&raw mut value).cast(), &raw mut len) };
        if rc == 0 {
            Ok(value)
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// The ring's counts since the last call (`PACKET_STATISTICS` resets them).
    pub(super) fn ring_stats(fd: RawFd) -> io::Result<libc::tpacket_stats_v3> {
        // SAFETY: tpacket_stats_v3 is three u32s; all-zero is a valid value of it.
        let mut value: libc::tpacket_stats_v3 = unsafe { std::mem::zeroed() };
        let mut len = libc::socklen_t::try_from(size_of::<libc::tpacket_stats_v3>())
            .expect("a socket option is small");
        // SAFETY: `value` is a live tpacket_stats_v3 of `len` bytes the kernel writes at
        // most `len` of.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_PACKET,
                libc::PACKET_STATISTICS,
                (&raw mut value).cast(),
                &raw mut len,
            )
        };
        if rc == 0 {
            Ok(value)
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Binds the packet socket to every interface and every protocol (the filter chooses).
    pub(super) fn bind_all(fd: RawFd) -> io::Result<()> {
        // SAFETY: sockaddr_ll is plain integers; all-zero is a valid value of it.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        addr.sll_ifindex = 0;
        let len = libc::socklen_t::try_from(size_of::<libc::sockaddr_ll>())
            .expect("sockaddr_ll is small");
        // SAFETY: `addr` is a live sockaddr_ll of `len` bytes; the kernel only reads it.
        let rc = unsafe { libc::bind(fd, (&raw const addr).cast(), len) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Maps the socket's ring (raw: the kernel writes the blocks it holds while this
    /// process reads the ones it handed over).
    pub(super) fn map(fd: &OwnedFd, len: usize) -> io::Result<memmap2::MmapRaw> {
        memmap2::MmapOptions::new().len(len).map_raw(fd)
    }

    /// The `u32` at byte `at` of the mapping (a block's status word) as an atomic.
    pub(super) fn status_word(map: &memmap2::MmapRaw, at: usize) -> &AtomicU32 {
        assert!(at + 4 <= map.len() && at.is_multiple_of(4));
        // SAFETY: four bytes inside the mapping (checked), 4-aligned (the mapping is
        // page-aligned and `at` a multiple of 4), living as long as `map`; the pointer comes
        // from the mapping's own raw pointer, valid for writes. The kernel and this thread
        // access the word only atomically (the kernel with its own barriers): the ring's
        // protocol.
        unsafe { AtomicU32::from_ptr(map.as_mut_ptr().add(at).cast()) }
    }

    /// `len` bytes of the mapping from `start`: a block the kernel has handed over.
    pub(super) fn handed_over(map: &memmap2::MmapRaw, start: usize, len: usize) -> &[u8] {
        assert!(start + len <= map.len());
        // SAFETY: inside the mapping (checked), which lives as long as `map`. The caller
        // reads a block only after the kernel handed it over (its status read with acquire
        // ordering) and stops before giving it back, so the kernel does not write these
        // bytes while the slice is in use; every read through it is bounds-checked.
        unsafe { std::slice::from_raw_parts(map.as_ptr().add(start), len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4_udp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let b = etherparse::PacketBuilder::ipv4(src, dst, 64).udp(sport, dport);
        let mut out = Vec::new();
        b.write(&mut out, payload).unwrap();
        out
    }

    fn v6_udp(dport: u16, payload: &[u8]) -> Vec<u8> {
        let b = etherparse::PacketBuilder::ipv6([0; 16], [0xfe; 16], 64).udp(5000, dport);
        let mut out = Vec::new();
        b.write(&mut out, payload).unwrap();
        out
    }

    #[test]
    fn udp_datagrams_are_taken_out_with_their_addresses() {
        let p = v4_udp([10, 0, 0, 1], [10, 0, 0, 2], 5004, 40000, b"rtp");
        assert_eq!(
            udp(&p, true),
            Some(Udp {
                src: "10.0.0.1:5004".parse().unwrap(),
                dst: "10.0.0.2:40000".parse().unwrap(),
                payload: b"rtp",
            })
        );
        let p6 = v6_udp(40001, b"six");
        let got = udp(&p6, true).unwrap();
        assert_eq!(got.dst.port(), 40001);
        assert_eq!(got.payload, b"six");
    }

    #[test]
    fn a_bad_checksum_is_refused_only_where_unverified() {
        let mut p = v4_udp([10, 0, 0, 1], [10, 0, 0, 2], 5004, 40000, b"rtp");
        let last = p.len() - 1;
        p[last] ^= 0xff;
        assert_eq!(udp(&p, true), None, "checked here: refused");
        assert!(udp(&p, false).is_some(), "checked by the device: taken");
        let mut p6 = v6_udp(40001, b"six");
        let last = p6.len() - 1;
        p6[last] ^= 1;
        assert_eq!(udp(&p6, true), None);
    }

    #[test]
    fn a_bad_ip_header_checksum_is_refused_as_the_stack_would() {
        let mut p = v4_udp([10, 0, 0, 1], [10, 0, 0, 2], 5004, 40000, b"rtp");
        assert!(udp(&p, false).is_some());
        p[8] = p[8].wrapping_sub(1); // the TTL, under the header checksum
        assert_eq!(udp(&p, false), None);
    }

    #[test]
    fn a_socket_takes_its_own_address_or_this_hosts_of_its_family() {
        let host = HostAddrs {
            addrs: ["10.0.0.2".parse().unwrap(), "fe80::2".parse().unwrap()].into(),
            read: Some(Instant::now()),
        };
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let bound: SocketAddr = "10.0.0.2:40000".parse().unwrap();
        assert!(accepts(bound, ip("10.0.0.2"), &host));
        assert!(!accepts(bound, ip("10.0.0.3"), &host));
        let any4: SocketAddr = "0.0.0.0:40000".parse().unwrap();
        assert!(accepts(any4, ip("10.0.0.2"), &host));
        assert!(
            !accepts(any4, ip("10.9.9.9"), &host),
            "another host's address"
        );
        assert!(
            !accepts(any4, ip("fe80::2"), &host),
            "IPv6 to an IPv4 socket"
        );
        let any6: SocketAddr = "[::]:40000".parse().unwrap();
        assert!(accepts(any6, ip("fe80::2"), &host));
        assert!(accepts(any6, ip("10.0.0.2"), &host), "dual stack");
    }

    #[test]
    fn fragments_truncation_and_other_protocols_are_not_datagrams() {
        let mut p = v4_udp([10, 0, 0, 1], [10, 0, 0, 2], 5004, 40000, b"rtp");
        p[6] |= 0x20; // more fragments
        assert_eq!(udp(&p, false), None);
        let p = v4_udp([10, 0, 0, 1], [10, 0, 0, 2], 5004, 40000, b"rtp");
        assert_eq!(udp(&p[..p.len() - 1], false), None, "cut short");
        assert_eq!(udp(b"", false), None);
        assert_eq!(udp(&[0x45; 40], false), None);
    }

    #[test]
    fn ports_fold_into_ranges() {
        let a = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        let locals = [a(40000), a(40001), a(40002), a(41000), a(40003), a(41002)];
        assert_eq!(
            ranges(&locals),
            vec![(40000, 40003), (41000, 41000), (41002, 41002)]
        );
        assert_eq!(by_port(&locals)[&41000], 3);
    }

    /// Runs a classic BPF program over `packet` (an interpreter of the instructions
    /// [`filter`] uses), with the packet type and protocol as the kernel's ancillary loads.
    fn bpf(program: &[libc::sock_filter], packet: &[u8], pkttype: u32, proto: u32) -> u32 {
        let (mut a, mut x, mut pc) = (0u32, 0u32, 0usize);
        let load = |at: u32, size: usize| -> Option<u32> {
            if at == (libc::SKF_AD_OFF + libc::SKF_AD_PKTTYPE) as u32 {
                return Some(pkttype);
            }
            if at == (libc::SKF_AD_OFF + libc::SKF_AD_PROTOCOL) as u32 {
                return Some(proto);
            }
            let b = packet.get(at as usize..at as usize + size)?;
            Some(b.iter().fold(0u32, |v, &x| v << 8 | u32::from(x)))
        };
        loop {
            let ins = program[pc];
            let code = u32::from(ins.code);
            pc += 1;
            let size = match code & 0x18 {
                libc::BPF_W => 4,
                libc::BPF_H => 2,
                _ => 1,
            };
            match code & 0x07 {
                libc::BPF_LD => {
                    let at = if code & 0xe0 == libc::BPF_IND {
                        x + ins.k
                    } else {
                        ins.k
                    };
                    match load(at, size) {
                        Some(v) => a = v,
                        None => return 0,
                    }
                }
                libc::BPF_LDX => {
                    if code & 0xe0 == libc::BPF_MSH {
                        x = 4 * (u32::from(packet[ins.k as usize]) & 0xf);
                    } else {
                        x = ins.k;
                    }
                }
                libc::BPF_JMP => {
                    let taken = match code & 0xf0 {
                        libc::BPF_JEQ => a == ins.k,
                        libc::BPF_JGT => a > ins.k,
                        libc::BPF_JGE => a >= ins.k,
                        libc::BPF_JSET => a & ins.k != 0,
                        other => panic!("jump {other:#x} not interpreted"),
                    };
                    pc += usize::from(if taken { ins.jt } else { ins.jf });
                }
                libc::BPF_RET => return ins.k,
                other => panic!("class {other:#x} not interpreted"),
            }
        }
    }

    #[test]
    fn the_filter_keeps_udp_to_the_ports_and_nothing_else() {
        let f = filter(&[(40000, 40009), (41000, 41000)]);
        let host = u32::from(libc::PACKET_HOST);
        let (ip4, ip6) = (libc::ETH_P_IP as u32, libc::ETH_P_IPV6 as u32);
        let to = |port| v4_udp([10, 0, 0, 1], [10, 0, 0, 2], 5004, port, b"rtp");
        for port in [40000, 40005, 40009, 41000] {
            assert_eq!(bpf(&f, &to(port), host, ip4), SNAP, "port {port}");
        }
        for port in [39999, 40010, 40999, 41001, 53] {
            assert_eq!(bpf(&f, &to(port), host, ip4), 0, "port {port}");
        }
        assert_eq!(bpf(&f, &v6_udp(40003, b"x"), host, ip6), SNAP);
        assert_eq!(bpf(&f, &v6_udp(40010, b"x"), host, ip6), 0);
        // What this host sends, or forwards for another, is not taken.
        let outgoing = u32::from(libc::PACKET_OUTGOING);
        assert_eq!(bpf(&f, &to(40000), outgoing, ip4), 0);
        // Fragments (more to come, or an offset) are not taken.
        let mut frag = to(40000);
        frag[6] |= 0x20;
        assert_eq!(bpf(&f, &frag, host, ip4), 0);
        let mut frag = to(40000);
        frag[7] = 1;
        assert_eq!(bpf(&f, &frag, host, ip4), 0);
        // An IPv4 header with options: the port is found after them.
        let mut opts = to(40000);
        opts[0] = 0x46;
        opts.splice(20..20, [1u8, 1, 1, 1]);
        assert_eq!(bpf(&f, &opts, host, ip4), SNAP);
        // Not UDP; not IP.
        let mut tcp = to(40000);
        tcp[9] = 6;
        assert_eq!(bpf(&f, &tcp, host, ip4), 0);
        assert_eq!(bpf(&f, &to(40000), host, 0x0806), 0);
    }

    /// A block as the kernel lays it out, with `frames` (IP packets and their status).
    fn block(frames: &[(&[u8], u32, u8)]) -> Vec<u8> {
        let mut b = vec![0u8; 4096];
        b[12..16].copy_from_slice(&(frames.len() as u32).to_ne_bytes());
        b[16..20].copy_from_slice(&64u32.to_ne_bytes());
        let mut at = 64;
        for (i, (ip, status, pkttype)) in frames.iter().enumerate() {
            let net = 80u16;
            let len = (usize::from(net) + ip.len()).next_multiple_of(16);
            let next = if i + 1 == frames.len() { 0 } else { len as u32 };
            b[at..at + 4].copy_from_slice(&next.to_ne_bytes());
            b[at + 4..at + 8].copy_from_slice(&1_700_000_000u32.to_ne_bytes());
            b[at + 8..at + 12].copy_from_slice(&500u32.to_ne_bytes());
            b[at + 12..at + 16].copy_from_slice(&(ip.len() as u32).to_ne_bytes());
            b[at + 16..at + 20].copy_from_slice(&(ip.len() as u32).to_ne_bytes());
            b[at + 20..at + 24].copy_from_slice(&status.to_ne_bytes());
            b[at + 24..at + 26].copy_from_slice(&net.to_ne_bytes());
            b[at + 26..at + 28].copy_from_slice(&net.to_ne_bytes());
            b[at + FRAME_HEADER + 10] = *pkttype;
            b[at + usize::from(net)..at + usize::from(net) + ip.len()].copy_from_slice(ip);
            at += len;
        }
        b
    }

    proptest::proptest! {
        /// Whatever a block holds (the frames' layout is the kernel's, their packets are
        /// anyone's), walking it and parsing its packets never panics or reads outside.
        #[test]
        fn any_block_and_any_packet_are_walked_without_panic(
            b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..4096),
            header in proptest::collection::vec(proptest::prelude::any::<u8>(), 20..64),
        ) {
            walk(&b, |f| {
                let _ = udp(f.ip, f.checksum_unverified);
            });
            let _ = udp(&b, true);
            // An IP header that claims UDP, followed by anything.
            let mut ip = header;
            ip[0] = 0x45;
            ip[9] = 17;
            ip.extend_from_slice(&b);
            let _ = udp(&ip, true);
        }
    }

    #[test]
    fn a_block_is_walked_frame_by_frame_and_never_outside() {
        let one = v4_udp([10, 0, 0, 1], [10, 0, 0, 2], 5004, 40000, b"one");
        let two = v6_udp(40001, b"two");
        let b = block(&[
            (&one, libc::TP_STATUS_CSUMNOTREADY, libc::PACKET_HOST),
            (&two, 0, libc::PACKET_OUTGOING),
        ]);
        let mut got = Vec::new();
        walk(&b, |f| {
            got.push((
                udp(f.ip, f.checksum_unverified).map(|u| u.payload.to_vec()),
                f.stamp,
                f.to_us,
                f.checksum_unverified,
            ))
        });
        let stamp = Duration::new(1_700_000_000, 500);
        assert_eq!(
            got,
            vec![
                (Some(b"one".to_vec()), stamp, true, false),
                (Some(b"two".to_vec()), stamp, false, true),
            ]
        );
        // A block that claims more frames than it holds, or points outside itself.
        let mut lying = b.clone();
        lying[12..16].copy_from_slice(&1000u32.to_ne_bytes());
        let mut n = 0;
        walk(&lying, |_| n += 1);
        assert_eq!(n, 2);
        let mut outside = b.clone();
        outside[16..20].copy_from_slice(&4090u32.to_ne_bytes());
        walk(&outside, |_| panic!("read outside the block"));
        for cut in [0, 10, 20, 100, 200] {
            walk(&b[..cut], |_| {});
        }
    }
}
