//! Ingest: one thread owns every UDP socket of `ingest.ports` and hands what they receive to
//! the recorder in batches.
//!
//! Receiving is the hot path of the appliance (2,000 streams are 100,000 datagrams a
//! second), so its cost is counted in system calls: the thread waits on one epoll set over
//! all sockets, and in each round drains every readable socket with `recvmmsg` (up to
//! [`SLOTS`] datagrams per call), checks the sources against `ingest.allow`, and copies the
//! datagrams into one [`Batch`] that goes to the recorder as a single message. After a busy
//! round it lets the next one gather for the rest of `round` (a few milliseconds), so a
//! socket is read once per round with everything that arrived since, not once per datagram;
//! the kernel's socket buffer holds what arrives meanwhile. Idle ports cost nothing.
//!
//! Invariants: ingest never blocks on the recorder — a batch that would take the recorder's
//! queue over its bound is dropped and counted (`overload`); every datagram read is either
//! in a batch or counted (`denied_source`, `overload`, `too_large` for one longer than a
//! receive slot); a receive error is logged and counted, never fatal.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::socket::{
    ControlMessageOwned, MsgFlags, MultiHeaders, RecvMsg, SockaddrStorage, recvmmsg, setsockopt,
    sockopt,
};
use nix::sys::time::TimeSpec;

use crate::appliance::feed::{Batch, Msg};
use crate::appliance::journal::{self, Journal};
use crate::appliance::metrics::Metrics;
use crate::appliance::reload::Live;
use crate::appliance::service_manager::Beat;
use crate::appliance::shutdown::Shutdown;

/// Datagrams one `recvmmsg` call can take.
pub const SLOTS: usize = 32;
/// Largest datagram taken whole (a jumbo frame); longer ones are truncated by the kernel
/// and counted as `too_large`.
pub const SLOT_BYTES: usize = 9216;
/// Receive buffer asked for each socket (the kernel grants at most twice
/// `net.core.rmem_max`; see docs/operations.md, "Ingest").
const RCVBUF: usize = 4 << 20;
/// A batch goes to the recorder when it holds this many datagrams, even mid-round.
const BATCH_MAX: usize = 8192;
/// A kernel timestamp further back than this is not believed (the wall clock was stepped).
/// Datagrams do wait this long: in sockets the service manager kept over a restart (their
/// buffers hold about 10 s of a stream at Debian's defaults: docs/operations.md).
pub const MAX_WAIT: Duration = Duration::from_secs(30);
/// How often an idle ingest thread looks at its stop flag.
const STOP_CHECK: Duration = Duration::from_millis(50);

/// What the ingest thread needs.
pub struct IngestSetup {
    /// The bound, non-blocking sockets.
    pub sockets: Vec<UdpSocket>,
    /// Allowed sources; empty allows all. Taken once a round: a reload replaces it.
    pub allow: Arc<Live<Vec<IpNet>>>,
    /// The sockets from this index on are the SIPREC media ports, whose sources are checked
    /// against `[siprec] allow` instead (and, per session, against the offer).
    pub siprec_from: usize,
    /// `[siprec] allow`; empty allows all.
    pub siprec_allow: Arc<Vec<IpNet>>,
    /// The recorder's queue.
    pub tx: SyncSender<Msg>,
    /// Batches the recorder has emptied, to be filled again (no allocation per round).
    pub recycle: Receiver<Batch>,
    /// Datagrams handed over and not yet processed (the recorder subtracts).
    pub queued: Arc<AtomicUsize>,
    /// The bound on `queued`.
    pub max_queued: usize,
    /// The metrics.
    pub metrics: Arc<Metrics>,
    /// Set to stop; the thread returns within [`STOP_CHECK`].
    pub stop: Shutdown,
    /// How long a busy round gathers before the sockets are read again.
    pub round: Duration,
    /// Beaten once a round (at least every [`STOP_CHECK`]) for the watchdog.
    pub beat: Arc<Beat>,
    /// The crash journal every datagram of the ingest ports goes into as it is read (not
    /// the SIPREC media ports': their sessions end at a crash).
    pub journal: Option<Journal>,
    /// What the last process left in the journal, handed to the recorder before anything
    /// is read.
    pub replay: Vec<(u64, journal::Datagram)>,
}

