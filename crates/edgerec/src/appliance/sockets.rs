//! Every socket the appliance serves on, made once at start-up before anything else: taken
//! from those the service manager passed where one fits ([`service_manager::pick`]), bound
//! where none does, and the ones bound here handed to the service manager's descriptor
//! store, so that the next process (after a crash, `kill -9`, a restart or an upgrade) gets
//! them back with every datagram the kernel queued meanwhile.
//!
//! Invariants: one socket per ingest port, per SIPREC media port, per listener; all
//! non-blocking; the file limit is raised to cover them first (or the start fails naming
//! what is needed); a passed socket no role takes is closed and its name cleared from the
//! store.

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::time::{Duration, Instant};

use crate::appliance::config::Config;
use crate::appliance::run::RunError;
use crate::appliance::service_manager::{self, Passed, Role};

/// The SIPREC server's sockets.
pub struct SipSockets {
    /// `siprec.listen`, UDP.
    pub udp: UdpSocket,
    /// `siprec.listen`, TCP (on UDP's port when the config says port 0).
    pub tcp: TcpListener,
    /// `siprec.tls_listen`.
    pub tls: Option<TcpListener>,
}

/// The appliance's sockets.
pub struct Sockets {
    /// One per ingest port, then one per SIPREC media port.
    pub ingest: Vec<UdpSocket>,
    /// Where the SIPREC media ports begin in `ingest`.
    pub siprec_from: usize,
    /// `[siprec]`'s listeners.
    pub sip: Option<SipSockets>,
    /// `metrics.listen`.
    pub metrics: TcpListener,
    /// `control.listen`.
    pub control: Option<TcpListener>,
    /// How many the service manager passed and were taken.
    pub adopted: usize,
}

/// Makes every socket of `config`, in three steps: those in `passed` that fit are taken;
/// the passed ones no role took are closed and their names cleared from the store (so a
/// socket of the same port on another address can be bound: systemd's copy would hold the
/// port otherwise); the rest are bound. Then the ones bound here (and those in use of a
/// name that was cleared) go to the descriptor store.
pub fn open(config: &Config, passed: Passed) -> Result<Sockets, RunError> {
    raise_file_limit(config)?;
    let mut b = Binder {
        passed,
        fresh: BTreeSet::new(),
        adopted: 0,
    };
    // 1. Take what was passed.
    let (first, last) = config.ports;
    let mut ingest: Vec<Slot<UdpSocket>> = (first..=last)
        .map(|port| b.take(Role::Rtp, SocketAddr::new(config.ingest.bind, port)))
        .collect();
    let siprec_from = ingest.len();
    let mut sip = None;
    if let Some(s) = &config.siprec {
        for port in s.media_ports.0..=s.media_ports.1 {
            ingest.push(b.take(Role::Media, SocketAddr::new(s.listen.ip(), port)));
        }
        let udp: Slot<UdpSocket> = b.take(Role::SipUdp, s.listen);
        // TCP shares UDP's port: known now if UDP was passed or the port is configured.
        let tcp = match &udp {
            Slot::Have(u) => {
                let at = u.local_addr().map_err(RunError::io("siprec.listen"))?;
                b.take(Role::SipTcp, at)
            }
            Slot::Need(_) if s.listen.port() != 0 => b.take(Role::SipTcp, s.listen),
            Slot::Need(_) => Slot::Need(s.listen),
        };
        let tls = s
            .tls
            .as_ref()
            .map(|(addr, _, _)| b.take(Role::SipTls, *addr));
        sip = Some((udp, tcp, tls));
    }
    let metrics = b.take(Role::Metrics, config.metrics.listen);
    let control = config
        .control
        .as_ref()
        .map(|c| b.take(Role::Control, c.listen));
    // 2. Release what no role took.
    let (clear, dropped) = b.release();
    if !dropped.is_empty() {
        tracing::info!(
            ?dropped,
            "sockets from the service manager that the config no longer names: closed"
        );
    }
    // 3. Bind the rest.
    let ingest = ingest
        .into_iter()
        .map(|slot| b.ready(slot, "ingest"))
        .collect::<Result<Vec<_>, _>>()?;
    let sip = match sip {
        None => None,
        Some((udp, tcp, tls)) => {
            let udp = b.ready(udp, "siprec.listen")?;
            let tcp = match tcp {
                // Port 0: the port the system gave UDP.
                Slot::Need(at) if at.port() == 0 => {
                    let port = udp.local_addr().map_err(RunError::io("siprec.listen"))?;
                    b.ready(Slot::Need(port), "siprec.listen")?
                }
                slot => b.ready(slot, "siprec.listen")?,
            };
            let tls = tls.map(|t| b.ready(t, "siprec.tls_listen")).transpose()?;
            Some(SipSockets { udp, tcp, tls })
        }
    };
    let metrics = b.ready(metrics, "metrics.listen")?;
    let control = control.map(|c| b.ready(c, "control.listen")).transpose()?;
    let Binder { fresh, adopted, .. } = b;
    let sockets = Sockets {
        ingest,
        siprec_from,
        sip,
        metrics,
        control,
        adopted,
    };
    let to_store: Vec<(Role, BorrowedFd<'_>)> = sockets
        .all()
        .into_iter()
        .filter(|(role, fd)| fresh.contains(&fd.as_raw_fd()) || clear.contains(role.name()))
        .collect();
    match service_manager::store(&to_store) {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            sockets = n,
            "sockets handed to the service manager's store: they outlive this process"
        ),
        Err(e) => tracing::warn!(
            error = %e,
            "cannot hand the sockets to the service manager: a restart will lose packets"
        ),
    }
    Ok(sockets)
}

