//! The recording server's SIP state machine on fixed messages and a fake clock.

use super::*;

const SDP: &str = "v=0\r\no=SBC 1 1 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\n\
m=audio 10000 RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\n\
a=label:1\r\na=sendonly\r\nm=audio 10002 RTP/AVP 0\r\na=label:2\r\na=sendonly\r\n";

const XML: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<recording xmlns="urn:ietf:params:xml:ns:recording:1"><datamode>complete</datamode>
<session session_id="sess-1"><sipSessionID>abc</sipSessionID></session>
<participant participant_id="p-alice"><nameID aor="sip:alice@example.com"><name>Alice</name></nameID></participant>
<participant participant_id="p-bob"><nameID aor="bob@example.com"/></participant>
<stream stream_id="s1" session_id="sess-1"><label>1</label></stream>
<stream stream_id="s2" session_id="sess-1"><label>2</label></stream>
<participantstreamassoc participant_id="p-alice"><send>s1</send><recv>s2</recv></participantstreamassoc>
<participantstreamassoc participant_id="p-bob"><send>s2</send><recv>s1</recv></participantstreamassoc>
</recording>"#;

fn cfg() -> SrsConfig {
    SrsConfig {
        advertise: "198.51.100.10".parse().unwrap(),
        contact: "sip:srs@198.51.100.10:5060".into(),
        media_ports: (30000, 30019),
        max_sessions: 2,
        conversation_header: Some("X-Conversation-Id".into()),
        inactivity_ms: 60_000,
    }
}

fn srs() -> Srs {
    let mut n = 0u8;
    Srs::new(
        cfg(),
        Box::new(move |b: &mut [u8]| {
            for x in b.iter_mut() {
                n = n.wrapping_add(1);
                *x = n;
            }
        }),
    )
}

fn peer(transport: Transport) -> Peer {
    Peer {
        addr: "192.0.2.1:5060".parse().unwrap(),
        transport,
        conn: (transport != Transport::Udp).then_some(7),
    }
}

/// A request of `method` in call `call`, with CSeq `n`, extra header lines, and a body.
fn request(
    method: &str,
    call: &str,
    n: u32,
    to_tag: Option<&str>,
    extra: &str,
    body: Option<(&str, &str)>,
) -> Message {
    message::parse(request_text(method, call, n, to_tag, extra, body).as_bytes()).unwrap()
}