/// Runs until `stop` is set (then takes what the sockets already hold and returns) or the
/// recorder is gone. Fails only if epoll cannot be set up.
pub fn run(setup: IngestSetup) -> io::Result<()> {
    let IngestSetup {
        sockets,
        allow,
        siprec_from,
        siprec_allow,
        tx,
        recycle,
        queued,
        max_queued,
        metrics,
        stop,
        round,
        beat,
        journal,
        replay,
    } = setup;
    if !replay_first(&tx, &queued, &metrics, replay) {
        return Ok(());
    }
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
    let mut locals = Vec::with_capacity(sockets.len());
    for (i, s) in sockets.iter().enumerate() {
        locals.push(s.local_addr()?);
        epoll.add(
            s.as_fd(),
            EpollEvent::new(
                EpollFlags::EPOLLIN | EpollFlags::EPOLLET,
                u64::try_from(i).unwrap_or(u64::MAX),
            ),
        )?;
    }
    let mut events = vec![EpollEvent::empty(); sockets.len().clamp(1, 4096)];
    for s in &sockets {
        // Arrival times from the kernel: a datagram waits up to a round before it is read.
        if let Err(e) = setsockopt(s, sockopt::ReceiveTimestampns, &true) {
            tracing::warn!(error = %e, "no kernel receive timestamps; using the time of the read");
        }
        // Room for a burst between two reads; the kernel caps it at net.core.rmem_max.
        if let Err(e) = setsockopt(s, sockopt::RcvBuf, &RCVBUF) {
            tracing::warn!(error = %e, "cannot set the socket receive buffer");
        }
    }
    if let Some(s) = sockets.first()
        && let Ok(got) = nix::sys::socket::getsockopt(s, sockopt::RcvBuf)
    {
        tracing::debug!(bytes = got, "socket receive buffer per ingest port");
    }
    let mut slots = vec![[0u8; SLOT_BYTES]; SLOTS];
    let mut headers =
        MultiHeaders::<SockaddrStorage>::preallocate(SLOTS, Some(nix::cmsg_space!(TimeSpec)));
    let mut batch = Batch::default();
    let timeout = EpollTimeout::try_from(STOP_CHECK).expect("50 ms is a valid epoll timeout");
    let hand_over = |batch: &mut Batch| -> bool {
        // The next round is likely the size of this one: give it the room at once.
        let room = recycle.try_recv().unwrap_or_else(|_| {
            Batch::with_capacity(batch.len() + batch.len() / 4, batch.byte_len() * 5 / 4)
        });
        let b = std::mem::replace(batch, room);
        let n = b.len();
        if queued.load(Ordering::Relaxed) + n > max_queued {
            Metrics::inc(&metrics.datagrams_rejected, "overload", n as u64);
            if let Some(j) = &journal {
                j.dropped(&b);
            }
            return true;
        }
        queued.fetch_add(n, Ordering::Relaxed);
        match tx.try_send(Msg::Batch(b)) {
            Ok(()) => true,
            Err(TrySendError::Full(Msg::Batch(b))) => {
                queued.fetch_sub(n, Ordering::Relaxed);
                Metrics::inc(&metrics.datagrams_rejected, "overload", n as u64);
                if let Some(j) = &journal {
                    j.dropped(&b);
                }
                true
            }
            Err(TrySendError::Full(_)) => {
                queued.fetch_sub(n, Ordering::Relaxed);
                Metrics::inc(&metrics.datagrams_rejected, "overload", n as u64);
                true
            }
            Err(TrySendError::Disconnected(_)) => false,
        }
    };
    let mut last_rounds = 0;
    loop {
        beat.beat();
        // Stopping: one last round without waiting takes what the kernel already holds, so
        // a datagram that arrived before the stop is recorded, not left in a socket.
        let stopping = stop.is_triggered();
        let started = Instant::now();
        let wait = if stopping {
            EpollTimeout::ZERO
        } else {
            timeout
        };
        let ready = match epoll.wait(&mut events, wait) {
            Ok(n) => n,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        // Read after the wait, not before: a reload that swapped the list while this thread
        // waited applies to the datagrams that woke it (read before, a burst arriving just
        // after a reload was judged by the old list — the reload test caught it under load).
        let allow_now = allow.get();
        // A socket that filled a whole `recvmmsg` is taking a burst: no pause then.
        let mut busy = false;
        for ev in &events[..ready] {
            let i = usize::try_from(ev.data()).unwrap_or(usize::MAX);
            let (Some(socket), Some(&local)) = (sockets.get(i), locals.get(i)) else {
                continue;
            };
            let allow = if i >= siprec_from {
                &siprec_allow
            } else {
                &allow_now
            };
            // Drain this socket: a short read means it was empty at that moment, and epoll
            // (edge-triggered) reports the socket again when anything new arrives.
            loop {
                let mut iovs: Vec<[io::IoSliceMut<'_>; 1]> = slots
                    .iter_mut()
                    .map(|s| [io::IoSliceMut::new(&mut s[..])])
                    .collect();
                let got = match recvmmsg(
                    socket.as_raw_fd(),
                    &mut headers,
                    iovs.iter_mut(),
                    MsgFlags::MSG_DONTWAIT,
                    None,
                ) {
                    Ok(results) => {
                        let read_at = Instant::now();
                        let wall = SystemTime::now();
                        let from = batch.len();
                        let mut got = 0;
                        for msg in results {
                            got += 1;
                            let Some(remote) = msg.address.as_ref().and_then(to_std) else {
                                continue;
                            };
                            if msg.flags.contains(MsgFlags::MSG_TRUNC) {
                                Metrics::inc(&metrics.datagrams_rejected, "too_large", 1);
                                continue;
                            }
                            if !allow.is_empty() && !allow.iter().any(|n| n.contains(&remote.ip()))
                            {
                                Metrics::inc(&metrics.datagrams_rejected, "denied_source", 1);
                                continue;
                            }
                            let at = arrival(&msg, read_at, wall);
                            if let Some(data) = msg.iovs().next() {
                                batch.push(local, remote, at, &data[..msg.bytes.min(data.len())]);
                            }
                        }
                        // Kept at once: a kill from here on loses none of them.
                        if let Some(j) = journal.as_ref().filter(|_| i < siprec_from) {
                            let full = j.append(&mut batch, from, read_at, wall);
                            if full > 0 {
                                Metrics::inc(&metrics.journal, "unprotected", full);
                            }
                        }
                        got
                    }
                    Err(Errno::EAGAIN | Errno::EINTR) => 0,
                    Err(e) => {
                        Metrics::inc(&metrics.datagrams_rejected, "receive_error", 1);
                        tracing::warn!(port = local.port(), error = %e, "receive error");
                        0
                    }
                };
                if batch.len() >= BATCH_MAX && !hand_over(&mut batch) {
                    return Ok(());
                }
                if got < SLOTS {
                    break;
                }
                busy = true;
            }
        }
        if !batch.is_empty() && !hand_over(&mut batch) {
            return Ok(());
        }
        if stopping {
            // A flood that keeps a socket full does not hold the stop up for long.
            last_rounds += 1;
            if !busy || last_rounds >= 16 {
                return Ok(());
            }
        }
        if ready > 0 && !busy {
            // Let the next round gather (the kernel stamps each datagram's arrival, so the
            // wait costs no timing accuracy).
            if let Some(rest) = round.checked_sub(started.elapsed()) {
                std::thread::sleep(rest);
            }
        }
    }
}

/// Hands the recorder what the last process left in the journal, before anything is read:
/// in batches, waiting for room (nothing of it is dropped). False if the recorder is gone.
fn replay_first(
    tx: &SyncSender<Msg>,
    queued: &AtomicUsize,
    metrics: &Metrics,
    replay: Vec<(u64, journal::Datagram)>,
) -> bool {
    if replay.is_empty() {
        return true;
    }
    tracing::info!(
        datagrams = replay.len(),
        "replaying what the last process read but had not written"
    );
    Metrics::inc(&metrics.journal, "replayed", replay.len() as u64);
    let (now, wall) = (Instant::now(), SystemTime::now());
    for part in replay.chunks(BATCH_MAX) {
        let mut b = Batch::with_capacity(part.len(), part.iter().map(|(_, d)| d.data.len()).sum());
        for (pos, d) in part {
            let at = arrived(Duration::from_nanos(d.wall_ns), now, wall);
            b.push_journaled(d.local, d.remote, at, &d.data, *pos);
        }
        queued.fetch_add(b.len(), Ordering::Relaxed);
        if tx.send(Msg::Batch(b)).is_err() {
            return false;
        }
    }
    true
}

/// When a datagram arrived, on the monotonic clock: its kernel timestamp (wall clock) taken
/// back from the moment of the read; the read time itself if there is none.
fn arrival<S>(msg: &RecvMsg<'_, '_, S>, read_at: Instant, wall: SystemTime) -> Instant {
    let Ok(cmsgs) = msg.cmsgs() else {
        return read_at;
    };
    for c in cmsgs {
        if let ControlMessageOwned::ScmTimestampns(ts) = c {
            return arrived(Duration::from(ts), read_at, wall);
        }
    }
    read_at
}

/// When a datagram stamped `stamp` (since the Unix epoch) arrived, on the monotonic clock,
/// from a moment `now` when the wall clock said `wall`; at most [`MAX_WAIT`] back.
pub fn arrived(stamp: Duration, now: Instant, wall: SystemTime) -> Instant {
    let waited = wall
        .duration_since(UNIX_EPOCH)
        .ok()
        .and_then(|w| w.checked_sub(stamp))
        .unwrap_or_default()
        .min(MAX_WAIT);
    now.checked_sub(waited).unwrap_or(now)
}

/// The kernel's count of datagrams it dropped because a socket's receive buffer was full,
/// summed over the sockets bound to `ports`, from the text of `/proc/net/udp` or
/// `/proc/net/udp6` (the last column, `drops`). Lines it cannot read are skipped.
pub fn kernel_drops(proc_net_udp: &str, ports: (u16, u16)) -> u64 {
    proc_net_udp
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (_, port) = fields.get(1)?.rsplit_once(':')?;
            let port = u16::from_str_radix(port, 16).ok()?;
            if port < ports.0 || port > ports.1 {
                return None;
            }
            fields.last()?.parse::<u64>().ok()
        })
        .sum()
}

