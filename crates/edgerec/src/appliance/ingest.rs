//! Ingest: the thread that owns every UDP socket of `ingest.ports` (and the SIPREC media
//! ports) and hands what arrives on them to the recorder in batches.
//!
//! Receiving is the hot path of the appliance (2,000 streams are 100,000 datagrams a
//! second), so its cost is counted per datagram and per read, and there are three ways in
//! (`[ingest] mode`, measured side by side in docs/performance.md):
//! - `recvmmsg` ([`recvmmsg`]): one epoll set over all sockets; each round drains every
//!   readable socket with `recvmmsg`, then lets the next round gather for the rest of
//!   `round`. Needs nothing; its cost grows with the number of sockets that are read.
//! - `ring` ([`ring`]): a memory-mapped `AF_PACKET` ring (`TPACKET_V3`) with a BPF filter on
//!   the ports, read a block at a time with no system call per datagram or per socket. The
//!   UDP sockets stay bound (the kernel never answers "port unreachable"), each with a filter
//!   that keeps its queue empty. Needs `CAP_NET_RAW`.
//! - `io_uring` ([`uring`]): one multishot receive per socket into a ring of provided
//!   buffers; completions are reaped once a round.
//!
//! Whatever the mode, every datagram goes through one [`Sink`]: checked against the allow
//! lists, copied into one [`Batch`] that goes to the recorder as a single message, and kept
//! in the crash journal at once.
//!
//! Invariants: ingest never blocks on the recorder — a batch that would take the recorder's
//! queue over its bound is dropped and counted (`overload`); every datagram read is either
//! in a batch or counted (`denied_source`, `overload`, `too_large` for one longer than a
//! receive slot); a receive error is logged and counted, never fatal; arrival times are the
//! kernel's stamps.

mod recvmmsg;
mod ring;
mod uring;

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use serde::Deserialize;

use crate::appliance::feed::{Batch, Msg};
use crate::appliance::journal::{self, Journal};
use crate::appliance::metrics::Metrics;
use crate::appliance::reload::Live;
use crate::appliance::service_manager::Beat;
use crate::appliance::shutdown::Shutdown;

/// Largest datagram taken whole (a jumbo frame); longer ones are counted as `too_large`.
pub const SLOT_BYTES: usize = 9216;
/// A batch goes to the recorder when it holds this many datagrams, even mid-round.
const BATCH_MAX: usize = 8192;
/// A kernel timestamp further back than this is not believed (the wall clock was stepped).
/// Datagrams do wait this long: in sockets the service manager kept over a restart (their
/// buffers hold about 10 s of a stream at Debian's defaults: docs/operations.md).
pub const MAX_WAIT: Duration = Duration::from_secs(30);
/// How often an idle ingest thread looks at its stop flag.
const STOP_CHECK: Duration = Duration::from_millis(50);

/// How ingest reads (`[ingest] mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// The ring where it can be had (`CAP_NET_RAW`), else `recvmmsg`, saying why.
    #[default]
    Auto,
    /// epoll and `recvmmsg` on every socket.
    Recvmmsg,
    /// A memory-mapped `AF_PACKET` ring (needs `CAP_NET_RAW`).
    Ring,
    /// io_uring multishot receives into provided buffers.
    IoUring,
}

impl Mode {
    /// Its name in the config and the logs.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Auto => "auto",
            Mode::Recvmmsg => "recvmmsg",
            Mode::Ring => "ring",
            Mode::IoUring => "io_uring",
        }
    }
}

/// A mode made ready before the ingest thread starts, so that a mode that cannot be had
/// (a ring without `CAP_NET_RAW`) fails the start with its reason.
pub struct Way {
    way: WayOf,
    /// Each socket's own address, by index (read once, here).
    locals: Vec<SocketAddr>,
    /// A ring the service manager kept was not taken (it did not fit, or no ring is used):
    /// its name is to be cleared from the store.
    passed_unused: bool,
}

enum WayOf {
    Recvmmsg,
    Ring(ring::Ring),
    IoUring,
}

