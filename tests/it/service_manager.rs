//! The service manager's protocol, end to end: a harness plays systemd (as these machines
//! do not run it as PID 1). It holds the sockets the appliance hands to its descriptor
//! store (`FDSTORE=1` over `SCM_RIGHTS` on its own notify socket), starts `edgerec run`
//! with them (`LISTEN_FDS` from descriptor 3, `LISTEN_PID`), and starts it again after
//! `kill -9`, as `Restart=always` does; it reads `READY=1`, `STATUS=`, `WATCHDOG=1` and
//! `STOPPING=1`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{IoSliceMut, Write};
use std::net::UdpSocket;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use command_fds::{CommandFdExt, FdMapping};
use erec::entries::{Entry, entries};
use erec::reader::{PackageReader, ReadMode};
use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};

use crate::appliance::{files_with_ext, free_ports, rtp};
use crate::common::*;

/// What the appliance told the manager in one message.
#[derive(Debug, Default)]
struct Told {
    lines: Vec<String>,
    fds: Vec<OwnedFd>,
}

impl Told {
    fn has(&self, line: &str) -> bool {
        self.lines.iter().any(|l| l == line)
    }

    fn value(&self, key: &str) -> Option<&str> {
        self.lines
            .iter()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
    }
}

/// The harness: a service manager with a descriptor store.
struct Manager {
    dir: tempfile::TempDir,
    notify: UnixDatagram,
    /// The descriptor store, by name, in the order stored.
    store: Vec<(String, OwnedFd)>,
    child: Option<Child>,
    log: mpsc::Receiver<String>,
    /// Every message since the child started.
    told: Vec<Told>,
    /// Whether it keeps what is stored (a service manager without a descriptor store: no).
    hold: bool,
    /// The binary it starts.
    binary: PathBuf,
}

impl Manager {
    /// Four ingest ports.
    fn new() -> Manager {
        Self::with_ports(free_ports(), 4)
    }

    /// `count` ingest ports from `base`.
    fn with_ports(base: u16, count: u16) -> Manager {
        Self::with_ports_and(base, count, "")
    }

