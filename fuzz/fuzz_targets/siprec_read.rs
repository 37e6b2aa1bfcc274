//! Feeds arbitrary bytes to the SIPREC recording server's decoders of what a recording client
//! sends: SIP message framing and parsing (and the recording server's state machine taking
//! what parsed: no panic, no session left once its timers ran out), (a whole message is at most `MAX_MESSAGE` and
//! framing never claims more than the buffer), the body splitter (under a multipart type with a boundary taken from the input, and
//! as a single part), the SDP offer reader (and the answer to what it read: one m-line for
//! every offered one), the SRTP decryptor (no state kept for what does not authenticate) and the RFC 7865 metadata reader. Nothing may panic, every part lies
//! within the body and there are at most `MAX_PARTS`, and metadata stays within its bounds.
#![no_main]

use edgerec::siprec::{message, metadata, mime, sdp, srs, srtp};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match message::frame(data) {
        Ok(message::Framed::Message(n)) => {
            assert!(n <= data.len() && n <= message::MAX_MESSAGE);
            let _ = message::parse(&data[..n]).map(|m| m.is_recording_session());
        }
        Ok(message::Framed::KeepAlive(n)) => assert!(n <= data.len()),
        _ => {}
    }
    if let Ok(m) = message::parse(data) {
        assert!(m.body.len() <= data.len());
        let _ = m.is_recording_session();
        let _ = message::response(&m, 200, "OK", Some("t"), &[], None);
        // The state machine takes it (twice: a retransmission) and its timers run out.
        let mut s = srs::Srs::new(
            srs::SrsConfig {
                advertise: std::net::Ipv4Addr::LOCALHOST.into(),
                contact: "sip:srs@127.0.0.1".into(),
                media_ports: (30000, 30009),
                max_sessions: 2,
                conversation_header: Some("X-Conversation-Id".into()),
                inactivity_ms: 1000,
            },
            Box::new(|b: &mut [u8]| b.fill(7)),
        );
        let peer = srs::Peer {
            addr: "192.0.2.1:5060".parse().expect("an address"),
            transport: srs::Transport::Udp,
            conn: None,
        };
        let _ = s.handle(0, peer, &m);
        let _ = s.handle(1, peer, &m);
        let _ = s.poll(100_000);
        assert_eq!(s.sessions(), 0, "every session ends by its timers");
    }
    // The first line is the boundary; the rest the body.
    let (boundary, body) = match data.iter().position(|b| *b == b'\n') {
        Some(n) => (
            String::from_utf8_lossy(&data[..n]).into_owned(),
            &data[n + 1..],
        ),
        None => ("b".to_string(), data),
    };
    let ct = format!("multipart/mixed; boundary=\"{boundary}\"");
    for parts in [mime::parts(Some(&ct), body), mime::parts(None, body)] {
        let Ok(parts) = parts else { continue };
        assert!(parts.len() <= mime::MAX_PARTS);
        for p in parts {
            let (start, end) = (body.as_ptr() as usize, body.as_ptr() as usize + body.len());
            let at = p.body.as_ptr() as usize;
            assert!(p.body.is_empty() || (at >= start && at + p.body.len() <= end));
            if let Ok(o) = sdp::parse_offer(p.body) {
                assert!(o.streams.len() <= sdp::MAX_STREAMS);
                let answered: Vec<sdp::Answered> = o
                    .streams
                    .iter()
                    .map(|s| match s.refusal() {
                        None => sdp::Answered::Taken {
                            port: 20000,
                            crypto: None,
                        },
                        Some(_) => sdp::Answered::Declined,
                    })
                    .collect();
                let a = sdp::answer(&o, &answered, std::net::Ipv4Addr::LOCALHOST.into(), (1, 1));
                assert_eq!(a.matches("\r\nm=").count(), o.streams.len());
            }
            if let Ok(m) = metadata::parse(p.body) {
                assert!(m.participants.len() <= metadata::MAX_ITEMS);
                assert!(m.streams.len() <= metadata::MAX_ITEMS);
                let _ = m.to_json();
            }
        }
    }
    // SRTP and SRTCP under a fixed key: refused, never a panic, state bounded.
    let key = sdp::Sdes {
        tag: 1,
        suite: sdp::Suite::Aes128Sha1_32,
        key: zeroize::Zeroizing::new([7u8; 30]),
    };
    if let Ok(mut rx) = srtp::SrtpIn::new(&key) {
        let _ = rx.rtp(data);
        let _ = rx.rtcp(data);
        assert!(rx.ssrcs() <= srtp::MAX_SSRCS);
    }
    if let Ok(mut m) = metadata::parse(data) {
        let update = m.clone();
        m.apply(update);
        assert!(m.sessions.len() <= metadata::MAX_ITEMS);
    }
});
