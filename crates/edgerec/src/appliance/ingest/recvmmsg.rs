//! `[ingest] mode = "recvmmsg"`: one epoll set over all sockets; each round drains every
//! readable socket with `recvmmsg` (up to [`SLOTS`] datagrams per call), then lets the next
//! round gather for the rest of `round` (a few milliseconds), so a socket is read once per
//! round with everything that arrived since, not once per datagram; the kernel's socket
//! buffer holds what arrives meanwhile. Idle ports cost nothing; every readable socket costs
//! a system call a round.
//!
//! Invariant: a socket is drained until a short read before the round ends, so edge-
//! triggered epoll reports it again when anything new arrives.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant, SystemTime};

use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::socket::{
    ControlMessageOwned, MsgFlags, MultiHeaders, RecvMsg, SockaddrStorage, recvmmsg, setsockopt,
    sockopt,
};
use nix::sys::time::TimeSpec;

use super::{Context, Round, SLOT_BYTES, STOP_CHECK, Sink, arrived};
use crate::appliance::metrics::Metrics;

/// Datagrams one `recvmmsg` call can take.
pub const SLOTS: usize = 32;
/// Receive buffer asked for each socket (the kernel grants at most twice
/// `net.core.rmem_max`; see docs/operations.md, "Ingest").
const RCVBUF: usize = 4 << 20;

/// Kernel arrival stamps and room for a burst on every socket.
pub(super) fn prepare(sockets: &[UdpSocket]) {
    for s in sockets {
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
}

/// Receive slots and headers for one `recvmmsg` call, reused.
pub(super) struct Reader {
    slots: Vec<[u8; SLOT_BYTES]>,
    headers: MultiHeaders<SockaddrStorage>,
}

impl Reader {
    pub(super) fn new() -> Reader {
        Reader {
            slots: vec![[0u8; SLOT_BYTES]; SLOTS],
            headers: MultiHeaders::<SockaddrStorage>::preallocate(
                SLOTS,
                Some(nix::cmsg_space!(TimeSpec)),
            ),
        }
    }

    /// One `recvmmsg` on socket `i` into `sink`; how many datagrams it read.
    pub(super) fn read(
        &mut self,
        socket: &UdpSocket,
        i: usize,
        local: SocketAddr,
        sink: &mut Sink,
    ) -> usize {
        let mut iovs: Vec<[io::IoSliceMut<'_>; 1]> = self
            .slots
            .iter_mut()
            .map(|s| [io::IoSliceMut::new(&mut s[..])])
            .collect();
        match recvmmsg(
            socket.as_raw_fd(),
            &mut self.headers,
            iovs.iter_mut(),
            MsgFlags::MSG_DONTWAIT,
            None,
        ) {
            Ok(results) => {
                let read_at = Instant::now();
                let wall = SystemTime::now();
                let mut got = 0;
                for msg in results {
                    got += 1;
                    let Some(remote) = msg.address.as_ref().and_then(to_std) else {
                        continue;
                    };
                    let at = arrival(&msg, read_at, wall);
                    let truncated = msg.flags.contains(MsgFlags::MSG_TRUNC);
                    if let Some(data) = msg.iovs().next() {
                        let data = &data[..msg.bytes.min(data.len())];
                        sink.take(i, local, remote, at, data, truncated);
                    }
                }
                // Kept at once: a kill from here on loses none of them.
                sink.keep(read_at, wall);
                got
            }
            Err(Errno::EAGAIN | Errno::EINTR) => 0,
            Err(e) => {
                Metrics::inc(&sink.metrics.datagrams_rejected, "receive_error", 1);
                tracing::warn!(port = local.port(), error = %e, "receive error");
                0
            }
        }
    }

    /// Reads socket `i` until it is empty (or `limit` calls): whether the recorder is still
    /// there, and whether a read came back full (the socket is taking a burst).
    pub(super) fn drain(
        &mut self,
        socket: &UdpSocket,
        i: usize,
        local: SocketAddr,
        sink: &mut Sink,
        limit: usize,
    ) -> (bool, bool) {
        let mut busy = false;
        for _ in 0..limit {
            let got = self.read(socket, i, local, sink);
            if !sink.hand_over_if_full() {
                return (false, busy);
            }
            if got < SLOTS {
                break;
            }
            busy = true;
        }
        (true, busy)
    }
}

/// Runs until `stop` is set (then takes what the sockets already hold and returns) or the
/// recorder is gone. Fails only if epoll cannot be set up.
pub(super) fn run(ctx: &Context, mut sink: Sink) -> io::Result<()> {
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
    for (i, s) in ctx.sockets.iter().enumerate() {
        epoll.add(
            s.as_fd(),
            EpollEvent::new(
                EpollFlags::EPOLLIN | EpollFlags::EPOLLET,
                u64::try_from(i).unwrap_or(u64::MAX),
            ),
        )?;
    }
    prepare(&ctx.sockets);
    let mut events = vec![EpollEvent::empty(); ctx.sockets.len().clamp(1, 4096)];
    let mut reader = Reader::new();
    let timeout = EpollTimeout::try_from(STOP_CHECK).expect("50 ms is a valid epoll timeout");
    let mut last_rounds = 0;
    loop {
        ctx.beat.beat();
        // Stopping: one last round without waiting takes what the kernel already holds, so
        // a datagram that arrived before the stop is recorded, not left in a socket.
        let stopping = ctx.stop.is_triggered();
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
        sink.refresh();
        // A socket that filled a whole `recvmmsg` is taking a burst: no pause then.
        let mut busy = false;
        for ev in &events[..ready] {
            let i = usize::try_from(ev.data()).unwrap_or(usize::MAX);
            let (Some(socket), Some(&local)) = (ctx.sockets.get(i), ctx.locals.get(i)) else {
                continue;
            };
            // Drain this socket: a short read means it was empty at that moment, and epoll
            // (edge-triggered) reports the socket again when anything new arrives.
            let (alive, full) = reader.drain(socket, i, local, &mut sink, usize::MAX);
            if !alive {
                return Ok(());
            }
            busy |= full;
        }
        if !sink.hand_over()
            || ctx.round_end(
                Round {
                    stopping,
                    busy,
                    read: ready > 0,
                    started,
                },
                &mut last_rounds,
            )
        {
            return Ok(());
        }
    }
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

fn to_std(a: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(SocketAddr::from(*v4));
    }
    a.as_sockaddr_in6().map(|v6| SocketAddr::from(*v6))
}
