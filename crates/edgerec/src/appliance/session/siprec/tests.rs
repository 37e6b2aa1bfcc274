//! The SIPREC recordings on a fake clock: what a session's start, media, changes and stop
//! put into its package.

use super::*;
use crate::appliance::session::Limits;
use crate::siprec::sdp::Suite;
use erec::entries::entries;

const MS: u64 = 1000;
const FREE: edgerec_net::rate_limit::Limit = edgerec_net::rate_limit::Limit {
    rate: 1e9,
    burst: 1e9,
};
const SBC: &str = "192.0.2.10";

fn limits() -> Limits {
    Limits {
        idle_timeout_us: 5000 * MS,
        max_recording_us: 60_000 * MS,
        flush_interval_us: 1000 * MS,
        max_chunk: 4096,
        min_packets: 3,
        starts_per_source: FREE,
        starts_per_port: FREE,
    }
}

fn stream(index: usize, port: Option<u16>, label: &str) -> MediaStream {
    MediaStream {
        index,
        label: Some(label.into()),
        port,
        sources: vec![SBC.parse().unwrap()],
        paused: false,
        payload_types: vec![(0, "PCMU/8000".into())],
        srtp: None,
    }
}

fn rtp(seq: u16, ssrc: u32) -> Vec<u8> {
    let mut p = vec![0x80, 0];
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&(u32::from(seq) * 160).to_be_bytes());
    p.extend_from_slice(&ssrc.to_be_bytes());
    p.extend(std::iter::repeat_n(seq as u8, 160));
    p
}

struct H {
    s: Sessions,
    out: Vec<Action>,
}

impl H {
    fn new() -> H {
        let mut s = Sessions::new(limits());
        s.set_siprec_ports(40_000, 40_099);
        H { s, out: Vec::new() }
    }

    fn send(&mut self, now: u64, port: u16, from: &str, d: &[u8]) {
        let local = SocketAddr::new("127.0.0.1".parse().unwrap(), port);
        let remote = SocketAddr::new(from.parse().unwrap(), 30_000);
        self.s.handle(now, local, remote, d, &mut self.out);
    }

    fn start(&mut self, now: u64, session: u64, streams: &[MediaStream]) -> RecId {
        self.s
            .siprec_start(
                now,
                SessionId(session),
                streams,
                br#"{"conversation_id":"c1"}"#.to_vec(),
                &mut self.out,
            )
            .unwrap()
    }

    fn flush_until(&mut self, now: u64) {
        while let Some(t) = self.s.poll_timeout() {
            if t > now {
                break;
            }
            self.s.handle_timeout(t, &mut self.out);
        }
    }

    fn dropped(&self, reason: &str) -> u64 {
        self.s.counters().dropped.get(reason).copied().unwrap_or(0)
    }

    /// A recording's records in order: `M:<json>` for metadata, and each media entry as
    /// `open s<stream> <label>`, `rtp s<stream> <seq>`, `rtcp s<stream>`, `pause s<stream>`,
    /// `resume s<stream>`, `ssrc s<stream>`, `gap s<stream> <n>`.
    fn records(&self, rec: RecId) -> Vec<String> {
        let mut v = Vec::new();
        for a in &self.out {
            match a {
                Action::Metadata { rec: r, json } if *r == rec => {
                    v.push(format!("M:{}", String::from_utf8_lossy(json)));
                }
                Action::Chunk { rec: r, plaintext } if *r == rec => {
                    for e in entries(plaintext) {
                        v.push(match e.unwrap() {
                            Entry::StreamOpened { stream, label, .. } => {
                                format!("open s{stream} {label}")
                            }
                            Entry::Rtp { stream, packet, .. } => format!(
                                "rtp s{stream} {}",
                                u16::from_be_bytes([packet[2], packet[3]])
                            ),
                            Entry::Rtcp { stream, .. } => format!("rtcp s{stream}"),
                            Entry::Event { stream, event, .. } => match event {
                                Event::Pause => format!("pause s{stream}"),
                                Event::Resume => format!("resume s{stream}"),
                                Event::SsrcChange(_) => format!("ssrc s{stream}"),
                                Event::Gap(n) => format!("gap s{stream} {n}"),
                            },
                        });
                    }
                }
                _ => {}
            }
        }
        v
    }

    fn closes(&self) -> Vec<(RecId, EndReason)> {
        self.out
            .iter()
            .filter_map(|a| match a {
                Action::Close { rec, reason } => Some((*rec, *reason)),
                _ => None,
            })
            .collect()
    }
}

