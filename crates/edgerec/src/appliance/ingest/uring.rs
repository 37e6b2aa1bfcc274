//! `[ingest] mode = "io_uring"`: one multishot `recvmsg` per socket, armed once, each
//! datagram received into a buffer of a ring of provided buffers the thread hands back as
//! soon as it has copied the datagram into the batch. The receives themselves run when the
//! thread asks for completions (`IORING_SETUP_DEFER_TASKRUN`): once a round, all that every
//! socket queued meanwhile, in one system call, with no system call per socket.
//!
//! A socket's multishot receive ends when the buffers run out (`ENOBUFS`: the datagram
//! waits in the socket) or on an error; it is armed again once the round's buffers are
//! back. The kernel's receive path per datagram (the copy out of the socket) is the same
//! as `recvmmsg`'s; what this saves is the system call per readable socket and round.
//!
//! Invariants: a buffer is read only after its completion names it and handed back only
//! after its datagram is in the batch; the buffers and the message header the receives
//! name live as long as the ring (dropped after it).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use io_uring::types::{Fd, RecvMsgOut, SubmitArgs, Timespec};
use io_uring::{IoUring, cqueue, opcode};

use super::{Context, Round, SLOT_BYTES, STOP_CHECK, Sink, arrived};
use crate::appliance::metrics::Metrics;

/// Provided buffers (a power of two): the datagrams one round can take before the
/// receives wait for the next.
const BUFFERS: u16 = 1024;
/// One buffer: the receive's header (`io_uring_recvmsg_out`), the source address, the
/// timestamp's control message, and a slot of payload.
const BUFFER_BYTES: usize = 16 + NAME_BYTES + CONTROL_BYTES + SLOT_BYTES;
/// Room for a `sockaddr_in6`.
const NAME_BYTES: usize = 28;
/// Room for one `SCM_TIMESTAMPNS` control message (`CMSG_SPACE(sizeof(struct timespec))`).
const CONTROL_BYTES: usize = 32;
/// The buffer group of the provided buffers.
const GROUP: u16 = 0;
/// Datagrams the kernel takes from one socket per turn of a multishot receive
/// (`MULTISHOT_MAX_RETRY` in io_uring/net.c) before it leaves the rest for the next enter.
const TURN: u32 = 32;

/// Runs until `stop` is set (then takes what the sockets already hold and returns) or the
/// recorder is gone. Fails if the ring cannot be set up (nothing was read then).
pub(super) fn run(ctx: &Context, mut sink: Sink) -> io::Result<()> {
    super::recvmmsg::prepare(&ctx.sockets);
    let mut r = Receiver::new(ctx.sockets.len())?;
    for i in 0..ctx.sockets.len() {
        r.arm(ctx, i)?;
    }
    let mut last_rounds = 0;
    loop {
        ctx.beat.beat();
        let stopping = ctx.stop.is_triggered();
        let started = Instant::now();
        let wait = if stopping { Duration::ZERO } else { STOP_CHECK };
        r.wait(wait)?;
        sink.refresh();
        let (got, busy) = r.reap(ctx, &mut sink)?;
        if !sink.hand_over()
            || ctx.round_end(
                Round {
                    stopping,
                    busy,
                    read: got > 0,
                    started,
                },
                &mut last_rounds,
            )
        {
            return Ok(());
        }
    }
}

/// Whether io_uring can be had here (a kernel that has it, not disabled by
/// `kernel.io_uring_disabled` or a seccomp filter): a ring of its own is made and dropped,
/// since the thread that reads must make its ring itself.
pub(super) fn probe() -> io::Result<()> {
    IoUring::new(8)
        .map(drop)
        .map_err(|e| io::Error::new(e.kind(), format!("io_uring: {e}")))
}

/// The ring, its provided buffers and the message header every receive names.
struct Receiver {
    ring: IoUring,
    /// `BUFFERS` entries of the provided-buffer ring (page-aligned, shared with the kernel).
    entries: memmap2::MmapMut,
    /// The buffers themselves, `BUFFER_BYTES` each (the kernel writes into those it holds).
    buffers: memmap2::MmapMut,
    /// What the receives are told of the name and control sizes.
    msghdr: Box<libc::msghdr>,
    /// Buffers handed back (the tail of the provided-buffer ring).
    tail: u16,
    /// Sockets whose multishot receive ended and is to be armed again.
    rearm: Vec<usize>,
    /// Completions of each socket in this reap, and the sockets that had any.
    per_socket: Vec<u32>,
    touched: Vec<usize>,
}

