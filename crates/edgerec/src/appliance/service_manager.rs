//! The service manager's protocol (systemd's, or a harness that speaks it): the sockets it
//! passes in (`LISTEN_FDS`, from descriptor 3), the sockets the appliance hands to its
//! descriptor store (`FDSTORE=1`), and the state it is told (`READY=1`, `STOPPING=1`,
//! `STATUS=`, `WATCHDOG=1`).
//!
//! This is how the appliance's sockets outlive its process: every socket it binds goes into
//! the store, the service manager holds it while the process is gone (a crash, `kill -9`, a
//! restart, an upgrade) and the kernel keeps queueing datagrams into it; the next process is
//! given it back and reads what waited. A passed socket is matched to its role by its type
//! and bound local address ([`pick`]), so `LISTEN_FDNAMES` is optional; the names (one per
//! role, [`Role::name`]) only tell apart two listeners on port 0.
//!
//! Invariants: each passed descriptor is owned once — taken by one role, or closed, and
//! then its role's name is cleared from the store and the sockets in use stored again (so
//! a port dropped from the config does not stay held forever); the watchdog is pinged only
//! while every loop it watches has beaten since the last ping ([`Watchdog`]).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::sys::socket::{SockType, SockaddrStorage, getsockname, getsockopt, sockopt};
use sd_notify::NotifyState;

/// At most this many descriptors go in one notification (the kernel's `SCM_MAX_FD` is 253).
pub const FDS_PER_MESSAGE: usize = 253;
/// The store name of the carried recordings' file.
pub const CARRY: &str = "carry";
/// The store name of the datagram journal ([`crate::appliance::journal`]).
pub const JOURNAL: &str = "journal";
/// The store name of the ingest's packet ring (`[ingest] mode = "ring"`): it goes on taking
/// datagrams while no process runs.
pub const RING: &str = "ring";

/// Why the passed descriptors could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum ServiceManagerError {
    /// `LISTEN_FDS` or `LISTEN_PID` is not a number.
    #[error("LISTEN_FDS / LISTEN_PID from the service manager: {0}")]
    Env(std::io::Error),
}

/// A socket's transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    /// A UDP socket.
    Udp,
    /// A TCP listener.
    Tcp,
}

/// What a socket is for; its name in the descriptor store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// An `ingest.ports` port.
    Rtp,
    /// A `siprec.media_ports` port.
    Media,
    /// `siprec.listen`, UDP.
    SipUdp,
    /// `siprec.listen`, TCP.
    SipTcp,
    /// `siprec.tls_listen`.
    SipTls,
    /// `metrics.listen`.
    Metrics,
    /// `control.listen`.
    Control,
}

impl Role {
    /// The `FDNAME` (letters, digits and `-` only, as the protocol wants).
    pub fn name(self) -> &'static str {
        match self {
            Role::Rtp => "rtp",
            Role::Media => "media",
            Role::SipUdp => "sip-udp",
            Role::SipTcp => "sip-tcp",
            Role::SipTls => "sip-tls",
            Role::Metrics => "metrics",
            Role::Control => "control",
        }
    }

    /// UDP or TCP.
    pub fn proto(self) -> Proto {
        match self {
            Role::Rtp | Role::Media | Role::SipUdp => Proto::Udp,
            Role::SipTcp | Role::SipTls | Role::Metrics | Role::Control => Proto::Tcp,
        }
    }
}

/// What is known of a passed socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PassedInfo {
    /// UDP or TCP.
    pub proto: Proto,
    /// Its bound local address.
    pub local: SocketAddr,
    /// Its `LISTEN_FDNAMES` entry (empty if none).
    pub name: String,
}

/// Which passed socket serves `role` on `want`: the one of the same transport bound to
/// exactly that address; for a port-0 address (any port), one of that role's name on the
/// same IP. `None`: none fits, the caller binds.
pub fn pick(have: &[PassedInfo], role: Role, want: SocketAddr) -> Option<usize> {
    let fits = |p: &PassedInfo| p.proto == role.proto();
    have.iter()
        .position(|p| fits(p) && p.local == want)
        .or_else(|| {
            (want.port() == 0).then(|| {
                have.iter()
                    .position(|p| fits(p) && p.local.ip() == want.ip() && p.name == role.name())
            })?
        })
}