    /// `count` ingest ports from `base`, and `extra` config.
    fn with_ports_and(base: u16, count: u16, extra: &str) -> Manager {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("edgerec.toml"),
            format!(
                r#"
[recorder]
spool_dir = "spool"
flush_interval_ms = 200
idle_timeout_ms = 10000
[ingest]
bind = "127.0.0.1"
ports = "{base}-{}"
allow = ["127.0.0.0/8"]
{mode}
[keys]
public_key = "{}"
[store]
path = "store"
[upload]
retry_initial_ms = 100
retry_max_ms = 1000
[metrics]
listen = "127.0.0.1:0"
{extra}"#,
                base + count - 1,
                key_path("test-kek.pub.pem").display(),
                mode = ingest_mode_line(),
            ),
        )
        .unwrap();
        let notify = UnixDatagram::bind(dir.path().join("notify.sock")).unwrap();
        notify
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        Manager {
            dir,
            notify,
            store: Vec::new(),
            child: None,
            log: mpsc::channel().1,
            told: Vec::new(),
            hold: true,
            binary: PathBuf::from(env!("CARGO_BIN_EXE_edgerec")),
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// Starts `edgerec run` with the stored descriptors from 3 on, as systemd does, and
    /// `env`; returns once it said `READY=1`.
    fn start(&mut self, env: &[(&str, &str)]) {
        self.start_holding(true, env);
    }

    /// [`Manager::start`]; without `hold`, no descriptor store (the process binds its own
    /// sockets, and they close with it).
    fn start_holding(&mut self, hold: bool, env: &[(&str, &str)]) {
        self.hold = hold;
        if !hold {
            self.store.clear();
        }
        let mut cmd = Command::new("sh");
        // LISTEN_PID (and WATCHDOG_PID) name the process itself: the shell's pid, which
        // `exec` keeps.
        cmd.args([
            "-c",
            "export LISTEN_PID=$$ WATCHDOG_PID=$$; exec \"$0\" \"$@\"",
            self.binary.to_str().unwrap(),
            "run",
            "--config",
            "edgerec.toml",
        ])
        .current_dir(self.dir.path())
        .env("NOTIFY_SOCKET", self.path("notify.sock"))
        .env("EDGEREC_LOG", "info")
        .stderr(Stdio::piped());
        if !self.store.is_empty() {
            let names: Vec<&str> = self.store.iter().map(|(n, _)| n.as_str()).collect();
            cmd.env("LISTEN_FDS", self.store.len().to_string())
                .env("LISTEN_FDNAMES", names.join(":"));
            let mappings = self
                .store
                .iter()
                .enumerate()
                .map(|(i, (_, fd))| FdMapping {
                    parent_fd: fd.try_clone().unwrap(),
                    child_fd: 3 + RawFd::try_from(i).unwrap(),
                })
                .collect();
            cmd.fd_mappings(mappings).unwrap();
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        // The command holds copies of the descriptors it passed: gone with it, so the
        // store's are the only ones left here.
        drop(cmd);
        self.log = log_lines(child.stderr.take().unwrap());
        self.child = Some(child);
        self.told.clear();
        self.pump_until("READY=1", |t| t.has("READY=1"));
    }

    /// Receives one message if one comes within 50 ms; keeps what it stores.
    fn receive(&mut self) -> Option<&Told> {
        let mut buf = [0u8; 4096];
        let mut iov = [IoSliceMut::new(&mut buf)];
        let mut cmsg = nix::cmsg_space!([RawFd; 253]);
        let (bytes, fds) = match recvmsg::<()>(
            self.notify.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => {
                let mut fds = Vec::new();
                for c in msg.cmsgs().unwrap() {
                    if let ControlMessageOwned::ScmRights(raw) = c {
                        fds.extend(raw);
                    }
                }
                (msg.bytes, fds)
            }
            Err(nix::errno::Errno::EAGAIN) => return None,
            Err(e) => panic!("notify socket: {e}"),
        };
        let text = String::from_utf8_lossy(&buf[..bytes]).to_string();
        let mut told = Told {
            lines: text.lines().map(str::to_string).collect(),
            fds: fds.into_iter().map(own).collect(),
        };
        let name = told.value("FDNAME").unwrap_or("stored").to_string();
        if told.has("FDSTOREREMOVE=1") {
            self.store.retain(|(n, _)| *n != name);
        }
        if told.has("FDSTORE=1") && self.hold {
            for fd in told.fds.drain(..) {
                self.store.push((name.clone(), fd));
            }
        }
        self.told.push(told);
        self.told.last()
    }

    /// Receives until a message satisfies `done` (within 30 s).
    fn pump_until(&mut self, what: &str, done: impl Fn(&Told) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            assert!(Instant::now() < deadline, "the appliance never said {what}");
            if self.receive().is_some_and(&done) {
                return;
            }
            if let Some(c) = self.child.as_mut() {
                assert!(
                    c.try_wait().unwrap().is_none(),
                    "the appliance exited before it said {what}"
                );
            }
        }
    }

    /// Receives for `d`.
    fn pump_for(&mut self, d: Duration) {
        let until = Instant::now() + d;
        while Instant::now() < until {
            self.receive();
        }
    }

    fn wait_log(&self, what: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        while let Ok(line) = self.log.recv_timeout(deadline - Instant::now()) {
            if line.contains(what) {
                return line;
            }
        }
        panic!("no log line with {what:?}");
    }

    fn kill9(&mut self) {
        let mut c = self.child.take().unwrap();
        c.kill().unwrap();
        c.wait().unwrap();
    }

    /// `systemctl reload`: SIGHUP, and back to `READY=1`.
    fn reload(&mut self) {
        signal(self.child.as_ref().unwrap(), "HUP");
        self.pump_until("RELOADING=1", |t| t.has("RELOADING=1"));
        self.pump_until("READY=1 after the reload", |t| t.has("READY=1"));
    }

    /// An upgrade: the next process runs from a copy of the binary at another path.
    fn upgrade(&mut self) {
        let to = self.path("edgerec-upgraded");
        fs::copy(&self.binary, &to).unwrap();
        self.binary = to;
    }

    fn sigterm(&mut self) {
        let mut c = self.child.take().unwrap();
        signal(&c, "TERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut stopping = false;
        while c.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "no exit after SIGTERM");
            stopping |= self.receive().is_some_and(|t| t.has("STOPPING=1"));
        }
        while let Some(t) = self.receive() {
            stopping |= t.has("STOPPING=1");
        }
        assert!(c.wait().unwrap().success());
        assert!(stopping, "STOPPING=1 at shutdown");
    }

