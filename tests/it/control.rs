//! The control API of `edgerec run`: conversation metadata and pause / resume for a port,
//! authenticated by a bearer token, with limits; a paused span is silence in the export.

use std::fs;
use std::path::Path;

use crate::appliance::{Appliance, files_with_ext, loadgen, wait_stored};
use crate::common::*;

const TOKEN: &str = "control-token-for-the-tests-0123456789";

/// 16-bit PCM samples of a WAV file, per channel (the layout `export` writes).
pub fn wav_channels(path: &Path) -> Vec<Vec<i16>> {
    let b = fs::read(path).unwrap();
    assert_eq!(&b[0..4], b"RIFF");
    let channels = usize::from(u16::from_le_bytes([b[22], b[23]]));
    assert_eq!(u32::from_le_bytes([b[24], b[25], b[26], b[27]]), 8000);
    let mut at = 12;
    while &b[at..at + 4] != b"data" {
        at += 8 + u32::from_le_bytes([b[at + 4], b[at + 5], b[at + 6], b[at + 7]]) as usize;
    }
    let data = &b[at + 8..];
    let mut out = vec![Vec::new(); channels];
    for (i, s) in data.chunks_exact(2).enumerate() {
        out[i % channels].push(i16::from_le_bytes([s[0], s[1]]));
    }
    out
}

fn rms(s: &[i16]) -> f64 {
    (s.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>() / s.len().max(1) as f64).sqrt()
}