impl Receiver {
    fn new(sockets: usize) -> io::Result<Receiver> {
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            // A round's completions: one per buffer, and the last of each socket's receive.
            .setup_cqsize(u32::try_from(2 * sockets + 2 * usize::from(BUFFERS)).unwrap_or(u32::MAX))
            .build(1024)
            .map_err(|e| io::Error::new(e.kind(), format!("io_uring: {e}")))?;
        let entries = memmap2::MmapMut::map_anon(usize::from(BUFFERS) * 16)?;
        let buffers = memmap2::MmapMut::map_anon(usize::from(BUFFERS) * BUFFER_BYTES)?;
        // No name, no iovecs, no control: only the sizes below matter to the receives.
        let mut msghdr: Box<libc::msghdr> = Box::new(sys::zeroed());
        msghdr.msg_namelen = NAME_BYTES as u32;
        msghdr.msg_controllen = CONTROL_BYTES;
        let mut r = Receiver {
            ring,
            entries,
            buffers,
            msghdr,
            tail: 0,
            rearm: Vec::with_capacity(sockets),
            per_socket: vec![0; sockets],
            touched: Vec::with_capacity(sockets),
        };
        sys::register(&r.ring, &r.entries)?;
        for bid in 0..BUFFERS {
            r.give_back(bid);
        }
        r.publish();
        Ok(r)
    }

    /// Arms socket `i`'s multishot receive (submitted with the next wait).
    fn arm(&mut self, ctx: &Context, i: usize) -> io::Result<()> {
        let fd = ctx.sockets[i].as_raw_fd();
        let entry = opcode::RecvMsgMulti::new(Fd(fd), &raw const *self.msghdr, GROUP)
            .build()
            .user_data(i as u64);
        loop {
            if sys::push(&mut self.ring, &entry) {
                return Ok(());
            }
            // The submission queue is full: hand it over first.
            self.ring.submit()?;
        }
    }

