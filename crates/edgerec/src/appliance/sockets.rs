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

/// Makes every socket of `config`, taking those in `passed` that fit; then hands the ones
/// bound here (and those of a role whose stored sockets were partly dropped) to the
/// descriptor store.
pub fn open(config: &Config, passed: Passed) -> Result<Sockets, RunError> {
    raise_file_limit(config)?;
    let mut b = Binder {
        passed,
        fresh: BTreeSet::new(),
        adopted: 0,
    };
    let (first, last) = config.ports;
    let mut ingest = Vec::new();
    for port in first..=last {
        let addr = SocketAddr::new(config.ingest.bind, port);
        ingest.push(b.udp(Role::Rtp, addr, "ingest")?);
    }
    let siprec_from = ingest.len();
    let sip = match &config.siprec {
        None => None,
        Some(s) => {
            for port in s.media_ports.0..=s.media_ports.1 {
                let addr = SocketAddr::new(s.listen.ip(), port);
                ingest.push(b.udp(Role::Media, addr, "siprec.media_ports")?);
            }
            let udp = b.udp(Role::SipUdp, s.listen, "siprec.listen")?;
            let port = udp.local_addr().map_err(RunError::io("siprec.listen"))?;
            let tcp = b.tcp(Role::SipTcp, port, "siprec.listen")?;
            let tls = match &s.tls {
                Some((addr, _, _)) => Some(b.tcp(Role::SipTls, *addr, "siprec.tls_listen")?),
                None => None,
            };
            Some(SipSockets { udp, tcp, tls })
        }
    };
    let metrics = b.tcp(Role::Metrics, config.metrics.listen, "metrics.listen")?;
    let control = match &config.control {
        Some(c) => Some(b.tcp(Role::Control, c.listen, "control.listen")?),
        None => None,
    };
    let Binder {
        passed,
        fresh,
        adopted,
    } = b;
    let (clear, dropped) = passed.close_rest();
    if !dropped.is_empty() {
        tracing::info!(
            ?dropped,
            "sockets from the service manager that the config no longer names: closed"
        );
    }
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
    match service_manager::store(&to_store, &clear) {
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

/// Takes passed sockets or binds, noting which it bound.
struct Binder {
    passed: Passed,
    fresh: BTreeSet<RawFd>,
    adopted: usize,
}

impl Binder {
    fn udp(&mut self, role: Role, addr: SocketAddr, key: &str) -> Result<UdpSocket, RunError> {
        let s = match self.passed.take(role, addr) {
            Some(fd) => {
                self.adopted += 1;
                UdpSocket::from(fd)
            }
            None => {
                let s = UdpSocket::bind(addr)
                    .map_err(RunError::io(format!("{key}: cannot bind udp {addr}")))?;
                self.fresh.insert(s.as_raw_fd());
                s
            }
        };
        s.set_nonblocking(true)
            .map_err(RunError::io(format!("{key}: udp {addr}")))?;
        Ok(s)
    }

    fn tcp(&mut self, role: Role, addr: SocketAddr, key: &str) -> Result<TcpListener, RunError> {
        let s = match self.passed.take(role, addr) {
            Some(fd) => {
                self.adopted += 1;
                TcpListener::from(fd)
            }
            None => {
                let s = TcpListener::bind(addr)
                    .map_err(RunError::io(format!("{key}: cannot listen on {addr}")))?;
                self.fresh.insert(s.as_raw_fd());
                s
            }
        };
        s.set_nonblocking(true)
            .map_err(RunError::io(format!("{key}: tcp {addr}")))?;
        Ok(s)
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
    let need = count + media_count + 256;
    let got =
        rlimit::increase_nofile_limit(need).map_err(RunError::io("raising the file limit"))?;
    if got < need {
        return Err(RunError::Start(format!(
            "ingest.ports: {count} ports (and {media_count} SIPREC media ports) need {need} open \
             files, but the limit is {got}: raise LimitNOFILE (systemd) or ulimit -n, or use \
             fewer ports"
        )));
    }
    Ok(())
}