/// The sockets the service manager passed, not yet taken, and the carried recordings'
/// file ([`crate::appliance::carry`]).
#[derive(Default)]
pub struct Passed {
    /// The descriptors and what is known of each, side by side.
    fds: Vec<OwnedFd>,
    infos: Vec<PassedInfo>,
    carry: Option<OwnedFd>,
    journal: Option<OwnedFd>,
    ring: Option<OwnedFd>,
}

impl Passed {
    /// The sockets passed to this process (`LISTEN_PID` is ours), each with its type and
    /// address; a descriptor that is no UDP or TCP socket on IP is closed with a warning.
    /// None (and no error) when nothing was passed.
    pub fn from_env() -> Result<Passed, ServiceManagerError> {
        let fds: Vec<(RawFd, String)> = sd_notify::listen_fds_with_names()
            .map_err(ServiceManagerError::Env)?
            .collect();
        let mut passed = Passed::default();
        for (raw, name) in fds {
            let fd = own_passed(raw);
            if name == CARRY {
                passed.carry = Some(fd);
                continue;
            }
            if name == JOURNAL {
                passed.journal = Some(fd);
                continue;
            }
            if name == RING {
                passed.ring = Some(fd);
                continue;
            }
            match describe(fd.as_fd(), name) {
                Some(info) => {
                    passed.fds.push(fd);
                    passed.infos.push(info);
                }
                None => tracing::warn!(
                    fd = raw,
                    "a descriptor from the service manager is no UDP or TCP socket: closed"
                ),
            }
        }
        Ok(passed)
    }

    /// The carried recordings' file, if it was passed.
    pub fn take_carry(&mut self) -> Option<OwnedFd> {
        self.carry.take()
    }

    /// The datagram journal, if it was passed.
    pub fn take_journal(&mut self) -> Option<OwnedFd> {
        self.journal.take()
    }

    /// The ingest's packet ring, if it was passed.
    pub fn take_ring(&mut self) -> Option<OwnedFd> {
        self.ring.take()
    }

    /// The passed socket for `role` on `want`, if there is one ([`pick`]).
    pub fn take(&mut self, role: Role, want: SocketAddr) -> Option<OwnedFd> {
        let i = pick(&self.infos, role, want)?;
        self.infos.remove(i);
        Some(self.fds.remove(i))
    }

    /// Closes what no role took; returns their store names (to be cleared from the store)
    /// and their addresses (for the log).
    pub fn close_rest(self) -> (BTreeSet<String>, Vec<SocketAddr>) {
        let mut names = BTreeSet::new();
        let mut addrs = Vec::new();
        drop(self.fds);
        for info in self.infos {
            if !info.name.is_empty() {
                names.insert(info.name);
            }
            addrs.push(info.local);
        }
        (names, addrs)
    }
}

/// Takes ownership of a descriptor the service manager passed.
#[allow(unsafe_code)]
fn own_passed(raw: RawFd) -> OwnedFd {
    // SAFETY: `raw` comes from `listen_fds_with_names`, which yields each descriptor the
    // service manager passed (3 .. 3 + LISTEN_FDS, checked to be meant for this process by
    // LISTEN_PID) exactly once; nothing else in the process refers to them, and this is the
    // only caller, run once at start-up.
    unsafe { OwnedFd::from_raw_fd(raw) }
}

/// A passed descriptor's transport and address, if it is a UDP socket or TCP socket on IP.
fn describe(fd: BorrowedFd<'_>, name: String) -> Option<PassedInfo> {
    let proto = match getsockopt(&fd, sockopt::SockType).ok()? {
        SockType::Datagram => Proto::Udp,
        SockType::Stream => Proto::Tcp,
        _ => return None,
    };
    let addr: SockaddrStorage = getsockname(fd.as_raw_fd()).ok()?;
    let local = if let Some(v4) = addr.as_sockaddr_in() {
        SocketAddr::from(std::net::SocketAddrV4::from(*v4))
    } else {
        SocketAddr::from(std::net::SocketAddrV6::from(*addr.as_sockaddr_in6()?))
    };
    Some(PassedInfo { proto, local, name })
}

/// Clears `names` from the service manager's descriptor store (`FDSTOREREMOVE=1`): the
/// sockets stored under them that this process no longer uses close there too. Nothing
/// without `NOTIFY_SOCKET`.
pub fn clear(names: &BTreeSet<String>) -> std::io::Result<()> {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return Ok(());
    }
    for name in names {
        sd_notify::notify(&[NotifyState::FdStoreRemove, NotifyState::FdName(name)])?;
    }
    Ok(())
}