    /// Submits what is queued and waits up to `wait` for a completion; the deferred
    /// receives run here.
    fn wait(&mut self, wait: Duration) -> io::Result<()> {
        let ts = Timespec::from(wait);
        let args = SubmitArgs::new().timespec(&ts);
        match self.ring.submitter().submit_with_args(1, &args) {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Takes every completion into `sink`, hands the buffers back and arms the receives
    /// that ended: how many datagrams, and whether more are waiting (the buffers ran short,
    /// or a socket holds more than a turn took).
    fn reap(&mut self, ctx: &Context, sink: &mut Sink) -> io::Result<(usize, bool)> {
        let (read_at, wall) = (Instant::now(), SystemTime::now());
        let mut got = 0;
        let mut short = false;
        let completions: Vec<(u64, i32, u32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result(), c.flags()))
            .collect();
        for (data, res, flags) in completions {
            let i = usize::try_from(data).unwrap_or(usize::MAX);
            let Some(&local) = ctx.locals.get(i) else {
                continue;
            };
            if !cqueue::more(flags) {
                self.rearm.push(i);
            }
            // The kernel takes at most TURN datagrams of a socket per turn and leaves the
            // rest for the next: no pause then.
            let n = &mut self.per_socket[i];
            if *n == 0 {
                self.touched.push(i);
            }
            *n += 1;
            short |= *n >= TURN || cqueue::sock_nonempty(flags);
            if res < 0 {
                if let Some(bid) = cqueue::buffer_select(flags) {
                    self.give_back(bid);
                }
                if res == -libc::ENOBUFS {
                    short = true;
                } else {
                    Metrics::inc(&sink.metrics.datagrams_rejected, "receive_error", 1);
                    tracing::warn!(
                        port = local.port(),
                        error = %io::Error::from_raw_os_error(-res),
                        "receive error"
                    );
                }
                continue;
            }
            let Some(bid) = cqueue::buffer_select(flags) else {
                continue;
            };
            let len = usize::try_from(res).unwrap_or(0).min(BUFFER_BYTES);
            let start = usize::from(bid) * BUFFER_BYTES;
            let buffer = sys::buffer(&self.buffers, start, len);
            if let Ok(m) = RecvMsgOut::parse(buffer, &self.msghdr) {
                got += 1;
                if let Some(remote) = sockaddr(m.name_data()) {
                    let at = stamp(m.control_data()).map_or(read_at, |s| arrived(s, read_at, wall));
                    sink.take(
                        i,
                        local,
                        remote,
                        at,
                        m.payload_data(),
                        m.is_payload_truncated(),
                    );
                }
            }
            self.give_back(bid);
        }
        for i in self.touched.drain(..) {
            self.per_socket[i] = 0;
        }
        sink.keep(read_at, wall);
        self.publish();
        let mut later = Vec::new();
        for i in std::mem::take(&mut self.rearm) {
            if let Err(e) = self.arm(ctx, i) {
                // Tried again next round: the datagrams wait in the socket meanwhile.
                tracing::warn!(error = %e, "cannot arm a receive");
                later.push(i);
                short = true;
            }
        }
        self.rearm = later;
        Ok((got, short))
    }

    /// Puts buffer `bid` at the tail of the provided-buffer ring (published by
    /// [`Receiver::publish`]).
    fn give_back(&mut self, bid: u16) {
        let slot = usize::from(self.tail & (BUFFERS - 1));
        let addr = self.buffers.as_ptr() as u64 + (usize::from(bid) * BUFFER_BYTES) as u64;
        let e = sys::entry(&mut self.entries, slot);
        e.set_addr(addr);
        e.set_len(BUFFER_BYTES as u32);
        e.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Tells the kernel how far the handed-back buffers go.
    fn publish(&mut self) {
        sys::tail(&mut self.entries).store(self.tail, Ordering::Release);
    }
}

/// The source address of a received datagram (a `sockaddr_in` or `sockaddr_in6`).
fn sockaddr(name: &[u8]) -> Option<SocketAddr> {
    let family = i32::from(u16::from_ne_bytes(name.get(0..2)?.try_into().ok()?));
    let port = u16::from_be_bytes(name.get(2..4)?.try_into().ok()?);
    let ip = match family {
        libc::AF_INET => IpAddr::from(Ipv4Addr::from(<[u8; 4]>::try_from(name.get(4..8)?).ok()?)),
        libc::AF_INET6 => {
            IpAddr::from(Ipv6Addr::from(<[u8; 16]>::try_from(name.get(8..24)?).ok()?))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// The kernel's receive stamp (`SCM_TIMESTAMPNS`) among the control messages.
fn stamp(mut control: &[u8]) -> Option<Duration> {
    // struct cmsghdr: cmsg_len (size_t), cmsg_level (int), cmsg_type (int); then the data,
    // each message padded to 8 bytes.
    const HEADER: usize = 16;
    while control.len() >= HEADER {
        let len = usize::try_from(u64::from_ne_bytes(control[0..8].try_into().ok()?)).ok()?;
        let level = i32::from_ne_bytes(control[8..12].try_into().ok()?);
        let kind = i32::from_ne_bytes(control[12..16].try_into().ok()?);
        if len < HEADER {
            return None;
        }
        if level == libc::SOL_SOCKET && kind == libc::SCM_TIMESTAMPNS {
            let data = control.get(HEADER..HEADER + 16)?;
            let sec = i64::from_ne_bytes(data[0..8].try_into().ok()?);
            let nsec = i64::from_ne_bytes(data[8..16].try_into().ok()?);
            return Some(Duration::new(
                u64::try_from(sec).ok()?,
                u32::try_from(nsec).ok()?.min(999_999_999),
            ));
        }
        control = control.get(len.checked_next_multiple_of(8)?..)?;
    }
    None
}

/// The io_uring calls that take the program's word for the memory they name.
#[allow(unsafe_code)]
mod sys {
    use std::io;
    use std::sync::atomic::AtomicU16;

    use io_uring::IoUring;
    use io_uring::squeue::Entry;
    use io_uring::types::BufRingEntry;

    use super::{BUFFERS, GROUP};

    /// C structs for which all-zero is a valid value.
    pub(super) trait Zeroable {}
    impl Zeroable for libc::msghdr {}

    pub(super) fn zeroed<T: Zeroable>() -> T {
        // SAFETY: `Zeroable` is implemented only for C structs of integers and pointers,
        // for which all-zero is valid (null pointers, zero lengths).
        unsafe { std::mem::zeroed() }
    }

    /// Registers `entries` as the provided-buffer ring of [`GROUP`].
    pub(super) fn register(ring: &IoUring, entries: &memmap2::MmapMut) -> io::Result<()> {
        // SAFETY: `entries` is a page-aligned mapping of BUFFERS entries that lives in the
        // same `Receiver` as the ring and is dropped after it (field order), so it outlives
        // the registration.
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                entries.as_ptr() as u64,
                BUFFERS,
                GROUP,
                0,
            )
        }
    }

    /// Queues `entry`; false if the submission queue is full.
    pub(super) fn push(ring: &mut IoUring, entry: &Entry) -> bool {
        // SAFETY: the entry names the receiver's message header, boxed and owned by the
        // same `Receiver` as the ring, so it outlives every receive the ring runs.
        unsafe { ring.submission().push(entry).is_ok() }
    }

    /// Entry `slot` of the provided-buffer ring.
    pub(super) fn entry(entries: &mut memmap2::MmapMut, slot: usize) -> &mut BufRingEntry {
        assert!(slot < usize::from(BUFFERS));
        // SAFETY: the mapping holds BUFFERS entries of 16 bytes, page-aligned; `slot` is in
        // bounds; the kernel reads an entry only between the tail's publication and the
        // buffer's use, never while this thread writes it (the slot is past the tail).
        unsafe { &mut *entries.as_mut_ptr().cast::<BufRingEntry>().add(slot) }
    }

    /// The provided-buffer ring's tail (in the first entry), as an atomic.
    pub(super) fn tail(entries: &mut memmap2::MmapMut) -> &AtomicU16 {
        // SAFETY: the tail is the aligned u16 the kernel reads with acquire ordering in
        // the first entry of the mapping (valid for writes: its mutable pointer), which
        // lives as long as the returned reference.
        unsafe {
            let ptr = BufRingEntry::tail(entries.as_mut_ptr().cast::<BufRingEntry>());
            AtomicU16::from_ptr(ptr.cast_mut())
        }
    }

    /// `len` bytes of the buffers from `start`: a buffer a completion handed over.
    pub(super) fn buffer(buffers: &memmap2::MmapMut, start: usize, len: usize) -> &[u8] {
        assert!(start + len <= buffers.len());
        // SAFETY: in bounds (checked); the kernel wrote this buffer before posting its
        // completion and writes it again only after it is handed back, which happens
        // after this slice is last used.
        unsafe { std::slice::from_raw_parts(buffers.as_ptr().add(start), len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_addresses_of_both_families_are_read() {
        let mut v4 = vec![0u8; 28];
        v4[0..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        v4[2..4].copy_from_slice(&5004u16.to_be_bytes());
        v4[4..8].copy_from_slice(&[10, 0, 0, 7]);
        assert_eq!(sockaddr(&v4), Some("10.0.0.7:5004".parse().unwrap()));
        let mut v6 = vec![0u8; 28];
        v6[0..2].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
        v6[2..4].copy_from_slice(&5006u16.to_be_bytes());
        v6[23] = 1;
        assert_eq!(sockaddr(&v6), Some("[::1]:5006".parse().unwrap()));
        assert_eq!(sockaddr(&v6[..10]), None);
        assert_eq!(sockaddr(&[0u8; 28]), None);
    }

    proptest::proptest! {
        #[test]
        fn any_name_and_control_bytes_are_read_without_panic(
            b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256),
        ) {
            let _ = sockaddr(&b);
            let _ = stamp(&b);
        }
    }

    #[test]
    fn the_kernel_stamp_is_found_among_control_messages() {
        let mut c = Vec::new();
        // Another message first (SO_RXQ_OVFL, 4 bytes of data, padded).
        c.extend_from_slice(&20u64.to_ne_bytes());
        c.extend_from_slice(&libc::SOL_SOCKET.to_ne_bytes());
        c.extend_from_slice(&libc::SO_RXQ_OVFL.to_ne_bytes());
        c.extend_from_slice(&[0; 8]);
        c.extend_from_slice(&32u64.to_ne_bytes());
        c.extend_from_slice(&libc::SOL_SOCKET.to_ne_bytes());
        c.extend_from_slice(&libc::SCM_TIMESTAMPNS.to_ne_bytes());
        c.extend_from_slice(&1_700_000_000i64.to_ne_bytes());
        c.extend_from_slice(&42i64.to_ne_bytes());
        assert_eq!(stamp(&c), Some(Duration::new(1_700_000_000, 42)));
        assert_eq!(stamp(&c[..30]), None);
        assert_eq!(stamp(&[]), None);
        let mut looping = c.clone();
        looping[0..8].copy_from_slice(&0u64.to_ne_bytes());
        assert_eq!(stamp(&looping), None, "a zero length does not loop");
    }
}
