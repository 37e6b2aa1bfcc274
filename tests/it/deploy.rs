//! The deployment files: the systemd unit is accepted by `systemd-analyze verify` and keeps
//! the hardening the security invariants rely on.

use crate::common::repo_path;
use std::fs;
use std::process::Command;

#[test]
fn the_systemd_unit_verifies_and_is_hardened() {
    verify(
        "edgerec.service",
        &[
            "DynamicUser=yes",
            "StateDirectory=edgerec\n",
            "LimitNOFILE=",
            "Type=notify\n",
            "Restart=always\n",
            "WatchdogSec=",
            "FileDescriptorStoreMax=",
        ],
    );
}

#[test]
fn the_key_managers_systemd_unit_verifies_and_is_hardened() {
    verify(
        "edgerec-lkm.service",
        &[
            "User=edgerec-lkm",
            "StateDirectory=edgerec-lkm\n",
            "lkm serve --config",
        ],
    );
}

/// The unit `name` verifies and has the hardening every unit needs, and `also`.
fn verify(name: &str, also: &[&str]) {
    let unit = repo_path("deploy").join(name);
    let text = fs::read_to_string(&unit).unwrap();
    for must in also.iter().copied().chain([
        "StateDirectoryMode=0700",
        "UMask=0077",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "LimitCORE=0",
        "KillSignal=SIGTERM",
        "MemoryDenyWriteExecute=yes",
        "CapabilityBoundingSet=\n",
    ]) {
        assert!(text.contains(must), "the unit lacks {must:?}");
    }
    // verify checks that ExecStart exists: point it at the binary under test.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join(name);
    fs::write(
        &copy,
        text.replace("/usr/local/bin/edgerec", env!("CARGO_BIN_EXE_edgerec")),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", copy.to_str().unwrap()])
        .output()
        .expect("systemd-analyze is installed by the test command");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
