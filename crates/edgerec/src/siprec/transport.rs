//! The recording server's SIP sockets: UDP and TCP on `[siprec] listen`, the thin tokio layer
//! around the sans-IO [`Srs`](super::srs::Srs). One task owns the state machine; each TCP
//! connection has a reader task that frames messages and a writer the owner sends answers
//! through; timers are the state machine's `next_timeout`.
//!
//! Invariants: everything a client sends is bounded before it is kept — a datagram or a
//! stream's unframed bytes at most `MAX_MESSAGE`, at most [`SipLimits::max_connections`] TCP
//! connections and [`SipLimits::per_source`] from one address (more are closed at once), a
//! connection that sends no whole message within [`SipLimits::idle`] is closed; sources outside
//! `allow` are dropped unread (counted); a request the server sends on a connection that is
//! gone (the BYE of a session the client forgot) goes on a new connection.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;

use super::message::{self, Framed, MAX_MESSAGE};
use super::srs::{Peer, SessionId, SipAction, Srs, Transport};

/// What clients may hold of the SIP listener.
#[derive(Debug, Clone, Copy)]
pub struct SipLimits {
    /// TCP connections at once.
    pub max_connections: usize,
    /// TCP connections from one address.
    pub per_source: usize,
    /// A connection with no whole message for this long is closed.
    pub idle: Duration,
}

impl Default for SipLimits {
    fn default() -> SipLimits {
        SipLimits {
            max_connections: 256,
            per_source: 16,
            idle: Duration::from_secs(300),
        }
    }
}

/// What the listener tells the rest of the appliance.
#[derive(Debug)]
pub enum Event {
    /// A session started, changed or stopped (the state machine's media actions).
    Session(SipAction),
    /// A datagram or connection from outside `allow` was dropped.
    Denied,
    /// A message that could not be read was dropped (a stream's connection closed).
    Malformed,
}

/// What the SIP server asks of the rest of the appliance.
pub struct SipHooks {
    /// Whether recordings are refused now (the disk policy, no usable key): INVITEs are
    /// answered `503` while it says so.
    pub refusing: Box<dyn Fn() -> bool + Send>,
    /// Where requests, responses, refusals and declined streams are counted.
    pub metrics: Option<Arc<crate::appliance::metrics::Metrics>>,
    /// Takes each session's start, change and stop, and acknowledges it once it is handed
    /// on; the answer that announces it is sent only then (so the recorder knows a
    /// session's ports before its media can arrive). Without it they go on the events
    /// channel.
    pub sessions: Option<SessionSink>,
    /// The outcome journal: told of the sessions refused (`siprec_busy`, `siprec_disk`, …).
    pub outcomes: Option<crate::appliance::outcomes::Outcomes>,
}

/// Where the SIP server hands each session's start, change and stop, with the
/// acknowledgement it waits for (asynchronously: the runtime's threads are not held).
pub type SessionSink = mpsc::Sender<(SipAction, tokio::sync::oneshot::Sender<()>)>;

impl Default for SipHooks {
    fn default() -> SipHooks {
        SipHooks {
            refusing: Box::new(|| false),
            metrics: None,
            sessions: None,
            outcomes: None,
        }
    }
}

impl SipHooks {
    /// A message in: the refusal state given to the state machine, the request counted.
    fn handle(
        &self,
        srs: &mut Srs,
        now_ms: u64,
        peer: Peer,
        m: &message::Message,
    ) -> Vec<SipAction> {
        srs.set_refusing((self.refusing)());
        if let (Some(metrics), message::Start::Request { method, .. }) = (&self.metrics, &m.start) {
            let known = ["INVITE", "ACK", "BYE", "CANCEL", "OPTIONS", "UPDATE"];
            let name = method.to_string();
            let method = if known.contains(&name.as_str()) {
                name
            } else {
                "other".into()
            };
            metrics
                .siprec_requests
                .get_or_create(&crate::appliance::metrics::SipMethod { method })
                .inc();
        }
        srs.handle(now_ms, peer, m)
    }