/// Where the running appliance's control API listens (from its log).
pub fn control_addr(a: &Appliance) -> String {
    a.wait_log("control API listening")
        .split("control_addr=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap()
        .to_string()
}

#[test]
fn a_call_tagged_and_paused_through_the_control_api_exports_silence_over_the_pause() {
    let mut a = Appliance::prepare("\"127.0.0.0/8\"", "path = \"store\"", "");
    let token = a.path("control.token");
    fs::write(&token, format!("{TOKEN}\n")).unwrap();
    let cfg = a.path("edgerec.toml");
    let mut text = fs::read_to_string(&cfg).unwrap();
    text.push_str(&format!(
        "[control]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"{}\"\nmax_body_bytes = 1024\n",
        token.display()
    ));
    fs::write(&cfg, text).unwrap();
    a.spawn();
    let addr = control_addr(&a);
    let http = reqwest::blocking::Client::new();
    let call = |method: &str, path: &str, body: Option<String>, token: &str| {
        let mut r = http
            .request(
                reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
                format!("http://{addr}{path}"),
            )
            .bearer_auth(token);
        if let Some(b) = body {
            r = r.header("content-type", "application/json").body(b);
        }
        let r = r.send().unwrap();
        let code = r.status().as_u16();
        (
            code,
            serde_json::from_str::<serde_json::Value>(&r.text().unwrap()).unwrap_or_default(),
        )
    };
    let port = a.base;
    let tag = serde_json::json!({
        "conversation_id": "conv-42",
        "participants": [{"role": "agent", "id": "dana"}, {"role": "customer", "id": "+4930123"}],
    })
    .to_string();
    // Refused: no or a wrong token, a port that is not an ingest port, a body too large,
    // a body that is not an object.
    let meta = format!("/v1/ports/{port}/metadata");
    assert_eq!(call("PUT", &meta, Some(tag.clone()), "wrong").0, 401);
    assert_eq!(
        call("PUT", "/v1/ports/1/metadata", Some(tag.clone()), TOKEN).0,
        404
    );
    assert_eq!(call("PUT", &meta, Some("x".repeat(2000)), TOKEN).0, 413);
    assert_eq!(call("PUT", &meta, Some("[1]".into()), TOKEN).0, 400);
    // Tagged before the call: held for the recording that starts on the port.
    let (code, r) = call("PUT", &meta, Some(tag), TOKEN);
    assert_eq!((code, r["applied"].as_str()), (200, Some("next")), "{r}");
    let sender = std::thread::spawn(move || {
        loadgen(
            &format!("{port}-{port}"),
            &["--streams", "2", "--seconds", "5"],
        )
    });
    a.wait_metric("edgerec_rtp_packets_received_total", 100.0);
    let (code, r) = call("POST", &format!("/v1/ports/{port}/pause"), None, TOKEN);
    assert_eq!((code, r["applied"].as_str()), (200, Some("now")), "{r}");
    // About 1.5 s of both legs arrive while paused, and are not stored.
    a.wait_metric("edgerec_rtp_packets_paused_total", 150.0);
    let (code, r) = call("POST", &format!("/v1/ports/{port}/resume"), None, TOKEN);
    assert_eq!((code, r["applied"].as_str()), (200, Some("now")), "{r}");
    assert!(sender.join().unwrap().status.success());
    let stored = wait_stored(&a.path("store"), 1);
    a.sigterm();
    let out = a.path("export");
    let exported = edgerec(&[
        "export",
        "--key",
        key_path("test-kek.pem").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        stored[0].to_str().unwrap(),
    ]);
    assert!(
        exported.status.success(),
        "{}",
        String::from_utf8_lossy(&exported.stderr)
    );
    let wav = files_with_ext(&out, "wav");
    assert_eq!(wav.len(), 1);
    assert!(
        wav[0].to_str().unwrap().contains("conversation_id=conv-42"),
        "{}",
        wav[0].display()
    );
    // sox reads the WAV as the export layout says: 8 kHz, one channel per leg, 16-bit PCM.
    let info = std::process::Command::new("sox")
        .args(["--i", wav[0].to_str().unwrap()])
        .output()
        .expect("sox is installed by the test command");
    let info = String::from_utf8_lossy(&info.stdout);
    for want in [
        "Channels       : 2",
        "Sample Rate    : 8000",
        "16-bit",
        "Signed Integer PCM",
    ] {
        assert!(info.contains(want), "sox --i: {info}");
    }
    let meta_file = wav[0].with_file_name(format!(
        "{}_metadata.json",
        wav[0].file_stem().unwrap().to_str().unwrap()
    ));
    let m: serde_json::Value = serde_json::from_slice(&fs::read(meta_file).unwrap()).unwrap();
    assert_eq!(m["metadata"]["participants"][1]["id"], "+4930123", "{m}");
    let spans = m["paused"]
        .as_array()
        .expect("the paused span is in the metadata");
    assert_eq!(spans.len(), 1, "{m}");
    let (from, to) = (
        spans[0]["from_ms"].as_f64().unwrap(),
        spans[0]["to_ms"].as_f64().unwrap(),
    );
    // 150 paused packets are 1.5 s of both legs, or less where loadgen caught up after a
    // stall of a loaded machine.
    assert!(to - from >= 1000.0, "{from} .. {to}");
    // Silence over the pause, the tones right before and after it, on both legs. To within
    // 150 ms at each edge: a packet's place is its stream's first arrival plus its RTP
    // timestamp, and the pause's edges are on the recorder's clock, when it takes the
    // request; datagrams that arrived before it but are read after it (an ingest round, and
    // more on a loaded machine) keep their earlier place.
    let at = |ms: f64| (ms * 8.0) as usize;
    for (leg, samples) in wav_channels(&wav[0]).iter().enumerate() {
        let inside = &samples[at(from + 150.0)..at(to - 150.0)];
        assert!(
            inside.iter().all(|&s| s == 0),
            "leg {leg}: sound inside the pause"
        );
        let before = &samples[at(from - 500.0)..at(from - 150.0)];
        let after = &samples[at(to + 150.0)..at(to + 500.0)];
        assert!(rms(before) > 1000.0, "leg {leg}: the tone before the pause");
        assert!(rms(after) > 1000.0, "leg {leg}: the tone after the pause");
    }
}

#[test]
fn the_control_api_needs_tls_off_loopback_and_cuts_half_sent_requests() {
    use std::io::{Read, Write};
    let mut a = Appliance::prepare("\"127.0.0.0/8\"", "path = \"store\"", "");
    let token = a.path("control.token");
    fs::write(&token, format!("{TOKEN}\n")).unwrap();
    let cfg = a.path("edgerec.toml");
    let base = fs::read_to_string(&cfg).unwrap();
    let with = |control: &str| {
        fs::write(
            &cfg,
            format!(
                "{base}[control]\ntoken_file = \"{}\"\n{control}\n",
                token.display()
            ),
        )
        .unwrap()
    };
    // The bearer token would cross the network in the clear: refused at start.
    with("listen = \"0.0.0.0:0\"");
    let out = edgerec(&["run", "--config", cfg.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("control.listen") && err.contains("allow_plaintext"),
        "{err}"
    );
    // On loopback, a request head must arrive within header_read_timeout_secs.
    with("listen = \"127.0.0.1:0\"\nheader_read_timeout_secs = 1\nidle_timeout_secs = 2");
    a.spawn();
    let addr = control_addr(&a);
    let started = std::time::Instant::now();
    let mut half: Vec<_> = (0..10)
        .map(|_| {
            let mut c = std::net::TcpStream::connect(&addr).unwrap();
            c.set_read_timeout(Some(std::time::Duration::from_secs(15)))
                .unwrap();
            c.write_all(b"PUT /v1/ports/1/metadata HTTP/1.1\r\nHost: x\r\n")
                .unwrap();
            c
        })
        .collect();
    for c in &mut half {
        let mut b = [0u8; 64];
        assert!(matches!(c.read(&mut b), Ok(0) | Err(_)), "not cut");
    }
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    // A whole request is still answered.
    let r = reqwest::blocking::Client::new()
        .post(format!("http://{addr}/v1/ports/{}/pause", a.base))
        .bearer_auth(TOKEN)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    a.sigterm();
}
