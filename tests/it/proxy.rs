//! A fault-injecting HTTP proxy for the store tests: it sits between the appliance and the
//! store and, for the requests its rules match, answers 500 or 503 with `Retry-After`,
//! never answers (a timeout), resets the connection, or passes the request on and then
//! loses the store's answer (the store has the object, the client does not know). Every
//! other request goes to the store unchanged, so signatures still verify.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What to do to a matching request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Answer `500 Internal Server Error` (an S3 error body), without passing it on.
    Status500,
    /// Answer `503 Slow Down` with `Retry-After: N` seconds.
    Busy(u32),
    /// Read the request and never answer (the client's attempt timeout ends it).
    Hang,
    /// Reset the connection (RST) once the request is read.
    Reset,
    /// Pass the request to the store, then close without passing the answer back.
    LoseAnswer,
}

/// A fault for the next request whose method is `method` and whose request target contains
/// `path_has`.
#[derive(Debug, Clone)]
pub struct Rule {
    pub method: &'static str,
    pub path_has: &'static str,
    pub fault: Fault,
}

/// A running proxy (its listener thread lives as long as the test process).
pub struct Proxy {
    pub endpoint: String,
    rules: Arc<Mutex<VecDeque<Rule>>>,
    fired: Arc<Mutex<Vec<(Fault, String)>>>,
    refusal: Refusal,
}

/// An answer given to every request while set (status and JSON body), none passed on.
type Refusal = Arc<Mutex<Option<(u16, String)>>>;

impl Proxy {
    /// A proxy on a free loopback port in front of `upstream` (`http://host:port`).
    pub fn start(upstream: &str) -> Proxy {
        let upstream = upstream
            .strip_prefix("http://")
            .expect("an http endpoint")
            .to_string();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let rules: Arc<Mutex<VecDeque<Rule>>> = Arc::default();
        let fired: Arc<Mutex<Vec<(Fault, String)>>> = Arc::default();
        let refusal: Refusal = Arc::default();
        let (r, f, no) = (Arc::clone(&rules), Arc::clone(&fired), Arc::clone(&refusal));
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (r, f, up) = (Arc::clone(&r), Arc::clone(&f), upstream.clone());
                let no = Arc::clone(&no);
                std::thread::spawn(move || serve(conn, &up, &r, &f, &no));
            }
        });
        Proxy {
            endpoint,
            rules,
            fired,
            refusal,
        }
    }

    /// From now on answers every request with `status` and the JSON `body` (as a service
    /// that withdrew access does), or, with `None`, passes requests on again.
    pub fn refuse(&self, answer: Option<(u16, &str)>) {
        *self.refusal.lock().unwrap() = answer.map(|(s, b)| (s, b.to_string()));
    }

    /// Queues rules; each fires once, on the first request it matches, in order.
    pub fn add(&self, rules: impl IntoIterator<Item = Rule>) {
        self.rules.lock().unwrap().extend(rules);
    }

    /// The faults that fired, with the request line each hit.
    pub fn fired(&self) -> Vec<(Fault, String)> {
        self.fired.lock().unwrap().clone()
    }

    /// Rules that have not fired yet.
    pub fn pending(&self) -> usize {
        self.rules.lock().unwrap().len()
    }
}

/// One request: its head (request line and headers, `\r\n\r\n` included) and its body.
pub fn read_request(c: &mut impl Read) -> Option<(Vec<u8>, Vec<u8>)> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if c.read(&mut byte).ok()? == 0 {
            return None;
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let len: usize = text
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap_or(0));
    let mut body = vec![0u8; len];
    c.read_exact(&mut body).ok()?;
    Some((head, body))
}

fn serve(
    mut client: TcpStream,
    upstream: &str,
    rules: &Mutex<VecDeque<Rule>>,
    fired: &Mutex<Vec<(Fault, String)>>,
    refusal: &Mutex<Option<(u16, String)>>,
) {
    while let Some((head, body)) = read_request(&mut client) {
        let refused = refusal.lock().unwrap().clone();
        if let Some((status, answer)) = refused {
            let _ = write!(
                client,
                "HTTP/1.1 {status} Refused\r\nContent-Type: application/x-amz-json-1.1\r\n\
                 Content-Length: {}\r\n\r\n{answer}",
                answer.len()
            );
            continue;
        }
        let line = String::from_utf8_lossy(&head)
            .lines()
            .next()
            .unwrap_or_default()
            .to_string();
        let fault = {
            let mut rules = rules.lock().unwrap();
            let at = rules.iter().position(|r| {
                line.starts_with(&format!("{} ", r.method)) && line.contains(r.path_has)
            });
            at.and_then(|i| rules.remove(i)).map(|r| r.fault)
        };
        if let Some(f) = fault {
            fired.lock().unwrap().push((f, line.clone()));
        }
        match fault {
            Some(Fault::Status500) => {
                let body = "<Error><Code>InternalError</Code><Message>injected</Message></Error>";
                let _ = write!(
                    client,
                    "HTTP/1.1 500 Internal Server Error\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
            }
            Some(Fault::Busy(secs)) => {
                let body = "<Error><Code>SlowDown</Code><Message>injected</Message></Error>";
                let _ = write!(
                    client,
                    "HTTP/1.1 503 Slow Down\r\nRetry-After: {secs}\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
            }
            Some(Fault::Hang) => {
                // Longer than any client's timeout in the tests (3 s, so that a loaded
                // machine's slow but healthy request is not taken for a fault).
                std::thread::sleep(Duration::from_secs(15));
                return;
            }
            Some(Fault::Reset) => {
                let _ = nix::sys::socket::setsockopt(
                    &client,
                    nix::sys::socket::sockopt::Linger,
                    &nix::libc::linger {
                        l_onoff: 1,
                        l_linger: 0,
                    },
                );
                return; // dropped with linger 0: a reset
            }
            Some(Fault::LoseAnswer) => {
                let _ = forward(upstream, &head, &body);
                let _ = client.shutdown(Shutdown::Both);
                return;
            }
            None => match forward(upstream, &head, &body) {
                Some(answer) => {
                    if client.write_all(&answer).is_err() {
                        return;
                    }
                }
                None => return,
            },
        }
    }
}

/// Sends one request to the store on a fresh connection it asks the store to close after
/// answering, and returns the answer's bytes as the store framed them.
fn forward(upstream: &str, head: &[u8], body: &[u8]) -> Option<Vec<u8>> {
    let mut up = TcpStream::connect(upstream).ok()?;
    let text = String::from_utf8_lossy(head);
    let (line, rest) = text.split_once("\r\n")?;
    // Connection is not a signed header: adding it leaves the signature valid.
    let rest: String = rest
        .split("\r\n")
        .filter(|h| !h.to_ascii_lowercase().starts_with("connection:"))
        .collect::<Vec<_>>()
        .join("\r\n");
    up.write_all(format!("{line}\r\nConnection: close\r\n{rest}").as_bytes())
        .ok()?;
    up.write_all(body).ok()?;
    let mut answer = Vec::new();
    up.read_to_end(&mut answer).ok()?;
    Some(answer)
}