    /// Actions out: responses counted by code, and the state machine's refusals and
    /// declined streams since the last time.
    fn count(&self, srs: &Srs, actions: &[SipAction], tally: &mut Tally) {
        for (r, n) in &srs.refused {
            let seen = tally.refused.entry(*r).or_default();
            if *n > *seen {
                if let Some(metrics) = &self.metrics {
                    metrics
                        .siprec_sessions
                        .get_or_create(&crate::appliance::metrics::UploadOutcome {
                            outcome: format!("refused_{}", r.label()),
                        })
                        .inc_by(*n - *seen);
                }
                if let Some(o) = &self.outcomes {
                    o.note(crate::appliance::outcomes::Fact::Refused {
                        reason: format!("siprec_{}", r.label()),
                        count: *n - *seen,
                    });
                }
                *seen = *n;
            }
        }
        let Some(metrics) = &self.metrics else { return };
        for a in actions {
            if let SipAction::Send { bytes, .. } = a
                && let Some(code) = bytes.strip_prefix(b"SIP/2.0 ").and_then(|r| r.get(..3))
            {
                let code = String::from_utf8_lossy(code).into_owned();
                metrics
                    .siprec_responses
                    .get_or_create(&crate::appliance::metrics::SipCode { code })
                    .inc();
            }
        }
        for (why, n) in &srs.declined {
            let seen = tally.declined.entry(why).or_default();
            if *n > *seen {
                crate::appliance::metrics::Metrics::inc(&metrics.siprec_declined, why, *n - *seen);
                *seen = *n;
            }
        }
    }
}

/// What of the state machine's counters was published already.
#[derive(Default)]
struct Tally {
    refused: HashMap<super::srs::Refusal, u64>,
    declined: HashMap<&'static str, u64>,
}

/// The listener's sockets, bound.
pub struct Listener {
    udp: Arc<UdpSocket>,
    tcp: TcpListener,
    tls: Option<(TcpListener, tokio_rustls::TlsAcceptor)>,
}

impl Listener {
    /// Binds UDP and TCP on `addr` (port 0: the same port the system gives UDP).
    pub async fn bind(addr: SocketAddr) -> std::io::Result<Listener> {
        let udp = UdpSocket::bind(addr).await?;
        let tcp = TcpListener::bind(SocketAddr::new(addr.ip(), udp.local_addr()?.port())).await?;
        Ok(Listener {
            udp: Arc::new(udp),
            tcp,
            tls: None,
        })
    }

    /// The listener on sockets already bound (non-blocking; inside the runtime): UDP and
    /// TCP on the same address.
    pub fn from_std(
        udp: std::net::UdpSocket,
        tcp: std::net::TcpListener,
    ) -> std::io::Result<Listener> {
        Ok(Listener {
            udp: Arc::new(UdpSocket::from_std(udp)?),
            tcp: TcpListener::from_std(tcp)?,
            tls: None,
        })
    }

    /// Adds SIP over TLS on a listener already bound, with `config` (its certificate and
    /// key).
    pub fn with_tls_on(
        mut self,
        tcp: std::net::TcpListener,
        config: rustls::ServerConfig,
    ) -> std::io::Result<Listener> {
        let tcp = TcpListener::from_std(tcp)?;
        self.tls = Some((tcp, tokio_rustls::TlsAcceptor::from(Arc::new(config))));
        Ok(self)
    }

    /// The TLS listener's address, if there is one.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls.as_ref().and_then(|(t, _)| t.local_addr().ok())
    }

    /// The bound address (UDP and TCP share its port).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.udp.local_addr()
    }
}

/// Inputs of the owner task.
enum Input {
    Message(Peer, Vec<u8>),
    Closed(u64, IpAddr),
    Media(SessionId),
}

/// A handle to tell the server that media arrived for a session (its inactivity timer).
#[derive(Clone)]
pub struct MediaSeen(mpsc::Sender<Input>);

impl MediaSeen {
    /// Media arrived for `session`.
    pub fn seen(&self, session: SessionId) {
        let _ = self.0.try_send(Input::Media(session));
    }
}