    fn stored_names(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for (n, _) in &self.store {
            *m.entry(n.clone()).or_insert(0) += 1;
        }
        m
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A descriptor received over `SCM_RIGHTS`.
#[allow(unsafe_code)]
fn own(raw: RawFd) -> OwnedFd {
    // SAFETY: the kernel just installed `raw` in this process for this message
    // (MSG_CMSG_CLOEXEC); nothing else refers to it.
    unsafe { OwnedFd::from_raw_fd(raw) }
}

/// Every package under `store`: its port, the recording it continues, when it was made,
/// and every (SSRC, sequence number) it holds.
struct Stored {
    id: uuid::Uuid,
    port: u64,
    continues: Option<String>,
    created_ms: u64,
    packets: Vec<(u32, u16)>,
}

fn stored(store: &Path) -> Vec<Stored> {
    let ring = ring(&["test"]);
    let mut out = Vec::new();
    for f in files_with_ext(store, "erec") {
        let mut r =
            PackageReader::new(fs::File::open(&f).unwrap(), &ring, ReadMode::Recovery).unwrap();
        let h = r.header();
        let public: serde_json::Value = serde_json::from_slice(&h.metadata).unwrap();
        let mut p = Stored {
            id: uuid::Uuid::from_bytes(h.recording_id),
            port: public["port"].as_u64().unwrap_or(0),
            continues: public["continues"].as_str().map(str::to_string),
            created_ms: h.created_ms,
            packets: Vec::new(),
        };
        while let Some(rec) = r.next_record().unwrap() {
            if rec.kind != erec::format::Kind::Media {
                continue;
            }
            for e in entries(&rec.plaintext) {
                if let Entry::Rtp { packet, .. } = e.unwrap() {
                    let ssrc = u32::from_be_bytes(packet[8..12].try_into().unwrap());
                    p.packets
                        .push((ssrc, u16::from_be_bytes([packet[2], packet[3]])));
                }
            }
        }
        out.push(p);
    }
    out
}

/// How the harness ends each process.
#[derive(Clone, Copy, PartialEq)]
enum Stop {
    /// `kill -9`: a crash.
    Kill,
    /// SIGTERM: `systemctl restart`, an upgrade.
    Term,
}

/// What [`kill_under_load`] measured.
struct Kills {
    sent: usize,
    recorded: usize,
    /// Packets sent while no process ran, per stream, and how many of them were lost.
    in_outage: usize,
    lost_in_outage: usize,
    /// From `kill -9` to the next process's `READY=1`, each time.
    restarts: Vec<Duration>,
}

/// Paced streams (one per port, SSRC = port, 50 packets a second) while the appliance is
/// killed `kills` times, each time started again after `outage` (as `RestartSec=` waits),
/// with or without the descriptor store (`hold`); then stopped with SIGTERM. With `long`,
/// a third of the way through the config is reloaded (SIGHUP), and two thirds through the
/// appliance is upgraded (stopped, started again from a binary at another path). Checks that
/// nothing is stored twice and returns what was lost.
fn kill_under_load(
    streams: u16,
    kills: usize,
    outage: Duration,
    hold: bool,
    how: Stop,
    long: bool,
) -> Kills {
    let base = if streams <= 4 {
        free_ports()
    } else {
        crate::siprec::free_range(streams)
    };
    let mut m = Manager::with_ports(base, streams);
    m.start_holding(hold, &[]);
    let sent: Arc<Mutex<Vec<(Instant, u16)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let (sent, stop) = (Arc::clone(&sent), Arc::clone(&stop));
        std::thread::spawn(move || {
            let s = UdpSocket::bind("127.0.0.1:0").unwrap();
            let start = Instant::now();
            let mut seq = 0u16;
            while !stop.load(Ordering::Relaxed) {
                let at = Instant::now();
                for port in base..base + streams {
                    // Refused while nothing listens (without the store): lost, not fatal.
                    let _ = s.send_to(&rtp(seq, u32::from(port), 0x55), ("127.0.0.1", port));
                }
                sent.lock().unwrap().push((at, seq));
                seq += 1;
                let next = start + Duration::from_millis(20) * u32::from(seq);
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
        })
    };
    let mut outages = Vec::new();
    let mut restarts = Vec::new();
    for k in 0..kills {
        // At a different moment of the flush interval each time.
        m.pump_for(Duration::from_millis(700 + (k as u64 * 73) % 200));
        if long && k == kills / 3 {
            m.reload();
            m.pump_for(Duration::from_millis(300));
        }
        let upgrade = long && k == 2 * kills / 3;
        if upgrade {
            m.upgrade();
        }
        match how {
            Stop::Kill if !upgrade => m.kill9(),
            _ => m.sigterm(),
        }
        let dead = Instant::now();
        std::thread::sleep(outage);
        let restarting = Instant::now();
        m.start_holding(hold, &[]);
        restarts.push(dead.elapsed());
        outages.push((dead, restarting));
        if hold {
            assert_eq!(
                m.stored_names().get("rtp"),
                Some(&usize::from(streams)),
                "each socket stored once"
            );
        }
    }
    m.pump_for(Duration::from_millis(800));
    stop.store(true, Ordering::Relaxed);
    sender.join().unwrap();
    m.sigterm();
    // A stop delivers what it can in its time; the rest goes at the next start.
    let ready = m.path("spool/ready");
    let waiting = || files_with_ext(&ready, "erec").len();
    if waiting() > 0 {
        m.start_holding(hold, &[]);
        let deadline = Instant::now() + Duration::from_secs(60);
        while waiting() > 0 {
            assert!(Instant::now() < deadline, "packages stay in the spool");
            m.pump_for(Duration::from_millis(50));
        }
        m.sigterm();
    }

    // Each killed process left one recording per stream, the last one stopped.
    let store = m.path("store");
    if hold {
        assert_eq!(
            files_with_ext(&store, "erec").len(),
            usize::from(streams) * (kills + 1)
        );
    }
    let packages = stored(&store);
    let got: Vec<(u32, u16)> = packages.iter().flat_map(|p| p.packets.clone()).collect();
    let mut seen = BTreeSet::new();
    for p in &got {
        assert!(seen.insert(*p), "{p:?} is stored twice");
    }
    if hold {
        // Each port's recordings form one chain: every one after a restart continues the
        // one before it (export joins them into one call).
        for port in base..base + streams {
            let mut chain: Vec<&Stored> = packages
                .iter()
                .filter(|p| p.port == u64::from(port))
                .collect();
            chain.sort_by_key(|p| p.created_ms);
            assert_eq!(chain.len(), kills + 1);
            assert_eq!(chain[0].continues, None);
            for w in chain.windows(2) {
                assert_eq!(
                    w[1].continues.as_deref(),
                    Some(w[0].id.hyphenated().to_string().as_str()),
                    "port {port}: a recording after a restart continues the one before"
                );
            }
        }
    }
    if hold {
        // Exported, each port's recordings are one call again: one pcap a stream, holding
        // every packet its packages hold, each once.
        exports_joined(&m, &seen, streams);
        outcomes_agree(&m, &packages, streams, kills, how);
    }
    let sent = sent.lock().unwrap().clone();
    let (mut in_outage, mut lost_in_outage) = (0, 0);
    for (at, seq) in &sent {
        if outages.iter().any(|(dead, up)| at > dead && at < up) {
            in_outage += 1;
            for port in base..base + streams {
                if !seen.contains(&(u32::from(port), *seq)) {
                    lost_in_outage += 1;
                }
            }
        }
    }
    Kills {
        sent: sent.len() * usize::from(streams),
        recorded: got.len(),
        in_outage,
        lost_in_outage,
        restarts,
    }
}

/// `edgerec export --format pcap` of the store: one recording a stream (each call's parts
/// joined, named after the first), and its packets, counted by SSRC and sequence number,
/// exactly those `stored`, each once.
fn exports_joined(m: &Manager, stored: &BTreeSet<(u32, u16)>, streams: u16) {
    let out = m.path("export");
    let o = crate::export::export_pcap(&out, &[m.path("store").to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let pcaps = files_with_ext(&out, "pcap");
    assert_eq!(
        pcaps.len(),
        usize::from(streams),
        "one joined recording a call"
    );
    let mut exported = BTreeSet::new();
    for p in &pcaps {
        let mut ssrcs = BTreeSet::new();
        for (ssrc, seq) in crate::export::pcap_packets(p) {
            ssrcs.insert(ssrc);
            assert!(
                exported.insert((ssrc, seq)),
                "({ssrc}, {seq}) exported twice"
            );
        }
        assert_eq!(ssrcs.len(), 1, "{}: one call's stream", p.display());
        let meta = p.with_file_name(format!(
            "{}_metadata.json",
            p.file_stem().unwrap().to_str().unwrap()
        ));
        let doc: serde_json::Value = serde_json::from_slice(&fs::read(meta).unwrap()).unwrap();
        assert!(
            doc["parts"].as_array().is_some_and(|a| a.len() > 1),
            "{doc}"
        );
    }
    assert_eq!(&exported, stored, "the export holds what the packages hold");
}

/// `edgerec calls list --json` of the spool: every package in the store is a call stored,
/// with the recording it continues; each killed process's recordings were salvaged (one a
/// stream a kill), a stopped one's ended at the shutdown.
fn outcomes_agree(m: &Manager, packages: &[Stored], streams: u16, kills: usize, how: Stop) {
    let doc = calls_json("--spool", &m.path("spool"));
    let calls = doc["calls"].as_array().unwrap();
    let by_id = |id: &uuid::Uuid| {
        calls
            .iter()
            .find(|c| c["id"] == id.hyphenated().to_string())
            .unwrap_or_else(|| panic!("{id} is not in the outcome journal: {doc}"))
    };
    for p in packages {
        let c = by_id(&p.id);
        assert_eq!(c["outcome"], "stored", "{c}");
        if c.get("started_ms").is_some() {
            assert_eq!(c["continues"].as_str(), p.continues.as_deref(), "{c}");
        }
    }
    // The identity made at the first start is kept (0600) and shown for registration.
    let o = edgerec(&[
        "identity",
        "show",
        "--config",
        m.path("edgerec.toml").to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let shown: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let id = shown["appliance_id"].as_str().unwrap();
    assert!(
        id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{shown}"
    );
    assert!(
        shown["public_key_pem"]
            .as_str()
            .unwrap()
            .starts_with("-----BEGIN PUBLIC KEY-----\n")
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &fs::metadata(m.path("spool/identity.key"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let salvaged = calls.iter().filter(|c| c.get("salvaged").is_some()).count();
    let shutdown = calls
        .iter()
        .filter(|c| c["ended"]["reason"] == "shutdown")
        .count();
    let n = usize::from(streams);
    match how {
        Stop::Kill => {
            assert_eq!(salvaged, n * kills, "{doc}");
            assert_eq!(shutdown, n, "the last process stopped: {doc}");
        }
        Stop::Term => {
            assert_eq!(salvaged, 0, "{doc}");
            assert_eq!(shutdown, n * (kills + 1), "{doc}");
        }
    }
}

#[test]
fn sockets_kept_by_the_service_manager_lose_nothing_while_no_process_runs() {
    let mut m = Manager::new();
    m.start(&[]);
    // Every socket the appliance bound went into the store, by role.
    let names = m.stored_names();
    assert_eq!(names.get("rtp"), Some(&4), "{names:?}");
    assert_eq!(names.get("metrics"), Some(&1), "{names:?}");
    // A packet ring goes on taking datagrams while no process runs: it is kept too.
    let ring = usize::from(expected_ingest_mode() == "ring");
    assert_eq!(names.get("ring").copied().unwrap_or(0), ring, "{names:?}");
    m.pump_until("STATUS=recording 0 calls…", |t| {
        t.value("STATUS")
            .is_some_and(|s| s.starts_with("recording 0 calls"))
    });
    // Started again with the stored sockets, it takes them all and stores none twice.
    m.kill9();
    m.start(&[]);
    assert_eq!(m.stored_names(), names);
    m.sigterm();

    // Three kills under paced streams: every packet sent while no process ran waited in
    // the sockets the manager held.
    let k = kill_under_load(4, 3, Duration::from_millis(300), true, Stop::Kill, false);
    assert!(
        k.in_outage >= 30,
        "{} packets per stream sent during the outages",
        k.in_outage
    );
    assert_eq!(
        k.lost_in_outage, 0,
        "packets sent while no process ran are lost"
    );
    // And what the killed processes had read but not yet written came back from the
    // journal: every packet sent is stored, each once (checked in kill_under_load).
    assert_eq!(
        k.recorded, k.sent,
        "packets read before a kill -9 and not yet in a package file are lost"
    );
    eprintln!(
        "service manager harness: {} sent, {} recorded over 3 kills; none lost of the {} per \
         stream sent while no process ran",
        k.sent, k.recorded, k.in_outage
    );
}

#[test]
fn a_port_moved_to_another_address_is_let_go_of_and_bound_anew() {
    // The kept sockets hold 127.0.0.1:PORT; the new config wants 0.0.0.0:PORT, which only
    // binds once the store has let go of them.
    let mut m = Manager::new();
    m.start(&[]);
    m.kill9();
    let cfg = m.path("edgerec.toml");
    let text = fs::read_to_string(&cfg).unwrap();
    fs::write(
        &cfg,
        text.replace("bind = \"127.0.0.1\"", "bind = \"0.0.0.0\""),
    )
    .unwrap();
    m.start(&[]);
    assert!(
        m.told
            .iter()
            .any(|t| t.has("FDSTOREREMOVE=1") && t.value("FDNAME") == Some("rtp")),
        "the old sockets were cleared from the store"
    );
    assert_eq!(m.stored_names().get("rtp"), Some(&4), "the new ones stored");
    m.sigterm();
}

#[test]
fn a_planned_restart_under_load_loses_no_packet_at_all() {
    // SIGTERM (systemctl restart, an upgrade): the process ends every recording with what
    // it read, the sockets hold the rest; the next process continues each call.
    let k = kill_under_load(4, 2, Duration::from_millis(300), true, Stop::Term, false);
    assert_eq!(
        k.recorded, k.sent,
        "every packet sent is stored, exactly once"
    );
}

#[test]
fn a_siprec_session_cut_by_a_crash_is_delivered_and_its_client_told_481() {
    // SIP dialogs and SRTP keys are not carried over: a session in progress at a crash
    // ends there. Its package is salvaged and delivered like any recording; the SIP
    // listener outlives the process, so the client's next request is answered, with 481.
    let media = crate::siprec::free_range(2);
    let mut m = Manager::with_ports_and(
        free_ports(),
        4,
        &format!(
            "[siprec]\nlisten = \"127.0.0.1:0\"\nmedia_ports = \"{media}-{}\"\n\
             allow = [\"127.0.0.0/8\"]\n",
            media + 1
        ),
    );
    m.start(&[]);
    let names = m.stored_names();
    assert_eq!(names.get("sip-udp"), Some(&1), "{names:?}");
    assert_eq!(names.get("sip-tcp"), Some(&1), "{names:?}");
    assert_eq!(names.get("media"), Some(&2), "{names:?}");
    let line = m.wait_log("SIPREC server listening (UDP and TCP)");
    let sip = line
        .split("local=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap()
        .to_string();
    let (_conn, to_tag, port) = crate::siprec::one_stream_session(&sip, 0, "");
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..30u16 {
        s.send_to(&rtp(i, 7, 0x66), ("127.0.0.1", port)).unwrap();
    }
    m.pump_for(Duration::from_millis(600));
    m.kill9();
    m.start(&[]);
    // The same SIP address (its socket was kept); the dialog is unknown there now.
    let mut c = std::net::TcpStream::connect(&sip).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    c.write_all(crate::siprec::request("BYE", 2, &to_tag, "", "", "").as_bytes())
        .unwrap();
    let (head, _) = crate::siprec::final_response(&mut c);
    assert!(head.starts_with("SIP/2.0 481"), "{head}");
    // The salvaged package is delivered by the restarted process.
    let deadline = Instant::now() + Duration::from_secs(30);
    while files_with_ext(&m.path("store"), "erec").is_empty() {
        assert!(
            Instant::now() < deadline,
            "the salvaged session is not delivered"
        );
        m.pump_for(Duration::from_millis(50));
    }
    m.sigterm();
    let packages = stored(&m.path("store"));
    assert_eq!(packages.len(), 1, "the session's package, salvaged");
    assert!(!packages[0].packets.is_empty());
}

/// The benchmark `benches/restart_loss.sh` runs: `EDGEREC_BENCH_STREAMS` streams (50),
/// `EDGEREC_BENCH_KILLS` restarts (10: all `kill -9` but one, an upgrade to a binary at
/// another path by SIGTERM; a SIGHUP reload a third of the way), with and without the
/// descriptor store; prints the packets lost per stream per restart and the restart times.
#[test]
#[ignore = "a benchmark: benches/restart_loss.sh"]
fn restart_loss_benchmark() {
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let streams = u16::try_from(env("EDGEREC_BENCH_STREAMS", 50)).unwrap();
    let kills = env("EDGEREC_BENCH_KILLS", 10).max(3);
    let outage = Duration::from_millis(100);
    for hold in [false, true] {
        let k = kill_under_load(streams, kills, outage, hold, Stop::Kill, true);
        let per = (k.sent - k.recorded) as f64 / f64::from(streams) / kills as f64;
        let mut r = k.restarts.clone();
        r.sort();
        println!(
            "{}: {streams} streams, {kills} restarts ({} kill -9, one upgrade; a reload; \
             RestartSec=100ms): {} of {} packets lost, {per:.1} per stream per restart \
             ({:.0} ms of audio); sent while no process ran: {} per stream, {} lost in all; \
             stop to READY=1: median {:?}, max {:?}",
            if hold {
                "descriptor store"
            } else {
                "no descriptor store"
            },
            kills - 1,
            k.sent - k.recorded,
            k.sent,
            per * 20.0,
            k.in_outage,
            k.lost_in_outage,
            r[r.len() / 2],
            r[r.len() - 1],
        );
    }
}

#[cfg(feature = "test-hooks")]
#[test]
fn a_hung_recorder_thread_stops_the_watchdog_pings_and_the_restart_recovers() {
    let mut m = Manager::new();
    let pings = |m: &Manager| m.told.iter().filter(|t| t.has("WATCHDOG=1")).count();
    m.start(&[
        ("WATCHDOG_USEC", "2000000"),
        ("EDGEREC_TEST_STALL", "recorder:4000"),
    ]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while pings(&m) < 2 {
        assert!(
            Instant::now() < deadline,
            "no watchdog pings: {:?}",
            m.told.iter().map(|t| &t.lines).collect::<Vec<_>>()
        );
        m.receive();
    }
    m.wait_log("stalled by EDGEREC_TEST_STALL");
    let line = m.wait_log("a loop has stopped");
    assert!(line.contains("recorder"), "{line}");
    // Checks within a second of the last beat still ping (a recorder may idle that long);
    // none after that.
    m.pump_for(Duration::from_millis(600));
    let before = pings(&m);
    m.pump_for(Duration::from_millis(1500));
    assert_eq!(pings(&m), before, "pings while the recorder hangs");
    // The service manager's answer to a missed watchdog: kill and start again.
    m.kill9();
    m.start(&[("WATCHDOG_USEC", "2000000")]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while pings(&m) < 2 {
        assert!(
            Instant::now() < deadline,
            "no watchdog pings after the restart"
        );
        m.receive();
    }
    m.sigterm();
}