fn request_text(
    method: &str,
    call: &str,
    n: u32,
    to_tag: Option<&str>,
    extra: &str,
    body: Option<(&str, &str)>,
) -> String {
    let to_tag = to_tag.map(|t| format!(";tag={t}")).unwrap_or_default();
    let (ct, body) = match body {
        Some((ct, b)) => (format!("Content-Type: {ct}\r\n"), b.to_string()),
        None => (String::new(), String::new()),
    };
    format!(
        "{method} sip:srs@198.51.100.10:5060 SIP/2.0\r\n\
Via: SIP/2.0/TCP 192.0.2.1:5060;branch=z9hG4bK-{call}-{n}-{method}\r\n\
Max-Forwards: 70\r\nFrom: <sip:src@192.0.2.1>;tag=src-{call}\r\n\
To: <sip:srs@198.51.100.10>{to_tag}\r\nCall-ID: {call}\r\nCSeq: {n} {method}\r\n\
Contact: <sip:src@192.0.2.1:5060;transport=tcp>;+sip.src\r\n{extra}{ct}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

fn siprec_body(sdp: &str, xml: &str) -> String {
    format!(
        "--b1\r\nContent-Type: application/sdp\r\n\r\n{sdp}\r\n--b1\r\nContent-Type: application/rs-metadata+xml\r\n\
Content-Disposition: recording-session\r\n\r\n{xml}\r\n--b1--\r\n"
    )
}

fn invite(call: &str, extra: &str) -> Message {
    let body = siprec_body(SDP, XML);
    request(
        "INVITE",
        call,
        1,
        None,
        &format!("Require: siprec\r\nX-Conversation-Id: conv-{call}\r\n{extra}"),
        Some(("multipart/mixed;boundary=b1", &body)),
    )
}

/// The responses among `actions`, parsed.
fn responses(actions: &[SipAction]) -> Vec<Message> {
    actions
        .iter()
        .filter_map(|a| match a {
            SipAction::Send { bytes, .. } => Some(message::parse(bytes).unwrap()),
            _ => None,
        })
        .collect()
}

fn code(m: &Message) -> u16 {
    match m.start {
        Start::Response { code, .. } => code,
        Start::Request { .. } => 0,
    }
}

fn codes(actions: &[SipAction]) -> Vec<u16> {
    responses(actions).iter().map(code).collect()
}

fn to_tag(actions: &[SipAction]) -> String {
    let r = responses(actions);
    let last = r.last().unwrap();
    message::tag_of(last.header("to").unwrap())
        .unwrap()
        .to_string()
}

#[test]
fn a_two_leg_call_is_answered_started_and_stopped_by_bye() {
    let mut s = srs();
    let p = peer(Transport::Tcp);
    let a = s.handle(0, p, &invite("c1", ""));
    assert_eq!(codes(&a), [100, 200]);
    let ok = responses(&a).pop().unwrap();
    assert!(ok.header("contact").unwrap().ends_with(";+sip.srs"));
    let answer = sdp::parse_offer(&ok.body).unwrap();
    let ports: Vec<u16> = answer.streams.iter().map(|s| s.port).collect();
    assert_eq!(ports, [30000, 30002]);
    assert_eq!(answer.streams[0].label.as_deref(), Some("1"));
    assert_eq!(answer.streams[0].direction, sdp::Dir::RecvOnly);
    let Some(SipAction::Start {
        session,
        streams,
        call,
        metadata,
    }) = a.last()
    else {
        panic!("{a:?}")
    };
    assert_eq!(streams.len(), 2);
    assert_eq!(streams[0].port, Some(30000));
    assert_eq!(streams[0].sources, ["192.0.2.1".parse::<IpAddr>().unwrap()]);
    assert_eq!(call.conversation_id.as_deref(), Some("conv-c1"));
    assert_eq!(call.call_id, "c1");
    let (json, raw) = metadata.as_ref().unwrap();
    assert_eq!(json["participants"][0]["aor"], "sip:alice@example.com");
    assert_eq!(json["participants"][0]["send"][0]["label"], "1");
    assert!(raw.contains("<recording"));
    let tag = to_tag(&a);
    assert!(
        s.handle(10, p, &request("ACK", "c1", 1, Some(&tag), "", None))
            .is_empty()
    );
    let bye = s.handle(5000, p, &request("BYE", "c1", 2, Some(&tag), "", None));
    assert_eq!(codes(&bye), [200]);
    assert_eq!(
        bye.last(),
        Some(&SipAction::Stop {
            session: *session,
            reason: "bye"
        })
    );
    assert_eq!(s.sessions(), 0);
    // Its ports went back to the pool: the next call may have them.
    let a = s.handle(6000, p, &invite("c2", ""));
    let ok = responses(&a).pop().unwrap();
    assert_eq!(sdp::parse_offer(&ok.body).unwrap().streams.len(), 2);
    assert_eq!(
        codes(&s.handle(6001, p, &request("BYE", "nope", 2, None, "", None))),
        [481]
    );
}

#[test]
fn over_udp_the_200_is_sent_again_until_the_ack_or_the_dialog_ends() {
    let mut s = srs();
    let p = peer(Transport::Udp);
    let a = s.handle(0, p, &invite("u1", ""));
    let tag = to_tag(&a);
    assert_eq!(s.next_timeout(), Some(T1_MS));
    assert!(s.poll(T1_MS - 1).is_empty());
    assert_eq!(codes(&s.poll(T1_MS)), [200]);
    assert_eq!(codes(&s.poll(T1_MS + 2 * T1_MS)), [200], "doubled");
    assert!(
        s.handle(2000, p, &request("ACK", "u1", 1, Some(&tag), "", None))
            .is_empty()
    );
    assert!(
        s.poll(10_000)
            .iter()
            .all(|a| !matches!(a, SipAction::Send { .. }))
    );
    // Never acknowledged: ended with a BYE after 64·T1.
    let a = s.handle(0, p, &invite("u2", ""));
    let Some(SipAction::Start { session, .. }) = a.last() else {
        panic!()
    };
    let mut sent = 0;
    let mut t = 0;
    let mut last = Vec::new();
    while t <= 64 * T1_MS {
        t = s.next_timeout().unwrap().max(t);
        last = s.poll(t);
        sent += last
            .iter()
            .filter(|a| matches!(a, SipAction::Send { .. }))
            .count();
        if last.iter().any(|a| matches!(a, SipAction::Stop { .. })) {
            break;
        }
    }
    assert!(sent >= 7, "{sent} retransmissions");
    assert!(last.contains(&SipAction::Stop {
        session: *session,
        reason: "no_ack"
    }));
    let bye = responses(&last).pop().unwrap();
    assert_eq!(bye.method(), Some(&Method::BYE));
}

#[test]
fn a_retransmitted_invite_gets_the_same_answer_and_starts_nothing() {
    let mut s = srs();
    let p = peer(Transport::Udp);
    let first = s.handle(0, p, &invite("r1", ""));
    let again = s.handle(100, p, &invite("r1", ""));
    assert!(!again.iter().any(|a| matches!(a, SipAction::Start { .. })));
    let ok = |a: &[SipAction]| {
        a.iter()
            .filter_map(|a| match a {
                SipAction::Send { bytes, .. } => Some(bytes.clone()),
                _ => None,
            })
            .next_back()
    };
    assert_eq!(ok(&first), ok(&again));
    assert_eq!(s.sessions(), 1);
}

#[test]
fn a_reinvite_pauses_and_resumes_without_new_ports_and_merges_metadata() {
    let mut s = srs();
    let p = peer(Transport::Tcp);
    let a = s.handle(0, p, &invite("m1", ""));
    let tag = to_tag(&a);
    let paused_sdp = SDP.replace("a=label:1\r\na=sendonly", "a=label:1\r\na=inactive");
    let update = r#"<recording xmlns="urn:ietf:params:xml:ns:recording:1"><datamode>partial</datamode>
<participant participant_id="p-carol"><nameID aor="sip:carol@example.com"/></participant></recording>"#;
    let body = siprec_body(&paused_sdp, update);
    let re = request(
        "INVITE",
        "m1",
        2,
        Some(&tag),
        "",
        Some(("multipart/mixed;boundary=b1", &body)),
    );
    let a = s.handle(1000, p, &re);
    assert_eq!(codes(&a), [200]);
    let answer = sdp::parse_offer(&responses(&a)[0].body).unwrap();
    assert_eq!(answer.streams[0].direction, sdp::Dir::Inactive);
    assert_eq!(
        answer.streams.iter().map(|s| s.port).collect::<Vec<_>>(),
        [30000, 30002],
        "same ports"
    );
    let Some(SipAction::Change {
        streams, metadata, ..
    }) = a.last()
    else {
        panic!("{a:?}")
    };
    assert!(streams[0].paused && !streams[1].paused);
    let (json, _) = metadata.as_ref().unwrap();
    assert_eq!(json["participants"].as_array().unwrap().len(), 3, "merged");
    // Resumed by sendonly again; an UPDATE with no body changes nothing.
    let re = request(
        "INVITE",
        "m1",
        3,
        Some(&tag),
        "",
        Some(("application/sdp", SDP)),
    );
    let a = s.handle(2000, p, &re);
    let Some(SipAction::Change {
        streams, metadata, ..
    }) = a.last()
    else {
        panic!()
    };
    assert!(!streams[0].paused);
    assert!(metadata.is_none());
    let a = s.handle(3000, p, &request("UPDATE", "m1", 4, Some(&tag), "", None));
    assert_eq!(codes(&a), [200]);
    assert_eq!(a.len(), 1);
    // A stream the client declines later gives its port back.
    let declined = SDP.replace("m=audio 10002", "m=audio 0");
    let a = s.handle(
        4000,
        p,
        &request(
            "INVITE",
            "m1",
            5,
            Some(&tag),
            "",
            Some(("application/sdp", &declined)),
        ),
    );
    let Some(SipAction::Change { streams, .. }) = a.last() else {
        panic!()
    };
    assert_eq!(streams[1].port, None);
    assert_eq!(s.ports.used.len(), 1);
}

#[test]
fn refusals_say_why_with_their_codes() {
    let mut s = srs();
    let p = peer(Transport::Tcp);
    s.set_refusing(true);
    let a = s.handle(0, p, &invite("x1", ""));
    assert_eq!(codes(&a), [100, 503]);
    assert_eq!(responses(&a)[1].header("retry-after"), Some("30"));
    s.set_refusing(false);
    let a = s.handle(0, p, &invite("x2", "Require: siprec, 100rel\r\n"));
    assert_eq!(codes(&a), [100, 420]);
    assert_eq!(responses(&a)[1].header("unsupported"), Some("100rel"));
    // Not a recording session: no signs at all.
    let plain = request_text("INVITE", "x3", 1, None, "", Some(("application/sdp", SDP)));
    let plain = message::parse(plain.replace(";+sip.src", "").as_bytes()).unwrap();
    assert_eq!(codes(&s.handle(0, p, &plain)), [100, 488]);
    // Nothing to record: video only.
    let video = SDP.replace("m=audio", "m=video");
    let a = s.handle(
        0,
        p,
        &request(
            "INVITE",
            "x4",
            1,
            None,
            "Require: siprec\r\n",
            Some(("application/sdp", &video)),
        ),
    );
    assert_eq!(codes(&a), [100, 488]);
    // No offer at all.
    let a = s.handle(
        0,
        p,
        &request("INVITE", "x5", 1, None, "Require: siprec\r\n", None),
    );
    assert_eq!(codes(&a), [100, 488]);
    // Two sessions is the most.
    s.handle(0, p, &invite("y1", ""));
    s.handle(0, p, &invite("y2", ""));
    let a = s.handle(0, p, &invite("y3", ""));
    assert_eq!(codes(&a), [100, 503]);
    assert_eq!(responses(&a)[1].header("retry-after"), Some("5"));
    assert_eq!(s.sessions(), 2);
    let count = |r: Refusal| s.refused.get(&r).copied().unwrap_or(0);
    assert_eq!(
        [
            Refusal::Refusing,
            Refusal::BadExtension,
            Refusal::NotRecording,
            Refusal::NotAcceptable,
            Refusal::Busy
        ]
        .map(count),
        [1, 1, 1, 2, 1]
    );
    // No media port left is busy too, not unacceptable.
    let mut small = Srs::new(
        SrsConfig {
            media_ports: (30000, 30001),
            ..cfg()
        },
        Box::new(|_: &mut [u8]| {}),
    );
    let a = small.handle(0, p, &invite("z1", ""));
    assert_eq!(codes(&a), [100, 503]);
}

#[test]
fn options_cancel_and_other_methods() {
    let mut s = srs();
    let p = peer(Transport::Udp);
    let a = s.handle(0, p, &request("OPTIONS", "o1", 1, None, "", None));
    assert_eq!(codes(&a), [200]);
    assert!(responses(&a)[0].header("allow").unwrap().contains("INVITE"));
    assert_eq!(
        codes(&s.handle(0, p, &request("CANCEL", "o2", 1, None, "", None))),
        [481]
    );
    s.handle(0, p, &invite("o3", ""));
    assert_eq!(
        codes(&s.handle(0, p, &request("CANCEL", "o3", 1, None, "", None))),
        [200]
    );
    assert_eq!(
        s.sessions(),
        1,
        "the answer was given: the client ends it with a BYE"
    );
    assert_eq!(
        codes(&s.handle(0, p, &request("INFO", "o3", 2, None, "", None))),
        [405]
    );
    assert_eq!(
        codes(&s.handle(0, p, &request("UPDATE", "o9", 2, None, "", None))),
        [481]
    );
}

#[test]
fn a_session_gone_quiet_is_ended_with_a_bye_through_its_route_set() {
    let mut s = srs();
    let p = peer(Transport::Tcp);
    let rr = "Record-Route: <sip:192.0.2.50:5070;lr>, <sip:proxy.example;lr>\r\n";
    let a = s.handle(0, p, &invite("q1", rr));
    let Some(SipAction::Start { session, .. }) = a.last() else {
        panic!()
    };
    let session = *session;
    s.media_seen(session, 30_000);
    assert!(s.poll(60_000).is_empty(), "media 30 s ago");
    let a = s.poll(90_000);
    assert_eq!(
        a.last(),
        Some(&SipAction::Stop {
            session,
            reason: "srs_bye_inactive"
        })
    );
    let Some(SipAction::Send { peer: to, bytes }) = a.first() else {
        panic!()
    };
    assert_eq!(
        to.addr,
        "192.0.2.50:5070".parse().unwrap(),
        "the first route"
    );
    let bye = message::parse(bytes).unwrap();
    assert_eq!(
        bye.start,
        Start::Request {
            method: Method::BYE,
            uri: "sip:src@192.0.2.1:5060;transport=tcp".into()
        }
    );
    assert_eq!(
        bye.values("route"),
        ["<sip:192.0.2.50:5070;lr>", "<sip:proxy.example;lr>"]
    );
    assert!(
        message::tag_of(bye.header("from").unwrap()).is_some(),
        "our tag"
    );
    assert_eq!(message::tag_of(bye.header("to").unwrap()), Some("src-q1"));
    assert_eq!(bye.header("cseq"), Some("1 BYE"));
    assert_eq!(s.sessions(), 0);
    // All streams paused: quiet is expected, nothing ends.
    let a = s.handle(0, p, &invite("q2", ""));
    let tag = to_tag(&a);
    let inactive = SDP.replace("a=sendonly", "a=inactive");
    s.handle(
        0,
        p,
        &request(
            "INVITE",
            "q2",
            2,
            Some(&tag),
            "",
            Some(("application/sdp", &inactive)),
        ),
    );
    assert_eq!(
        s.next_timeout(),
        Some(PAUSED_INACTIVITY_MS),
        "only the paused session's own limit"
    );
    assert!(s.poll(600_000).is_empty());
    // Resumed after ten minutes: it has its full inactivity time from the resume.
    let resume = request(
        "INVITE",
        "q2",
        3,
        Some(&tag),
        "",
        Some(("application/sdp", SDP)),
    );
    s.handle(600_000, p, &resume);
    assert!(s.poll(600_001).is_empty());
    assert_eq!(s.next_timeout(), Some(660_000));
    // Paused again, then forgotten (no media, no SIP, no session timer): ended after the
    // paused limit, not kept for ever.
    let pause = request(
        "INVITE",
        "q2",
        4,
        Some(&tag),
        "",
        Some(("application/sdp", &inactive)),
    );
    s.handle(610_000, p, &pause);
    assert!(s.poll(610_000 + PAUSED_INACTIVITY_MS - 1).is_empty());
    let end = s.poll(610_000 + PAUSED_INACTIVITY_MS);
    assert!(
        end.iter().any(|a| matches!(
            a,
            SipAction::Stop {
                reason: "srs_bye_inactive",
                ..
            }
        )),
        "{end:?}"
    );
    assert_eq!(s.sessions(), 0);
}

#[test]
fn a_session_timer_not_refreshed_ends_the_session() {
    let mut s = srs();
    let p = peer(Transport::Tcp);
    let a = s.handle(
        0,
        p,
        &invite("t1", "Supported: timer\r\nSession-Expires: 30\r\n"),
    );
    assert_eq!(
        responses(&a).pop().unwrap().header("session-expires"),
        Some("90;refresher=uac"),
        "at least 90 s"
    );
    let tag = to_tag(&a);
    // Refreshed at 60 s by an UPDATE: good for 90 s more.
    s.media_seen(SessionId(1), 100_000);
    s.handle(
        60_000,
        p,
        &request(
            "UPDATE",
            "t1",
            2,
            Some(&tag),
            "Session-Expires: 90\r\n",
            None,
        ),
    );
    assert!(s.poll(100_000).is_empty());
    s.media_seen(SessionId(1), 149_000);
    let a = s.poll(150_000);
    assert_eq!(
        a.last(),
        Some(&SipAction::Stop {
            session: SessionId(1),
            reason: "session_timer"
        })
    );
}

#[test]
fn the_port_pool_hands_out_even_ports_and_wraps() {
    let mut p = Ports::new((30001, 30006));
    assert_eq!(p.free(), 2);
    assert_eq!(
        (p.take(), p.take(), p.take()),
        (Some(30002), Some(30004), None)
    );
    p.give(30002);
    assert_eq!(p.take(), Some(30002));
    let mut none = Ports::new((30000, 30000));
    assert_eq!((none.free(), none.take()), (0, None));
}

proptest::proptest! {
    /// Random sequences of requests from two clients: every request gets exactly one final
    /// response, starts and stops pair up, and the pool never leaks.
    #[test]
    fn every_request_is_answered_once_and_sessions_pair_up(ops in proptest::collection::vec((0u8..8, 0u8..3, 0u64..5000), 1..60)) {
        let mut s = srs();
        let p = peer(Transport::Udp);
        let mut now = 0;
        let mut tags: HashMap<String, String> = HashMap::new();
        let mut cseq: HashMap<String, u32> = HashMap::new();
        let mut started = BTreeSet::new();
        let mut stopped = BTreeSet::new();
        for (op, call, dt) in ops {
            now += dt;
            let call = format!("p{call}");
            let n = cseq.entry(call.clone()).or_insert(1);
            *n += 1;
            let tag = tags.get(&call).cloned();
            let msg = match op {
                0 | 1 => invite(&call, ""),
                2 => request("ACK", &call, 1, tag.as_deref(), "", None),
                3 => request("BYE", &call, *n, tag.as_deref(), "", None),
                4 => request("INVITE", &call, *n, tag.as_deref(), "", Some(("application/sdp", SDP))),
                5 => request("OPTIONS", &call, *n, None, "", None),
                6 => request("CANCEL", &call, 1, None, "", None),
                _ => request("UPDATE", &call, *n, tag.as_deref(), "", None),
            };
            let mut actions = s.handle(now, p, &msg);
            let finals = codes(&actions).into_iter().filter(|c| *c >= 200).count();
            if op == 2 {
                proptest::prop_assert_eq!(finals, 0);
            } else {
                proptest::prop_assert_eq!(finals, 1);
            }
            if let Some(t) = responses(&actions).last().and_then(|r| r.header("to").and_then(message::tag_of).map(str::to_string))
                && op < 2 && !tags.contains_key(&call)
            {
                tags.insert(call.clone(), t);
            }
            actions.extend(s.poll(now));
            for a in &actions {
                match a {
                    SipAction::Start { session, .. } => proptest::prop_assert!(started.insert(*session)),
                    SipAction::Stop { session, .. } => {
                        proptest::prop_assert!(started.contains(session));
                        proptest::prop_assert!(stopped.insert(*session));
                        tags.retain(|_, _| true);
                    }
                    _ => {}
                }
            }
            if actions.iter().any(|a| matches!(a, SipAction::Stop { .. })) {
                // A stopped call's next INVITE is a new dialog.
                tags.clear();
            }
            let in_use: usize = s.dialogs.values().map(|d| d.streams.iter().filter(|m| m.port.is_some()).count()).sum();
            proptest::prop_assert_eq!(in_use, s.ports.used.len());
        }
    }
}

#[test]
fn a_request_without_our_to_tag_is_not_in_the_dialog() {
    // Someone who learnt the Call-ID and the client's From tag cannot end or re-offer the
    // session: the dialog is also its To tag, ours.
    let mut s = srs();
    let p = peer(Transport::Tcp);
    let a = s.handle(0, p, &invite("c1", ""));
    let tag = to_tag(&a);
    for forged in [
        request("BYE", "c1", 2, Some("guessed"), "", None),
        request("BYE", "c1", 2, None, "", None),
        request(
            "INVITE",
            "c1",
            3,
            None,
            "Require: siprec\r\n",
            Some(("application/sdp", SDP)),
        ),
        request("UPDATE", "c1", 4, Some("guessed"), "", None),
    ] {
        let r = s.handle(10, p, &forged);
        assert_eq!(codes(&r), [481]);
        assert!(
            !r.iter()
                .any(|x| matches!(x, SipAction::Stop { .. } | SipAction::Change { .. }))
        );
    }
    assert_eq!(s.sessions(), 1);
    // The INVITE that made it, sent again (no To tag yet), is answered as before.
    assert_eq!(codes(&s.handle(20, p, &invite("c1", ""))), [200]);
    let bye = s.handle(30, p, &request("BYE", "c1", 5, Some(&tag), "", None));
    assert_eq!(codes(&bye), [200]);
    assert_eq!(s.sessions(), 0);
}