#[test]
fn a_session_is_one_recording_its_streams_the_m_lines_from_the_first_packet() {
    let mut h = H::new();
    let rec = h.start(
        0,
        1,
        &[
            stream(0, Some(40_000), "caller"),
            stream(1, Some(40_002), "agent"),
        ],
    );
    assert!(matches!(h.out[0], Action::Open { rec: r, continues: None, .. } if r == rec));
    // No admission: the first packet of each leg is recorded (min_packets is 3 for ports).
    h.send(10 * MS, 40_002, SBC, &rtp(7, 0xa));
    h.send(20 * MS, 40_000, SBC, &rtp(100, 0xb));
    h.send(30 * MS, 40_000, SBC, &rtp(101, 0xb));
    h.send(40 * MS, 40_001, SBC, &[0x80, 200, 0, 1, 0, 0, 0, 0xb]);
    h.s.siprec_stop(SessionId(1), "bye", &mut h.out);
    assert_eq!(
        h.records(rec),
        [
            r#"M:{"conversation_id":"c1"}"#,
            "open s1 agent",
            "rtp s1 7",
            "open s0 caller",
            "rtp s0 100",
            "rtp s0 101",
            "rtcp s0",
            r#"M:{"siprec_end":"bye","streams_with_media":2}"#,
        ]
    );
    assert_eq!(h.closes(), [(rec, EndReason::Complete)]);
    assert_eq!(h.s.siprec_active(), 0);
    // Its ports are free: nothing more is recorded there.
    h.send(50 * MS, 40_000, SBC, &rtp(102, 0xb));
    assert_eq!(h.dropped("siprec_no_session"), 1);
    assert_eq!(h.s.counters().started, 1);
    assert_eq!(h.s.counters().ended.get("complete"), Some(&1));
}

#[test]
fn a_session_without_media_is_still_a_package_and_strangers_are_not_recorded() {
    let mut h = H::new();
    let rec = h.start(0, 1, &[stream(0, Some(40_000), "a")]);
    // Another address, a port no session holds, RTP on an RTCP port: none is recorded.
    h.send(MS, 40_000, "203.0.113.9", &rtp(1, 5));
    h.send(MS, 40_010, SBC, &rtp(1, 5));
    h.send(MS, 40_001, SBC, &rtp(1, 5));
    h.s.siprec_stop(SessionId(1), "srs_bye_inactive", &mut h.out);
    assert_eq!(
        h.records(rec),
        [
            r#"M:{"conversation_id":"c1"}"#,
            r#"M:{"siprec_end":"srs_bye_inactive","streams_with_media":0}"#
        ]
    );
    assert_eq!(h.closes(), [(rec, EndReason::IdleTimeout)]);
    assert_eq!(h.dropped("siprec_source"), 1);
    assert_eq!(h.dropped("siprec_no_session"), 2);
    // A port outside the SIPREC range goes the ingest way (held as a candidate).
    h.send(2 * MS, 40_100, SBC, &rtp(1, 5));
    assert_eq!(h.s.candidates(), 1);
}