fn to_std(a: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(SocketAddr::from(*v4));
    }
    a.as_sockaddr_in6().map(|v6| SocketAddr::from(*v6))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::sync_channel;

    fn make(
        n: usize,
        allow: Vec<IpNet>,
        max_queued: usize,
    ) -> (
        Vec<SocketAddr>,
        IngestSetup,
        std::sync::mpsc::Receiver<Msg>,
        Arc<Metrics>,
    ) {
        let sockets: Vec<UdpSocket> = (0..n)
            .map(|_| {
                let s = UdpSocket::bind("127.0.0.1:0").unwrap();
                s.set_nonblocking(true).unwrap();
                s
            })
            .collect();
        let addrs = sockets.iter().map(|s| s.local_addr().unwrap()).collect();
        let (tx, rx) = sync_channel(1000);
        let (_recycle_tx, recycle) = sync_channel(1);
        let (metrics, _registry) = Metrics::new();
        let setup = IngestSetup {
            sockets,
            allow: Live::new(allow),
            siprec_from: usize::MAX,
            siprec_allow: Arc::new(Vec::new()),
            tx,
            recycle,
            queued: Arc::new(AtomicUsize::new(0)),
            max_queued,
            metrics: Arc::clone(&metrics),
            stop: Shutdown::new(),
            round: Duration::from_millis(5),
            beat: Beat::new("ingest"),
            journal: None,
            replay: Vec::new(),
        };
        (addrs, setup, rx, metrics)
    }

    fn collect(rx: &std::sync::mpsc::Receiver<Msg>, want: usize) -> Vec<(SocketAddr, Vec<u8>)> {
        let mut got = Vec::new();
        while got.len() < want {
            match rx.recv_timeout(Duration::from_secs(10)) {
                Ok(Msg::Batch(b)) => {
                    got.extend(b.iter().map(|(d, bytes)| (d.local, bytes.to_vec())))
                }
                Ok(_) => {}
                Err(e) => panic!("only {} of {want} datagrams: {e}", got.len()),
            }
        }
        got
    }

    #[test]
    fn kernel_drops_are_summed_over_our_ports_only() {
        let text = "\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  133: 0100007F:9C40 00000000:0000 07 00000000:00000000 00:00000000 00000000  1000        0 81 2 0000000000000000 5
  134: 00000000:9C41 00000000:0000 07 00000000:00030000 00:00000000 00000000  1000        0 82 2 0000000000000000 7
  135: 0100007F:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000   101        0 83 2 0000000000000000 1000
  136: garbage
";
        assert_eq!(kernel_drops(text, (40000, 40001)), 12);
        assert_eq!(kernel_drops(text, (40001, 40001)), 7);
        assert_eq!(kernel_drops(text, (1, 100)), 1000);
        let v6 = "\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  1: 00000000000000000000000001000000:9C40 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000  1000        0 9 2 0000000000000000 3
";
        assert_eq!(kernel_drops(v6, (40000, 40000)), 3);
    }

    fn rejected(metrics: &Metrics, reason: &str) -> u64 {
        metrics
            .datagrams_rejected
            .get_or_create(&crate::appliance::metrics::Reason {
                reason: reason.into(),
            })
            .get()
    }

    #[test]
    fn every_datagram_of_every_port_arrives_in_order_per_port() {
        let (addrs, setup, rx, _m) = make(3, vec![], 1_000_000);
        let stop = setup.stop.clone();
        let t = std::thread::spawn(move || run(setup));
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        // More than one recvmmsg can take on one port, and a jumbo datagram.
        for i in 0..100u32 {
            for a in &addrs {
                tx.send_to(&i.to_be_bytes(), a).unwrap();
            }
        }
        tx.send_to(&vec![7u8; SLOT_BYTES], addrs[0]).unwrap();
        let got = collect(&rx, 301);
        for a in &addrs {
            let seq: Vec<Vec<u8>> = got
                .iter()
                .filter(|(l, _)| l == a)
                .map(|(_, b)| b.clone())
                .take(100)
                .collect();
            let want: Vec<Vec<u8>> = (0..100u32).map(|i| i.to_be_bytes().to_vec()).collect();
            assert_eq!(seq, want);
        }
        assert!(got.iter().any(|(_, b)| b.len() == SLOT_BYTES));
        stop.trigger();
        t.join().unwrap().unwrap();
    }

    #[test]
    fn arrival_times_are_the_kernels_not_the_reads() {
        let (addrs, mut setup, rx, _m) = make(1, vec![], 1_000_000);
        setup.round = Duration::from_millis(400);
        let stop = setup.stop.clone();
        let t = std::thread::spawn(move || run(setup));
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        // The first datagram starts a round; the second arrives while ingest waits out the
        // rest of it, and is read about 300 ms after it arrived.
        tx.send_to(b"first", addrs[0]).unwrap();
        assert_eq!(collect(&rx, 1).len(), 1);
        std::thread::sleep(Duration::from_millis(100));
        let sent = Instant::now();
        tx.send_to(b"second", addrs[0]).unwrap();
        let Ok(Msg::Batch(b)) = rx.recv_timeout(Duration::from_secs(10)) else {
            panic!("no second batch");
        };
        let read = Instant::now();
        let (d, bytes) = b.iter().next().unwrap();
        assert_eq!(bytes, b"second");
        assert!(
            read.duration_since(sent) > Duration::from_millis(150),
            "not held back"
        );
        let off = if d.at > sent {
            d.at - sent
        } else {
            sent - d.at
        };
        assert!(
            off < Duration::from_millis(50),
            "arrival {off:?} away from the send"
        );
        stop.trigger();
        t.join().unwrap().unwrap();
    }

    #[test]
    fn denied_sources_truncation_and_overload_are_counted_not_passed_on() {
        let (addrs, mut setup, rx, metrics) = make(1, vec!["10.0.0.0/8".parse().unwrap()], 0);
        setup.max_queued = 1_000_000;
        let stop = setup.stop.clone();
        let t = std::thread::spawn(move || run(setup));
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.send_to(b"from loopback", addrs[0]).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while rejected(&metrics, "denied_source") < 1 {
            assert!(Instant::now() < deadline, "denied source not counted");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(rx.try_recv().is_err());
        stop.trigger();
        t.join().unwrap().unwrap();

        // A queue at its bound: everything is counted as overload, nothing is queued.
        let (addrs, setup, rx, metrics) = make(1, vec![], 0);
        let stop = setup.stop.clone();
        let t = std::thread::spawn(move || run(setup));
        tx.send_to(b"one", addrs[0]).unwrap();
        tx.send_to(&vec![1u8; SLOT_BYTES + 1], addrs[0]).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while rejected(&metrics, "overload") < 1 || rejected(&metrics, "too_large") < 1 {
            assert!(Instant::now() < deadline, "overload/too_large not counted");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(rx.try_recv().is_err());
        stop.trigger();
        t.join().unwrap().unwrap();
    }
}