impl Way {
    /// Makes `mode` ready for `sockets`: the ring (`ring_mib` MiB, blocks handed over after
    /// at most `round`; the one the service manager kept, `passed`, where it fits) is opened
    /// here, and from now on takes every datagram of their ports. Without a ring, a filter a
    /// killed ring process left on the sockets is taken off.
    pub fn open(
        mode: Mode,
        sockets: &[UdpSocket],
        (ring_mib, passed): (usize, Option<std::os::fd::OwnedFd>),
        round: Duration,
    ) -> io::Result<Way> {
        let locals = sockets
            .iter()
            .map(UdpSocket::local_addr)
            .collect::<io::Result<Vec<_>>>()?;
        let was_passed = passed.is_some();
        let ring = |passed| ring::Ring::open(sockets, &locals, ring_mib, round, passed);
        let way = match mode {
            Mode::Recvmmsg => WayOf::Recvmmsg,
            Mode::IoUring => {
                uring::probe()?;
                WayOf::IoUring
            }
            Mode::Ring => WayOf::Ring(ring(passed)?),
            Mode::Auto => match ring(passed) {
                Ok(r) => WayOf::Ring(r),
                Err(e) => {
                    tracing::warn!(
                        error = %e,
                        "ingest.mode = \"auto\": no packet ring, reading the sockets \
                         (recvmmsg); grant CAP_NET_RAW for the cheaper ring"
                    );
                    WayOf::Recvmmsg
                }
            },
        };
        if !matches!(way, WayOf::Ring(_)) {
            ring::undrop_all(sockets);
        }
        let passed_unused = was_passed
            && match &way {
                WayOf::Ring(r) => !r.adopted(),
                WayOf::Recvmmsg | WayOf::IoUring => true,
            };
        Ok(Way {
            way,
            locals,
            passed_unused,
        })
    }

    /// The mode it reads by.
    pub fn mode(&self) -> Mode {
        match self.way {
            WayOf::Recvmmsg => Mode::Recvmmsg,
            WayOf::Ring(_) => Mode::Ring,
            WayOf::IoUring => Mode::IoUring,
        }
    }

    /// Whether the sockets' own drop counts (`/proc/self/net/udp`) are ingest's losses: not
    /// with a ring, where the sockets drop everything by design and the ring counts its own.
    pub fn socket_drops_count(&self) -> bool {
        !matches!(self.way, WayOf::Ring(_))
    }

    /// Under a service manager, hands a new ring to its descriptor store (so it goes on
    /// taking datagrams over a restart or a `kill -9`), replacing one that did not fit;
    /// clears a kept ring no longer in use.
    pub fn keep_ring(&mut self) {
        use crate::appliance::service_manager;
        if std::env::var_os("NOTIFY_SOCKET").is_none() {
            return;
        }
        if self.passed_unused
            && let Err(e) = service_manager::clear(&[service_manager::RING.to_string()].into())
        {
            tracing::warn!(error = %e, "cannot clear the old packet ring from the store");
        }
        if let WayOf::Ring(r) = &mut self.way {
            if r.adopted() {
                r.set_kept();
            } else {
                match service_manager::store_file(service_manager::RING, r.fd()) {
                    Ok(()) => r.set_kept(),
                    Err(e) => tracing::warn!(
                        error = %e,
                        "cannot hand the packet ring to the service manager"
                    ),
                }
            }
        }
    }
}