/// Hands sockets to the service manager's descriptor store, by role, in messages of at most
/// [`FDS_PER_MESSAGE`]. Nothing is sent without `NOTIFY_SOCKET`. Returns how many went.
pub fn store(sockets: &[(Role, BorrowedFd<'_>)]) -> std::io::Result<usize> {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return Ok(0);
    }
    let mut sent = 0;
    for role in [
        Role::Rtp,
        Role::Media,
        Role::SipUdp,
        Role::SipTcp,
        Role::SipTls,
        Role::Metrics,
        Role::Control,
    ] {
        let fds: Vec<BorrowedFd<'_>> = sockets
            .iter()
            .filter(|(r, _)| *r == role)
            .map(|(_, fd)| *fd)
            .collect();
        for batch in fds.chunks(FDS_PER_MESSAGE) {
            sd_notify::notify_with_fds(
                &[NotifyState::FdStore, NotifyState::FdName(role.name())],
                batch,
            )?;
            sent += batch.len();
        }
    }
    Ok(sent)
}

/// Hands one file (the carried recordings') to the descriptor store under `name`; nothing
/// without `NOTIFY_SOCKET`.
pub fn store_file(name: &str, fd: BorrowedFd<'_>) -> std::io::Result<()> {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return Ok(());
    }
    sd_notify::notify_with_fds(&[NotifyState::FdStore, NotifyState::FdName(name)], &[fd])
}

/// Tells the service manager something; a failure is logged, never fatal (the appliance
/// records whether or not anyone listens).
pub fn notify(state: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!(error = %e, "cannot notify the service manager");
    }
}

/// A loop's heartbeat: the loop beats once per round; the watchdog checks it moved.
#[derive(Debug)]
pub struct Beat {
    name: &'static str,
    count: AtomicU64,
    /// Test switch (`EDGEREC_TEST_STALL`, feature `test-hooks`): from this moment the loop
    /// hangs at its next beat, as a thread stuck in a call would.
    stall_at: Option<Instant>,
}

impl Beat {
    /// A heartbeat for the loop `name`.
    pub fn new(name: &'static str) -> Arc<Beat> {
        Arc::new(Beat {
            name,
            count: AtomicU64::new(0),
            stall_at: stall_switch(name),
        })
    }