#[test]
fn a_re_invite_pauses_resumes_and_moves_a_stream_within_one_recording() {
    let mut h = H::new();
    let rec = h.start(0, 1, &[stream(0, Some(40_000), "a")]);
    h.send(MS, 40_000, SBC, &rtp(1, 9));
    let mut paused = stream(0, Some(40_000), "a");
    paused.paused = true;
    h.s.siprec_change(2 * MS, SessionId(1), &[paused], None, &mut h.out);
    h.send(3 * MS, 40_000, SBC, &rtp(2, 9));
    // Resumed on a new port, with new metadata.
    h.s.siprec_change(
        4 * MS,
        SessionId(1),
        &[stream(0, Some(40_004), "a")],
        Some(br#"{"conversation_id":"c2"}"#.to_vec()),
        &mut h.out,
    );
    h.send(5 * MS, 40_000, SBC, &rtp(3, 9));
    h.send(6 * MS, 40_004, SBC, &rtp(4, 9));
    h.s.siprec_stop(SessionId(1), "bye", &mut h.out);
    assert_eq!(
        h.records(rec),
        [
            r#"M:{"conversation_id":"c1"}"#,
            "open s0 a",
            "rtp s0 1",
            "pause s0",
            "resume s0",
            r#"M:{"conversation_id":"c2"}"#,
            "gap s0 1",
            "rtp s0 4",
            r#"M:{"siprec_end":"bye","streams_with_media":1}"#,
        ]
    );
    assert_eq!(h.s.counters().rtp_paused, 1);
    assert_eq!(h.dropped("siprec_no_session"), 1);
    // Packet 3 went to the old port: 4 follows 2 (seen while paused) with one missing.
    assert_eq!(h.s.counters().rtp_lost, 1);
}

#[test]
fn srtp_is_stored_decrypted_and_a_forged_packet_is_counted_not_stored() {
    use crate::siprec::srtp::tests::{sdes, sender};
    let mut h = H::new();
    let key = sdes(Suite::Aes128Sha1_80);
    let mut s = stream(0, Some(40_000), "a");
    s.srtp = Some(key.clone());
    let rec = h.start(0, 1, &[s]);
    let mut tx = sender(&key);
    let plain = rtp(1, 77);
    let wire = tx.encrypt_rtp(&plain).unwrap();
    h.send(MS, 40_000, SBC, &wire);
    let mut forged = tx.encrypt_rtp(&rtp(2, 77)).unwrap().to_vec();
    forged[20] ^= 1;
    h.send(2 * MS, 40_000, SBC, &forged);
    // Plain RTP on an SRTP stream does not authenticate either.
    h.send(3 * MS, 40_000, SBC, &rtp(3, 77));
    h.s.siprec_stop(SessionId(1), "bye", &mut h.out);
    assert_eq!(
        h.records(rec),
        [
            r#"M:{"conversation_id":"c1"}"#,
            "open s0 a",
            "rtp s0 1",
            r#"M:{"siprec_end":"bye","streams_with_media":1}"#
        ]
    );
    let stored = h
        .out
        .iter()
        .find_map(|a| match a {
            Action::Chunk { plaintext, .. } => entries(plaintext).find_map(|e| match e {
                Ok(Entry::Rtp { packet, .. }) => Some(packet.to_vec()),
                _ => None,
            }),
            _ => None,
        })
        .unwrap();
    assert_eq!(stored, plain, "the package holds the plain packet");
    assert_eq!(h.dropped("srtp_auth"), 2);
}

#[test]
fn the_maximum_duration_continues_the_session_with_its_streams_and_metadata() {
    let mut h = H::new();
    let first = h.start(0, 1, &[stream(0, Some(40_000), "a")]);
    h.send(MS, 40_000, SBC, &rtp(1, 9));
    let mut t = 1000 * MS;
    let mut seq = 2;
    while t < 61_000 * MS {
        h.send(t, 40_000, SBC, &rtp(seq, 9));
        h.flush_until(t);
        t += 1000 * MS;
        seq += 1;
    }
    let opens: Vec<(RecId, Option<RecId>)> = h
        .out
        .iter()
        .filter_map(|a| match a {
            Action::Open { rec, continues, .. } => Some((*rec, *continues)),
            _ => None,
        })
        .collect();
    assert_eq!(opens.len(), 2);
    let second = opens[1].0;
    assert_eq!(opens[1].1, Some(first));
    assert_eq!(h.closes(), [(first, EndReason::MaxDuration)]);
    h.send(t, 40_000, SBC, &rtp(seq, 9));
    h.s.siprec_stop(SessionId(1), "bye", &mut h.out);
    assert_eq!(h.closes()[1], (second, EndReason::Complete));
    assert_eq!(
        h.records(second),
        [
            r#"M:{"conversation_id":"c1"}"#.to_string(),
            "open s0 a".into(),
            format!("rtp s0 {seq}"),
            r#"M:{"siprec_end":"bye","streams_with_media":1}"#.into(),
        ]
    );
}

#[test]
fn media_is_reported_seen_at_most_once_a_second_per_session() {
    let mut h = H::new();
    h.start(0, 1, &[stream(0, Some(40_000), "a")]);
    h.start(0, 2, &[stream(0, Some(40_002), "b")]);
    for i in 0..100u16 {
        h.send(u64::from(i) * 20 * MS, 40_000, SBC, &rtp(i, 1));
    }
    assert_eq!(h.s.take_siprec_seen(), [SessionId(1), SessionId(1)]);
    assert_eq!(h.s.take_siprec_seen(), []);
    h.send(3000 * MS, 40_002, SBC, &rtp(1, 2));
    assert_eq!(h.s.take_siprec_seen(), [SessionId(2)]);
}

#[test]
fn an_aborted_session_records_nothing_more_and_ends_once() {
    let mut h = H::new();
    let rec = h.start(0, 1, &[stream(0, Some(40_000), "a")]);
    h.s.abort(MS, rec);
    h.send(2 * MS, 40_000, SBC, &rtp(1, 9));
    h.s.siprec_stop(SessionId(1), "bye", &mut h.out);
    assert!(h.closes().is_empty(), "the driver ended it already");
    assert_eq!(h.dropped("refused"), 1);
    assert_eq!(h.s.counters().ended.get("spool_error"), Some(&1));
    // Shutdown with sessions in progress ends each once.
    let other = h.start(3 * MS, 2, &[stream(0, Some(40_002), "b")]);
    h.s.shutdown(&mut h.out);
    assert_eq!(h.closes(), [(other, EndReason::Shutdown)]);
    assert_eq!(h.s.poll_timeout(), None);
}

#[test]
fn a_stream_a_re_invite_drops_frees_its_port_for_the_next_session() {
    // Session 1 drops its second stream; the SIP side gives that port to session 2. Session
    // 1's next change must not take it back: session 2's audio stays in session 2.
    let mut h = H::new();
    let one = h.start(
        0,
        1,
        &[stream(0, Some(40_000), "a"), stream(1, Some(40_002), "b")],
    );
    h.s.siprec_change(
        MS,
        SessionId(1),
        &[stream(0, Some(40_000), "a")],
        None,
        &mut h.out,
    );
    let two = h.start(2 * MS, 2, &[stream(0, Some(40_002), "c")]);
    h.s.siprec_change(
        3 * MS,
        SessionId(1),
        &[stream(0, Some(40_000), "a")],
        Some(br#"{"conversation_id":"c1"}"#.to_vec()),
        &mut h.out,
    );
    h.send(4 * MS, 40_002, SBC, &rtp(1, 5));
    // And session 1's stop leaves session 2's port alone.
    h.s.siprec_stop(SessionId(1), "bye", &mut h.out);
    h.send(5 * MS, 40_002, SBC, &rtp(2, 5));
    h.s.siprec_stop(SessionId(2), "bye", &mut h.out);
    assert!(h.records(one).iter().all(|r| !r.starts_with("rtp")));
    assert_eq!(
        h.records(two),
        [
            r#"M:{"conversation_id":"c1"}"#,
            "open s0 c",
            "rtp s0 1",
            "rtp s0 2",
            r#"M:{"siprec_end":"bye","streams_with_media":1}"#
        ]
    );
}

mod prop {
    //! Any sequence of session starts, changes (streams kept, dropped, added, paused, moved),
    //! stops, aborts, datagrams and time: the media layer follows the SIP side's ports, so
    //! a packet is only ever recorded in the session its port belongs to, and every
    //! recording opened is closed once (or aborted).
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, HashMap};

    #[derive(Debug, Clone)]
    enum Step {
        Start(u8),
        /// A re-offer: stream i keeps its port if bit i of `keep` is set, is paused if bit i
        /// of `pause` is; one m-line more if `add`, one fewer (the last) if `shrink`.
        Change {
            session: u8,
            keep: u8,
            add: bool,
            pause: u8,
            shrink: bool,
        },
        Stop(u8),
        Abort(u8),
        Packet {
            port: u8,
            rtcp: bool,
        },
        Wait(u16),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            2 => (0u8..4).prop_map(Step::Start),
            2 => (0u8..4, any::<u8>(), any::<bool>(), any::<u8>())
                .prop_flat_map(|(session, keep, add, pause)| any::<bool>().prop_map(move |shrink| {
                    Step::Change { session, keep, add, pause, shrink }
                })),
            1 => (0u8..4).prop_map(Step::Stop),
            1 => (0u8..4).prop_map(Step::Abort),
            8 => (0u8..22, any::<bool>()).prop_map(|(port, rtcp)| Step::Packet { port, rtcp }),
            2 => (0u16..2000).prop_map(Step::Wait),
        ]
    }

    /// The SIP side, as the test models it: who holds which even port of 40000..40020.
    #[derive(Default)]
    struct Sip {
        streams: BTreeMap<u8, Vec<MediaStream>>,
        free: Vec<u16>,
    }

    impl Sip {
        fn take(&mut self) -> Option<u16> {
            self.free.pop()
        }
        fn owner(&self, port: u16) -> Option<u8> {
            let even = port & !1;
            self.streams
                .iter()
                .find(|(_, ss)| ss.iter().any(|s| s.port == Some(even)))
                .map(|(k, _)| *k)
        }
    }

    proptest! {
        #[test]
        fn packets_stay_in_their_sessions_and_every_recording_ends_once(
            steps in proptest::collection::vec(step(), 1..150),
        ) {
            let mut h = H::new();
            h.s.limits.max_recording_us = 3_000 * MS;
            let mut sip = Sip { free: (0..10).map(|i| 40_000 + 2 * i).collect(), ..Sip::default() };
            // Each recording's session: from its start, and a continuation's from its
            // predecessor's.
            let mut session_of: HashMap<RecId, u8> = HashMap::new();
            let mut current: HashMap<u8, RecId> = HashMap::new();
            let mut aborted: Vec<RecId> = Vec::new();
            let mut now = 0u64;
            let mut seq = 0u16;
            for st in steps {
                match st {
                    Step::Start(k) if !sip.streams.contains_key(&k) => {
                        let Some(p) = sip.take() else { continue };
                        let ss = vec![stream(0, Some(p), "a")];
                        let rec = h.s
                            .siprec_start(now, SessionId(u64::from(k)), &ss, b"{}".to_vec(), &mut h.out)
                            .expect("a new session");
                        session_of.insert(rec, k);
                        current.insert(k, rec);
                        sip.streams.insert(k, ss);
                    }
                    Step::Change { session: k, keep, add, pause, shrink } => {
                        let Some(mut ss) = sip.streams.remove(&k) else { continue };
                        if shrink && ss.len() > 1 {
                            // The SIP side gives the last m-line's port back.
                            sip.free.extend(ss.pop().and_then(|s| s.port));
                        }
                        for (i, s) in ss.iter_mut().enumerate() {
                            if keep & (1 << i) == 0 && s.port.is_some() {
                                sip.free.push(s.port.take().expect("checked"));
                            }
                            s.paused = pause & (1 << i) != 0;
                        }
                        // A dropped stream stays an m-line (port 0), as in SDP.
                        if add && ss.len() < 6 {
                            let p = sip.take();
                            ss.push(stream(ss.len(), p, "b"));
                        }
                        h.s.siprec_change(now, SessionId(u64::from(k)), &ss, None, &mut h.out);
                        sip.streams.insert(k, ss);
                    }
                    Step::Stop(k) => {
                        if let Some(ss) = sip.streams.remove(&k) {
                            sip.free.extend(ss.iter().filter_map(|s| s.port));
                            h.s.siprec_stop(SessionId(u64::from(k)), "bye", &mut h.out);
                            current.remove(&k);
                        }
                    }
                    Step::Abort(k) => {
                        if let Some(rec) = current.get(&k) {
                            h.s.abort(now, *rec);
                            aborted.push(*rec);
                        }
                    }
                    Step::Packet { port, rtcp } => {
                        let port = 40_000 + u16::from(port);
                        // The SSRC says whose port it was when sent (99: nobody's).
                        let owner = sip.owner(port).map_or(99, u32::from);
                        seq = seq.wrapping_add(1);
                        let d = if rtcp {
                            let mut b = vec![0x80, 200, 0, 6];
                            b.extend_from_slice(&owner.to_be_bytes());
                            b.extend_from_slice(&[0; 20]);
                            b
                        } else {
                            rtp(seq, owner)
                        };
                        h.send(now, port, SBC, &d);
                    }
                    Step::Wait(ms) => {
                        now += u64::from(ms) * MS;
                        h.flush_until(now);
                    }
                    Step::Start(_) => {}
                }
                // Continuations belong to their predecessor's session.
                for a in &h.out {
                    if let Action::Open { rec, continues: Some(prev), .. } = a
                        && let Some(k) = session_of.get(prev).copied()
                    {
                        session_of.insert(*rec, k);
                        current.insert(k, *rec);
                    }
                }
            }
            h.s.shutdown(&mut h.out);
            let mut opened = Vec::new();
            let mut closed: HashMap<RecId, usize> = HashMap::new();
            for a in &h.out {
                match a {
                    Action::Open { rec, .. } => opened.push(*rec),
                    Action::Close { rec, .. } => *closed.entry(*rec).or_default() += 1,
                    Action::Chunk { rec, plaintext } => {
                        prop_assert!(!closed.contains_key(rec), "a chunk after the end");
                        for e in entries(plaintext) {
                            if let Ok(Entry::Rtp { packet, .. }) = e {
                                let ssrc = u32::from_be_bytes([packet[8], packet[9], packet[10], packet[11]]);
                                prop_assert_eq!(Some(ssrc), session_of.get(rec).map(|k| u32::from(*k)),
                                    "a packet recorded in another session's recording");
                            }
                        }
                    }
                    _ => {}
                }
            }
            for rec in opened {
                let n = closed.get(&rec).copied().unwrap_or(0);
                if aborted.contains(&rec) {
                    prop_assert!(n <= 1);
                } else {
                    prop_assert_eq!(n, 1, "every recording ends once");
                }
            }
            prop_assert_eq!(h.s.siprec_active(), 0);
            prop_assert!(h.s.siprec.by_port.is_empty(), "no port left held");
        }
    }
}