/// What the ingest thread needs.
pub struct IngestSetup {
    /// How it reads.
    pub way: Way,
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
/// recorder is gone. Fails only if the mode cannot be set up (nothing was read then).
pub fn run(setup: IngestSetup) -> io::Result<()> {
    let IngestSetup {
        way,
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
    let allow_now = allow.get();
    let sink = Sink {
        tx,
        recycle,
        queued,
        max_queued,
        metrics,
        journal,
        allow,
        allow_now,
        siprec_allow,
        siprec_from,
        batch: Batch::default(),
        unjournaled: 0,
    };
    let ctx = Context {
        sockets,
        locals: way.locals,
        stop,
        round,
        beat,
    };
    match way.way {
        WayOf::Recvmmsg => recvmmsg::run(&ctx, sink),
        WayOf::Ring(r) => ring::run(&ctx, sink, &r),
        WayOf::IoUring => uring::run(&ctx, sink),
    }
}

/// What every mode reads from and answers to.
struct Context {
    sockets: Vec<UdpSocket>,
    /// Each socket's own address, by index.
    locals: Vec<SocketAddr>,
    stop: Shutdown,
    round: Duration,
    beat: Arc<Beat>,
}

impl Context {
    /// After a round of reads: true if the thread is to return (stopping, and the last
    /// round found nothing more, or 16 last rounds went by: a flood that keeps a socket full
    /// does not hold the stop up for long); else, unless the round was busy, lets the next
    /// round gather for the rest of `round` (the kernel stamps each datagram's arrival, so
    /// the wait costs no timing accuracy).
    fn round_end(&self, r: Round, last_rounds: &mut u32) -> bool {
        if r.stopping {
            *last_rounds += 1;
            if !r.busy || *last_rounds >= 16 {
                return true;
            }
        }
        if r.read
            && !r.busy
            && let Some(rest) = self.round.checked_sub(r.started.elapsed())
        {
            std::thread::sleep(rest);
        }
        false
    }
}

/// What a round of reads found.
struct Round {
    /// The stop was asked for before it began.
    stopping: bool,
    /// A socket had more than a read took.
    busy: bool,
    /// Anything was read.
    read: bool,
    /// When it began.
    started: Instant,
}

/// Where every datagram read goes: checked, into the batch for the recorder, into the
/// journal; or counted.
struct Sink {
    tx: SyncSender<Msg>,
    recycle: Receiver<Batch>,
    queued: Arc<AtomicUsize>,
    max_queued: usize,
    metrics: Arc<Metrics>,
    journal: Option<Journal>,
    allow: Arc<Live<Vec<IpNet>>>,
    /// `allow` as it was at the start of this round.
    allow_now: Arc<Vec<IpNet>>,
    siprec_allow: Arc<Vec<IpNet>>,
    siprec_from: usize,
    batch: Batch,
    /// The datagrams of the batch from here on are not yet in the journal.
    unjournaled: usize,
}

impl Sink {
    /// Takes the allow list as it is now. Called after each wait, not before: a reload that
    /// swapped the list while the thread waited applies to the datagrams that woke it (read
    /// before, a burst arriving just after a reload was judged by the old list — the reload
    /// test caught it under load).
    fn refresh(&mut self) {
        self.allow_now = self.allow.get();
    }

    /// One datagram that arrived on socket `i` (bound to `local`) from `remote` at `at`;
    /// `truncated` if it was longer than a slot. Into the batch, or counted.
    fn take(
        &mut self,
        i: usize,
        local: SocketAddr,
        remote: SocketAddr,
        at: Instant,
        data: &[u8],
        truncated: bool,
    ) {
        if truncated || data.len() > SLOT_BYTES {
            Metrics::inc(&self.metrics.datagrams_rejected, "too_large", 1);
            return;
        }
        let siprec = i >= self.siprec_from;
        let allow = if siprec {
            &self.siprec_allow
        } else {
            &self.allow_now
        };
        if !allow.is_empty() && !allow.iter().any(|n| n.contains(&remote.ip())) {
            Metrics::inc(&self.metrics.datagrams_rejected, "denied_source", 1);
            return;
        }
        if siprec {
            // The journal keeps the ingest ports' datagrams only: what came before this one
            // goes in now, and this one is passed over.
            self.keep(Instant::now(), SystemTime::now());
            self.batch.push(local, remote, at, data);
            self.unjournaled = self.batch.len();
        } else {
            self.batch.push(local, remote, at, data);
        }
    }

    /// Everything taken and not yet journaled into the journal (read at `read_at`, when the
    /// wall clock said `wall`): a kill from here on loses none of it. Called after every
    /// read.
    fn keep(&mut self, read_at: Instant, wall: SystemTime) {
        if self.unjournaled >= self.batch.len() {
            return;
        }
        if let Some(j) = &self.journal {
            let full = j.append(&mut self.batch, self.unjournaled, read_at, wall);
            if full > 0 {
                Metrics::inc(&self.metrics.journal, "unprotected", full);
            }
        }
        self.unjournaled = self.batch.len();
    }

    /// Hands the batch over once it holds [`BATCH_MAX`] datagrams; false if the recorder is
    /// gone.
    fn hand_over_if_full(&mut self) -> bool {
        self.batch.len() < BATCH_MAX || self.hand_over()
    }

    /// Hands the batch over (if it holds anything); false if the recorder is gone.
    fn hand_over(&mut self) -> bool {
        if self.batch.is_empty() {
            return true;
        }
        self.keep(Instant::now(), SystemTime::now());
        self.unjournaled = 0;
        // The next round is likely the size of this one: give it the room at once.
        let room = self.recycle.try_recv().unwrap_or_else(|_| {
            Batch::with_capacity(
                self.batch.len() + self.batch.len() / 4,
                self.batch.byte_len() * 5 / 4,
            )
        });
        let b = std::mem::replace(&mut self.batch, room);
        let n = b.len();
        if self.queued.load(Ordering::Relaxed) + n > self.max_queued {
            self.overload(&b);
            return true;
        }
        self.queued.fetch_add(n, Ordering::Relaxed);
        match self.tx.try_send(Msg::Batch(b)) {
            Ok(()) => true,
            Err(TrySendError::Full(m)) => {
                self.queued.fetch_sub(n, Ordering::Relaxed);
                match m {
                    Msg::Batch(b) => self.overload(&b),
                    _ => Metrics::inc(&self.metrics.datagrams_rejected, "overload", n as u64),
                }
                true
            }
            Err(TrySendError::Disconnected(_)) => false,
        }
    }

    /// A batch the recorder has no room for: counted, and released from the journal.
    fn overload(&self, b: &Batch) {
        Metrics::inc(&self.metrics.datagrams_rejected, "overload", b.len() as u64);
        if let Some(j) = &self.journal {
            j.dropped(b);
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::sync_channel;

    /// Every mode: the ring needs CAP_NET_RAW (the tests run as root, as CI does).
    const MODES: [Mode; 3] = [Mode::Recvmmsg, Mode::Ring, Mode::IoUring];

    fn make(
        (mode, round): (Mode, Duration),
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
        let way = Way::open(mode, &sockets, (2, None), round)
            .unwrap_or_else(|e| panic!("{}: {e}", mode.name()));
        let setup = IngestSetup {
            way,
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
            round,
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

    const ROUND: Duration = Duration::from_millis(5);

    #[test]
    fn every_datagram_of_every_port_arrives_in_order_per_port() {
        for mode in MODES {
            in_order_per_port(mode);
        }
    }

    fn in_order_per_port(mode: Mode) {
        let (addrs, setup, rx, _m) = make((mode, ROUND), 3, vec![], 1_000_000);
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
        for mode in MODES {
            arrival_times(mode);
        }
    }

    fn arrival_times(mode: Mode) {
        let (addrs, setup, rx, _m) = make((mode, Duration::from_secs(1)), 1, vec![], 1_000_000);
        let stop = setup.stop.clone();
        let t = std::thread::spawn(move || run(setup));
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        // The first datagram starts a round; the second arrives while ingest waits out the
        // rest of it, and is read most of a second after it arrived (a round long enough
        // for a loaded machine to be late by half of it).
        tx.send_to(b"first", addrs[0]).unwrap();
        assert_eq!(collect(&rx, 1).len(), 1);
        std::thread::sleep(Duration::from_millis(100));
        let before = Instant::now();
        tx.send_to(b"second", addrs[0]).unwrap();
        let sent = Instant::now();
        let Ok(Msg::Batch(b)) = rx.recv_timeout(Duration::from_secs(10)) else {
            panic!("no second batch");
        };
        let read = Instant::now();
        let (d, bytes) = b.iter().next().unwrap();
        assert_eq!(bytes, b"second");
        assert!(
            read.duration_since(sent) > Duration::from_millis(300),
            "{}: not held back",
            mode.name()
        );
        // Between the send's start and its end, to within what the kernel's wall-clock stamp
        // turned into an `Instant` may be off.
        let slack = Duration::from_millis(50);
        assert!(
            d.at + slack >= before && d.at <= sent + slack,
            "{}: arrival {:?} before the send's start, {:?} after its end",
            mode.name(),
            before.saturating_duration_since(d.at),
            d.at.saturating_duration_since(sent),
        );
        stop.trigger();
        t.join().unwrap().unwrap();
    }

    #[test]
    fn denied_sources_truncation_and_overload_are_counted_not_passed_on() {
        for mode in MODES {
            counted_not_passed_on(mode);
        }
    }

    fn counted_not_passed_on(mode: Mode) {
        let (addrs, mut setup, rx, metrics) =
            make((mode, ROUND), 1, vec!["10.0.0.0/8".parse().unwrap()], 0);
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
        let (addrs, setup, rx, metrics) = make((mode, ROUND), 1, vec![], 0);
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