    /// One round of the loop.
    pub fn beat(&self) {
        if self.stall_at.is_some_and(|at| Instant::now() >= at) {
            tracing::error!(thread = self.name, "stalled by EDGEREC_TEST_STALL");
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

/// `EDGEREC_TEST_STALL=LOOP:MS`: the loop `LOOP` hangs `MS` milliseconds after start.
#[cfg(feature = "test-hooks")]
fn stall_switch(name: &str) -> Option<Instant> {
    let v = std::env::var("EDGEREC_TEST_STALL").ok()?;
    let (which, ms) = v.split_once(':')?;
    let ms: u64 = ms.parse().ok()?;
    (which == name).then(|| Instant::now() + Duration::from_millis(ms))
}

#[cfg(not(feature = "test-hooks"))]
fn stall_switch(_: &str) -> Option<Instant> {
    None
}

/// A loop that has not beaten for this long is taken as hung (the loops watched beat at
/// least four times in it: ingest every 50 ms, the recorder every 250 ms when idle).
pub const STALE: Duration = Duration::from_secs(1);

/// Decides each watchdog ping, on the caller's clock: only if every loop beat within
/// [`STALE`].
pub struct Watchdog {
    /// Each loop, the count last seen and when it last changed.
    beats: Vec<(Arc<Beat>, u64, Instant)>,
}

impl Watchdog {
    /// Watches `beats` from `now`.
    pub fn new(beats: Vec<Arc<Beat>>, now: Instant) -> Watchdog {
        Watchdog {
            beats: beats.into_iter().map(|b| (b, 0, now)).collect(),
        }
    }

    /// `Ok` (ping) if every loop beat within [`STALE`] before `now`; otherwise the first
    /// that did not.
    pub fn check(&mut self, now: Instant) -> Result<(), &'static str> {
        let mut stalled = None;
        for (beat, seen, changed) in &mut self.beats {
            let count = beat.count();
            if count != *seen {
                (*seen, *changed) = (count, now);
            } else if now.saturating_duration_since(*changed) > STALE {
                stalled.get_or_insert(beat.name);
            }
        }
        stalled.map_or(Ok(()), Err)
    }
}

/// The watchdog period the service manager asks for (`WATCHDOG_USEC`), if any.
pub fn watchdog_period() -> Option<Duration> {
    sd_notify::watchdog_enabled()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(proto: Proto, local: &str, name: &str) -> PassedInfo {
        PassedInfo {
            proto,
            local: local.parse().unwrap(),
            name: name.into(),
        }
    }

    #[test]
    fn a_passed_socket_is_matched_by_type_and_address_not_by_name() {
        let have = [
            info(Proto::Tcp, "127.0.0.1:9464", ""),
            info(Proto::Udp, "0.0.0.0:40000", "whatever"),
            info(Proto::Udp, "127.0.0.1:5060", ""),
            info(Proto::Tcp, "127.0.0.1:5060", ""),
        ];
        let at = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(pick(&have, Role::Rtp, at("0.0.0.0:40000")), Some(1));
        assert_eq!(pick(&have, Role::Rtp, at("0.0.0.0:40001")), None);
        // Same address, other transport: not the same socket.
        assert_eq!(pick(&have, Role::SipUdp, at("127.0.0.1:5060")), Some(2));
        assert_eq!(pick(&have, Role::SipTcp, at("127.0.0.1:5060")), Some(3));
        assert_eq!(pick(&have, Role::Metrics, at("127.0.0.1:9464")), Some(0));
        // A wildcard socket does not serve a config naming one address, nor the reverse.
        assert_eq!(pick(&have, Role::Rtp, at("127.0.0.1:40000")), None);
        assert_eq!(pick(&have, Role::Metrics, at("0.0.0.0:9464")), None);
    }

    #[test]
    fn a_port_0_listener_is_told_apart_by_its_store_name() {
        let have = [
            info(Proto::Tcp, "127.0.0.1:41001", "control"),
            info(Proto::Tcp, "127.0.0.1:41000", "metrics"),
            info(Proto::Tcp, "127.0.0.2:41002", "metrics"),
        ];
        let any = "127.0.0.1:0".parse().unwrap();
        assert_eq!(pick(&have, Role::Metrics, any), Some(1));
        assert_eq!(pick(&have, Role::Control, any), Some(0));
        assert_eq!(pick(&have, Role::SipTls, any), None);
    }

    #[test]
    fn passed_sockets_are_taken_once_and_the_rest_closed_with_their_names() {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (u, t) = (udp.local_addr().unwrap(), tcp.local_addr().unwrap());
        let mut p = Passed::default();
        for (fd, name) in [(OwnedFd::from(udp), "rtp"), (OwnedFd::from(tcp), "metrics")] {
            p.infos.push(describe(fd.as_fd(), name.into()).unwrap());
            p.fds.push(fd);
        }
        assert_eq!(p.infos[0].local, u);
        assert_eq!(p.infos[1].proto, Proto::Tcp);
        let got = p.take(Role::Rtp, u).unwrap();
        assert_eq!(
            std::net::UdpSocket::from(got).local_addr().unwrap(),
            u,
            "the same socket"
        );
        assert!(p.take(Role::Rtp, u).is_none(), "taken once");
        let (names, addrs) = p.close_rest();
        assert_eq!(names.into_iter().collect::<Vec<_>>(), ["metrics"]);
        assert_eq!(addrs, [t]);
        // Closed: the port is free again.
        std::net::TcpListener::bind(t).unwrap();
    }

    #[test]
    fn the_watchdog_pings_only_while_every_loop_beats() {
        let (ingest, recorder) = (Beat::new("ingest"), Beat::new("recorder"));
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut w = Watchdog::new(vec![Arc::clone(&ingest), Arc::clone(&recorder)], t0);
        assert_eq!(w.check(at(500)), Ok(()), "just started");
        assert_eq!(
            w.check(at(1001)),
            Err("ingest"),
            "nothing beat for a second"
        );
        ingest.beat();
        recorder.beat();
        assert_eq!(w.check(at(1100)), Ok(()));
        // The recorder idles between beats: not stale yet.
        ingest.beat();
        assert_eq!(w.check(at(1600)), Ok(()));
        ingest.beat();
        assert_eq!(w.check(at(2100)), Ok(()), "exactly a second");
        ingest.beat();
        assert_eq!(w.check(at(2101)), Err("recorder"), "the recorder hung");
        ingest.beat();
        assert_eq!(w.check(at(5000)), Err("recorder"), "and stays hung");
        recorder.beat();
        ingest.beat();
        assert_eq!(w.check(at(5001)), Ok(()), "both beat again");
    }
}
