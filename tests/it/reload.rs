//! `SIGHUP` reloads the config while the appliance records: every key that needs no new
//! socket takes effect (`ingest.allow`, `[store]`, `[upload]`, `[keys]`, the control token,
//! `[log] level`); a change that needs new sockets, or a broken file, is refused with a line
//! naming why, and the running config stays.

use std::fs;
use std::net::UdpSocket;
use std::process::Command;

use erec::reader::{PackageReader, ReadMode};

use crate::appliance::{Appliance, rtp, wait_stored};
use crate::common::*;
use crate::control::control_addr;

/// A short call on `port` from loopback (it ends by idle timeout).
fn call(port: u16, ssrc: u32) {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..20u16 {
        s.send_to(&rtp(i, ssrc, 0x5a), ("127.0.0.1", port)).unwrap();
    }
}

/// A control API request's status with `token`.
fn status(addr: &str, port: u16, token: &str) -> u16 {
    reqwest::blocking::Client::new()
        .put(format!("http://{addr}/v1/ports/{port}/metadata"))
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(r#"{"conversation_id":"c-1"}"#)
        .send()
        .unwrap()
        .status()
        .as_u16()
}

fn edit(a: &Appliance, from: &str, to: &str) {
    let cfg = a.path("edgerec.toml");
    let text = fs::read_to_string(&cfg).unwrap();
    assert!(text.contains(from), "{from:?} not in the config");
    fs::write(&cfg, text.replacen(from, to, 1)).unwrap();
}

#[test]
fn sighup_applies_every_key_that_needs_no_new_socket_and_refuses_a_port_change() {
    let mut a = Appliance::prepare("\"10.0.0.0/8\"", "path = \"store\"", "");
    let token = a.path("control.token");
    fs::write(&token, "first-token-0123456789\n").unwrap();
    let cfg = a.path("edgerec.toml");
    let mut text = fs::read_to_string(&cfg).unwrap();
    text.push_str(&format!(
        "[control]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"{}\"\n[log]\nlevel = \"info\"\n",
        token.display()
    ));
    fs::write(&cfg, text).unwrap();
    a.spawn_logging_as_configured();
    let addr = control_addr(&a);

    // Before: loopback is not allowed; the first token is the one.
    call(a.base, 1);
    a.wait_metric(
        "edgerec_datagrams_rejected_total{reason=\"denied_source\"}",
        20.0,
    );
    assert_eq!(status(&addr, a.base, "first-token-0123456789"), 200);

    // Every reloadable key changed at once.
    edit(&a, "\"10.0.0.0/8\"", "\"127.0.0.0/8\"");
    edit(&a, "path = \"store\"", "path = \"store2\"");
    edit(&a, "test-kek.pub.pem", "other-kek.pub.pem");
    edit(&a, "retry_max_ms = 1000", "retry_max_ms = 2000");
    edit(&a, "level = \"info\"", "level = \"debug\"");
    fs::write(&token, "second-token-0123456789\n").unwrap();
    a.sighup();
    // A debug line: logged only once the new level is in force.
    a.wait_log("log level set from the config");
    let line = a.wait_log("config reloaded");
    for name in [
        "store",
        "upload",
        "keys",
        "ingest.allow",
        "control token",
        "log.level",
    ] {
        assert!(line.contains(&format!("\"{name}\"")), "{name}: {line}");
    }
    assert!(
        !line.contains("second-token"),
        "no secret in the log: {line}"
    );
    a.wait_metric("edgerec_config_reloads_total{reason=\"applied\"}", 1.0);

    // The token, the allow list, the store and the key are the new ones.
    assert_eq!(status(&addr, a.base, "first-token-0123456789"), 401);
    assert_eq!(status(&addr, a.base, "second-token-0123456789"), 200);
    assert_eq!(
        a.metric(&format!(
            "edgerec_kek_info{{kek_id=\"{}\"}}",
            public("other").id()
        )),
        1.0
    );
    call(a.base + 1, 2);
    let stored = wait_stored(&a.path("store2"), 1);
    let open = |names: &[&str]| {
        PackageReader::new(
            fs::File::open(&stored[0]).unwrap(),
            &ring(names),
            ReadMode::Strict,
        )
        .is_ok()
    };
    assert!(open(&["other"]), "sealed to the new key");
    assert!(!open(&["test"]), "not to the old one");

    // Refused: a port range needs new sockets; a broken file; the running config stays.
    let ports = format!("ports = \"{}-{}\"", a.base, a.base + 3);
    edit(
        &a,
        &ports,
        &format!("ports = \"{}-{}\"", a.base, a.base + 5),
    );
    a.sighup();
    let line = a.wait_log("config reload refused");
    assert!(line.contains("ingest.ports"), "{line}");
    edit(&a, "[store]", "[store");
    a.sighup();
    let line = a.wait_log("config reload refused");
    assert!(line.contains("edgerec.toml"), "{line}");
    a.wait_metric("edgerec_config_reloads_total{reason=\"refused\"}", 2.0);
    call(a.base + 2, 3);
    wait_stored(&a.path("store2"), 2);
    assert_eq!(status(&addr, a.base, "second-token-0123456789"), 200);
    a.sigterm();
}

#[test]
fn a_reload_changes_the_retry_policy_of_the_next_attempt() {
    // A store that fails every put (its year directory is a file): retried forever.
    let mut a = Appliance::prepare("\"127.0.0.0/8\"", "path = \"store\"", "");
    let year = Command::new("date").args(["-u", "+%Y"]).output().unwrap();
    let year = String::from_utf8(year.stdout).unwrap();
    fs::create_dir_all(a.path("store")).unwrap();
    fs::write(a.path("store").join(year.trim()), b"not a directory").unwrap();
    a.spawn();
    call(a.base, 1);
    a.wait_metric("edgerec_uploads_total{outcome=\"retry\"}", 2.0);
    assert_eq!(fs::read_dir(a.path("spool/failed")).unwrap().count(), 0);
    // Reloaded with a bound on attempts: the next one gives up, to failed/.
    edit(
        &a,
        "retry_max_ms = 1000",
        "retry_max_ms = 1000\nmax_attempts = 1",
    );
    a.sighup();
    a.wait_log("config reloaded");
    a.wait_metric("edgerec_uploads_total{outcome=\"failed\"}", 1.0);
    assert!(
        fs::read_dir(a.path("spool/failed"))
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().ends_with(".erec"))
    );
    a.sigterm();
}