/// The SIP server: a handle for media activity, and the task that reads, answers, times out
/// and reports sessions on `events` until `stop` completes.
pub fn server(
    listener: Listener,
    mut srs: Srs,
    allow: Arc<Vec<ipnet::IpNet>>,
    limits: SipLimits,
    events: mpsc::Sender<Event>,
    hooks: SipHooks,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> (MediaSeen, impl std::future::Future<Output = ()> + Send) {
    let (tx, mut rx) = mpsc::channel::<Input>(1024);
    let media = MediaSeen(tx.clone());
    let allowed = move |ip: IpAddr| allow.is_empty() || allow.iter().any(|n| n.contains(&ip));
    let epoch = Instant::now();
    let now_ms = move || u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
    let task = async move {
        let udp = Arc::clone(&listener.udp);
        let mut buf = vec![0u8; MAX_MESSAGE + 1];
        let mut writers: HashMap<u64, mpsc::Sender<Vec<u8>>> = HashMap::new();
        let mut per_source: HashMap<IpAddr, usize> = HashMap::new();
        let mut next_conn = 1u64;
        let mut tally = Tally::default();
        tokio::pin!(stop);
        loop {
            let wake = srs.next_timeout().map(|t| t.saturating_sub(now_ms()));
            let sleep = tokio::time::sleep(Duration::from_millis(wake.unwrap_or(3_600_000)));
            let actions = tokio::select! {
                () = &mut stop => break,
                () = sleep => srs.poll(now_ms()),
                got = udp.recv_from(&mut buf) => {
                    let Ok((n, from)) = got else { continue };
                    if !allowed(from.ip()) {
                        let _ = events.try_send(Event::Denied);
                        continue;
                    }
                    let peer = Peer { addr: from, transport: Transport::Udp, conn: None };
                    match (n <= MAX_MESSAGE).then(|| message::parse(&buf[..n])) {
                        Some(Ok(m)) => hooks.handle(&mut srs, now_ms(), peer, &m),
                        _ => {
                            let _ = events.try_send(Event::Malformed);
                            continue;
                        }
                    }
                }
                accepted = accept(&listener.tcp, &listener.tls) => {
                    let Ok((stream, from)) = accepted else { continue };
                    let ip = from.ip();
                    if !allowed(ip) {
                        let _ = events.try_send(Event::Denied);
                        continue;
                    }
                    let count = per_source.get(&ip).copied().unwrap_or(0);
                    if count >= limits.per_source || writers.len() >= limits.max_connections {
                        continue; // dropped: the stream closes here
                    }
                    per_source.insert(ip, count + 1);
                    let (wtx, wrx) = mpsc::channel::<Vec<u8>>(64);
                    writers.insert(next_conn, wtx.clone());
                    spawn_connection(next_conn, stream, from, limits.idle, tx.clone(), wtx, wrx, events.clone());
                    next_conn += 1;
                    continue;
                }
                input = rx.recv() => match input {
                    None => break,
                    Some(Input::Message(peer, bytes)) => match message::parse(&bytes) {
                        Ok(m) => hooks.handle(&mut srs, now_ms(), peer, &m),
                        Err(_) => {
                            let _ = events.try_send(Event::Malformed);
                            continue;
                        }
                    },
                    Some(Input::Closed(id, ip)) => {
                        writers.remove(&id);
                        if let Some(c) = per_source.get_mut(&ip) {
                            *c = c.saturating_sub(1);
                            if *c == 0 {
                                per_source.remove(&ip);
                            }
                        }
                        continue;
                    }
                    Some(Input::Media(session)) => {
                        srs.media_seen(session, now_ms());
                        continue;
                    }
                },
            };
            hooks.count(&srs, &actions, &mut tally);
            dispatch(actions, &udp, &writers, &events, hooks.sessions.as_ref()).await;
        }
    };
    (media, task)
}

/// Sends what the state machine says: on UDP, on the connection a request came on, or on a
/// new connection when that one is gone; reports the rest.
async fn dispatch(
    actions: Vec<SipAction>,
    udp: &UdpSocket,
    writers: &HashMap<u64, mpsc::Sender<Vec<u8>>>,
    events: &mpsc::Sender<Event>,
    sessions: Option<&SessionSink>,
) {
    // Sessions first: the media layer learns a session's ports before the client learns
    // them from the answer, so no packet finds its port unknown.
    let (sends, reports): (Vec<SipAction>, Vec<SipAction>) = actions
        .into_iter()
        .partition(|a| matches!(a, SipAction::Send { .. }));
    for a in reports {
        match sessions {
            Some(sink) => {
                let (ack, acked) = tokio::sync::oneshot::channel();
                if sink.send((a, ack)).await.is_ok() {
                    let _ = acked.await;
                }
            }
            None => {
                let _ = events.send(Event::Session(a)).await;
            }
        }
    }
    for a in sends {
        let SipAction::Send { peer, bytes } = a else {
            continue;
        };
        match peer.transport {
            Transport::Udp => {
                let _ = udp.send_to(&bytes, peer.addr).await;
            }
            Transport::Tcp | Transport::Tls => {
                let w = peer.conn.and_then(|c| writers.get(&c)).cloned();
                match w {
                    Some(w) if w.send(bytes.clone()).await.is_ok() => {}
                    // A new TLS connection would need a client identity the client
                    // trusts: the request is not sent (the session ends here anyway).
                    _ if peer.transport == Transport::Tls => {
                        tracing::warn!(peer = %peer.addr, "SIP over TLS: the client's connection is gone; request not sent");
                    }
                    // The connection is gone (or was never ours): a new one.
                    _ => {
                        tokio::spawn(async move {
                            let connect = tokio::time::timeout(
                                Duration::from_secs(5),
                                TcpStream::connect(peer.addr),
                            );
                            if let Ok(Ok(mut s)) = connect.await
                                && s.write_all(&bytes).await.is_ok()
                            {
                                // Its answer is read and the connection let go.
                                let mut sink = [0u8; 2048];
                                let _ =
                                    tokio::time::timeout(Duration::from_secs(5), s.read(&mut sink))
                                        .await;
                            }
                        });
                    }
                }
            }
        }
    }
}

/// The next connection, TCP or TLS (a TLS connection's handshake is its task's).
async fn accept(
    tcp: &TcpListener,
    tls: &Option<(TcpListener, tokio_rustls::TlsAcceptor)>,
) -> std::io::Result<(Conn, SocketAddr)> {
    let tls_accept = async {
        match tls {
            Some((l, a)) => {
                let (s, from) = l.accept().await?;
                Ok((Conn::Tls(s, a.clone()), from))
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        a = tcp.accept() => a.map(|(s, from)| (Conn::Tcp(s), from)),
        a = tls_accept => a,
    }
}

/// A stream connection as accepted.
enum Conn {
    Tcp(TcpStream),
    /// Before its handshake.
    Tls(TcpStream, tokio_rustls::TlsAcceptor),
}

/// How long a TLS client has for its handshake.
const TLS_HANDSHAKE: Duration = Duration::from_secs(10);

/// A connection's reader (framing messages to the owner, answering keep-alives) and writer
/// (what the owner sends on it); a TLS connection's handshake first.
#[allow(clippy::too_many_arguments)]
fn spawn_connection(
    id: u64,
    conn: Conn,
    from: SocketAddr,
    idle: Duration,
    tx: mpsc::Sender<Input>,
    pong: mpsc::Sender<Vec<u8>>,
    wrx: mpsc::Receiver<Vec<u8>>,
    events: mpsc::Sender<Event>,
) {
    tokio::spawn(async move {
        match conn {
            Conn::Tcp(s) => {
                let peer = Peer {
                    addr: from,
                    transport: Transport::Tcp,
                    conn: Some(id),
                };
                serve_stream(s, peer, idle, &tx, pong, wrx, &events).await;
            }
            Conn::Tls(s, acceptor) => {
                match tokio::time::timeout(TLS_HANDSHAKE, acceptor.accept(s)).await {
                    Ok(Ok(s)) => {
                        let peer = Peer {
                            addr: from,
                            transport: Transport::Tls,
                            conn: Some(id),
                        };
                        serve_stream(s, peer, idle, &tx, pong, wrx, &events).await;
                    }
                    _ => {
                        let _ = events.try_send(Event::Malformed);
                    }
                }
            }
        }
        let _ = tx.send(Input::Closed(id, from.ip())).await;
    });
}

/// Reads and frames one connection's messages until it closes, idles or garbles.
async fn serve_stream<S>(
    stream: S,
    peer: Peer,
    idle: Duration,
    tx: &mpsc::Sender<Input>,
    pong: mpsc::Sender<Vec<u8>>,
    mut wrx: mpsc::Receiver<Vec<u8>>,
    events: &mpsc::Sender<Event>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    {
        let (mut read, mut write) = tokio::io::split(stream);
        let writer = tokio::spawn(async move {
            while let Some(b) = wrx.recv().await {
                if write.write_all(&b).await.is_err() {
                    break;
                }
            }
        });
        let mut buf: Vec<u8> = Vec::with_capacity(4096);
        let mut chunk = vec![0u8; 16 * 1024];
        'conn: loop {
            let n = match tokio::time::timeout(idle, read.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
                Ok(Ok(n)) => n,
            };
            buf.extend_from_slice(&chunk[..n]);
            loop {
                match message::frame(&buf) {
                    Ok(Framed::Message(len)) => {
                        let msg: Vec<u8> = buf.drain(..len).collect();
                        if tx.send(Input::Message(peer, msg)).await.is_err() {
                            break 'conn;
                        }
                    }
                    Ok(Framed::KeepAlive(len)) => {
                        buf.drain(..len);
                        // RFC 5626: a ping (CRLFCRLF) is answered by a pong (CRLF).
                        if len == 4 {
                            let _ = pong.try_send(b"\r\n".to_vec());
                        }
                    }
                    Ok(Framed::Incomplete) => break,
                    Err(_) => {
                        let _ = events.try_send(Event::Malformed);
                        break 'conn;
                    }
                }
            }
        }
        writer.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::siprec::message::Start;
    use crate::siprec::srs::SrsConfig;

    fn srs() -> Srs {
        Srs::new(
            SrsConfig {
                advertise: "127.0.0.1".parse().unwrap(),
                contact: "sip:srs@127.0.0.1".into(),
                media_ports: (31000, 31019),
                max_sessions: 4,
                conversation_header: None,
                inactivity_ms: 60_000,
            },
            Box::new(|b: &mut [u8]| getrandom::fill(b).unwrap()),
        )
    }

    fn request(method: &str, transport: &str, to_tag: &str, cseq: u32, body: &str) -> String {
        let ct = if body.is_empty() {
            String::new()
        } else {
            "Content-Type: application/sdp\r\nRequire: siprec\r\n".to_string()
        };
        format!(
            "{method} sip:srs@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/{transport} 127.0.0.1:5999;branch=z9hG4bK{method}{cseq}\r\n\
Max-Forwards: 70\r\nFrom: <sip:src@127.0.0.1>;tag=t1\r\nTo: <sip:srs@127.0.0.1>{to_tag}\r\nCall-ID: call-{transport}\r\n\
CSeq: {cseq} {method}\r\nContact: <sip:src@127.0.0.1:5999>;+sip.src\r\n{ct}Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
    }

    const SDP: &str = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
m=audio 40000 RTP/AVP 0\r\na=label:1\r\na=sendonly\r\nm=audio 40002 RTP/AVP 0\r\na=label:2\r\na=sendonly\r\n";

    /// Reads messages from `t` until one with status `code` (earlier ones skipped).
    async fn response(t: &mut TcpStream, buf: &mut Vec<u8>, code: u16) -> message::Message {
        let mut chunk = [0u8; 4096];
        loop {
            while let Ok(Framed::Message(n)) = message::frame(buf) {
                let m = message::parse(&buf[..n]).unwrap();
                buf.drain(..n);
                if matches!(m.start, Start::Response { code: c, .. } if c == code) {
                    return m;
                }
            }
            let n = tokio::time::timeout(Duration::from_secs(5), t.read(&mut chunk))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "closed");
            buf.extend_from_slice(&chunk[..n]);
        }
    }

    #[tokio::test]
    async fn options_over_udp_and_a_call_over_tcp_are_answered_and_reported() {
        let l = Listener::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let addr = l.local_addr().unwrap();
        let (etx, mut erx) = mpsc::channel(16);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (_media, task) = server(
            l,
            srs(),
            Arc::new(vec![]),
            SipLimits::default(),
            etx,
            SipHooks::default(),
            async move {
                let _ = stop_rx.await;
            },
        );
        let h = tokio::spawn(task);
        let u = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        u.send_to(request("OPTIONS", "UDP", "", 1, "").as_bytes(), addr)
            .await
            .unwrap();
        let mut b = [0u8; 4096];
        let (n, _) = tokio::time::timeout(Duration::from_secs(5), u.recv_from(&mut b))
            .await
            .unwrap()
            .unwrap();
        assert!(b[..n].starts_with(b"SIP/2.0 200 OK\r\n"));
        let mut t = TcpStream::connect(addr).await.unwrap();
        let mut buf = Vec::new();
        t.write_all(request("INVITE", "TCP", "", 1, SDP).as_bytes())
            .await
            .unwrap();
        let ok = response(&mut t, &mut buf, 200).await;
        let tag = message::tag_of(ok.header("to").unwrap())
            .unwrap()
            .to_string();
        let Some(Event::Session(SipAction::Start {
            session, streams, ..
        })) = erx.recv().await
        else {
            panic!("no start");
        };
        assert_eq!(streams.len(), 2);
        // A keep-alive ping is answered by a pong on the same connection.
        t.write_all(b"\r\n\r\n").await.unwrap();
        let mut pong = [0u8; 2];
        tokio::time::timeout(Duration::from_secs(5), t.read_exact(&mut pong))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&pong, b"\r\n");
        t.write_all(request("BYE", "TCP", &format!(";tag={tag}"), 2, "").as_bytes())
            .await
            .unwrap();
        response(&mut t, &mut buf, 200).await;
        let Some(Event::Session(SipAction::Stop {
            session: stopped,
            reason,
        })) = erx.recv().await
        else {
            panic!("no stop");
        };
        assert_eq!((stopped, reason), (session, "bye"));
        stop_tx.send(()).unwrap();
        h.await.unwrap();
    }

    #[tokio::test]
    async fn connections_over_the_cap_are_closed_and_other_sources_unanswered() {
        let l = Listener::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let addr = l.local_addr().unwrap();
        let (etx, mut erx) = mpsc::channel(16);
        let limits = SipLimits {
            per_source: 2,
            ..SipLimits::default()
        };
        let (_media, task) = server(
            l,
            srs(),
            Arc::new(vec![]),
            limits,
            etx,
            SipHooks::default(),
            std::future::pending(),
        );
        tokio::spawn(task);
        let mut kept = Vec::new();
        for _ in 0..2 {
            let mut t = TcpStream::connect(addr).await.unwrap();
            // Each answered: the server holds it.
            t.write_all(request("OPTIONS", "TCP", "", 1, "").as_bytes())
                .await
                .unwrap();
            response(&mut t, &mut Vec::new(), 200).await;
            kept.push(t);
        }
        let mut third = TcpStream::connect(addr).await.unwrap();
        let mut b = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(5), third.read(&mut b))
            .await
            .unwrap()
            .unwrap_or(0);
        assert_eq!(n, 0, "closed at once");
        // A garbled stream is closed and counted.
        let mut bad = kept.pop().unwrap();
        bad.write_all(b"INVITE sip:a@b SIP/2.0\r\nContent-Length: x\r\n\r\n")
            .await
            .unwrap();
        assert!(matches!(erx.recv().await, Some(Event::Malformed)));
        // Sources outside allow get nothing.
        let l = Listener::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let addr = l.local_addr().unwrap();
        let (etx, mut erx) = mpsc::channel(16);
        let allow = Arc::new(vec!["10.0.0.0/8".parse().unwrap()]);
        let (_media, task) = server(
            l,
            srs(),
            allow,
            SipLimits::default(),
            etx,
            SipHooks::default(),
            std::future::pending(),
        );
        tokio::spawn(task);
        let u = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        u.send_to(request("OPTIONS", "UDP", "", 1, "").as_bytes(), addr)
            .await
            .unwrap();
        assert!(matches!(erx.recv().await, Some(Event::Denied)));
        let mut b = [0u8; 64];
        assert!(
            tokio::time::timeout(Duration::from_millis(200), u.recv_from(&mut b))
                .await
                .is_err()
        );
    }
}