/// A socket taken from those passed, or the address one must be bound to.
enum Slot<S> {
    Have(S),
    Need(SocketAddr),
}

impl Sockets {
    /// Every socket with its role.
    fn all(&self) -> Vec<(Role, BorrowedFd<'_>)> {
        let mut all = Vec::with_capacity(self.ingest.len() + 5);
        for (i, s) in self.ingest.iter().enumerate() {
            let role = if i < self.siprec_from {
                Role::Rtp
            } else {
                Role::Media
            };
            all.push((role, s.as_fd()));
        }
        if let Some(sip) = &self.sip {
            all.push((Role::SipUdp, sip.udp.as_fd()));
            all.push((Role::SipTcp, sip.tcp.as_fd()));
            if let Some(t) = &sip.tls {
                all.push((Role::SipTls, t.as_fd()));
            }
        }
        all.push((Role::Metrics, self.metrics.as_fd()));
        if let Some(c) = &self.control {
            all.push((Role::Control, c.as_fd()));
        }
        all
    }
}

/// Takes passed sockets, releases the rest, binds, noting which it bound.
struct Binder {
    passed: Passed,
    fresh: BTreeSet<RawFd>,
    adopted: usize,
}

/// How long a bind waits for a port in use to be let go of.
const RELEASE_WAIT: Duration = Duration::from_secs(3);

impl Binder {
    /// The passed socket for `role` on `addr`, or the address to bind.
    fn take<S: Socket>(&mut self, role: Role, addr: SocketAddr) -> Slot<S> {
        match self.passed.take(role, addr) {
            Some(fd) => {
                self.adopted += 1;
                Slot::Have(S::from(fd))
            }
            None => Slot::Need(addr),
        }
    }

    /// Closes the passed sockets no role took and clears their names from the store;
    /// returns the names and their addresses.
    fn release(&mut self) -> (BTreeSet<String>, Vec<SocketAddr>) {
        let (names, addrs) = std::mem::take(&mut self.passed).close_rest();
        if let Err(e) = service_manager::clear(&names) {
            tracing::warn!(error = %e, "cannot clear sockets from the service manager's store");
        }
        (names, addrs)
    }

    /// The socket of `slot`, bound if it was not passed, non-blocking. A port in use is
    /// tried again for a while: after a release the service manager closes its copy of a
    /// released socket when it reads the message, and after a `kill -9` of an io_uring
    /// process (`[ingest] mode = "io_uring"`) the kernel lets go of its sockets only when
    /// the ring's teardown, which runs apart from the process's exit, is done.
    fn ready<S: Socket>(&mut self, slot: Slot<S>, key: &str) -> Result<S, RunError> {
        let s = match slot {
            Slot::Have(s) => s,
            Slot::Need(addr) => {
                let until = Instant::now() + RELEASE_WAIT;
                let s = loop {
                    match S::bind(addr) {
                        Err(e)
                            if e.kind() == std::io::ErrorKind::AddrInUse
                                && Instant::now() < until =>
                        {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        r => {
                            break r.map_err(RunError::io(format!(
                                "{key}: cannot bind {} {addr}",
                                S::PROTO
                            )))?;
                        }
                    }
                };
                self.fresh.insert(s.as_raw_fd());
                s
            }
        };
        s.set_nonblocking(true)
            .map_err(RunError::io(format!("{key}: {}", S::PROTO)))?;
        Ok(s)
    }
}

/// What the binder needs of a UDP socket and a TCP listener alike.
trait Socket: From<std::os::fd::OwnedFd> + AsRawFd + Sized {
    /// `udp` or `tcp`, for messages.
    const PROTO: &'static str;
    fn bind(addr: SocketAddr) -> std::io::Result<Self>;
    fn set_nonblocking(&self, on: bool) -> std::io::Result<()>;
}

impl Socket for UdpSocket {
    const PROTO: &'static str = "udp";
    fn bind(addr: SocketAddr) -> std::io::Result<Self> {
        UdpSocket::bind(addr)
    }
    fn set_nonblocking(&self, on: bool) -> std::io::Result<()> {
        UdpSocket::set_nonblocking(self, on)
    }
}

impl Socket for TcpListener {
    const PROTO: &'static str = "tcp";
    fn bind(addr: SocketAddr) -> std::io::Result<Self> {
        TcpListener::bind(addr)
    }
    fn set_nonblocking(&self, on: bool) -> std::io::Result<()> {
        TcpListener::set_nonblocking(self, on)
    }
}

/// The file limit raised to cover every port and listener, or the start fails naming what
/// is needed.
fn raise_file_limit(config: &Config) -> Result<(), RunError> {
    let (first, last) = config.ports;
    let count = u64::from(last - first) + 1;
    let media_count = config
        .siprec
        .as_ref()
        .map_or(0, |s| u64::from(s.media_ports.1 - s.media_ports.0) + 1);
    // A socket per port and the package file of the recording on it (a SIPREC session's
    // two media ports make one recording), and room for the rest.
    let need = 2 * count + media_count + media_count / 2 + 256;
    let got =
        rlimit::increase_nofile_limit(need).map_err(RunError::io("raising the file limit"))?;
    if got < need {
        return Err(RunError::Start(format!(
            "ingest.ports: {count} ports (and {media_count} SIPREC media ports) need {need} open \
             files (a socket each, and a package file for each recording on them), but the \
             limit is {got}: raise LimitNOFILE (systemd) or ulimit -n, or use fewer ports"
        )));
    }
    Ok(())
}
