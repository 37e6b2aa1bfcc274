//! The deployment files: the systemd unit is accepted by `systemd-analyze verify` and keeps
//! the hardening the security invariants rely on; the alert rules pass `promtool`'s checks
//! and unit tests and each names a runbook section that exists; the dashboard and the rules
//! query only metric families the appliance and the key manager expose, and every family they
//! expose is on a panel or a rule (or listed as left out, with the reason).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::process::Command;

use crate::appliance::Appliance;
use crate::common::repo_path;

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
            // The packet ring's capability and nothing else (docs/threat-model.md).
            "CapabilityBoundingSet=CAP_NET_RAW\n",
            "AmbientCapabilities=CAP_NET_RAW\n",
            "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_PACKET\n",
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
            "CapabilityBoundingSet=\n",
            "AmbientCapabilities=\n",
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

/// The metric families a `/metrics` text declares, with their types (its `# TYPE` lines).
fn families(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some((w.next()?.to_string(), w.next()?.to_string()))
        })
        .collect()
}

/// Every `edgerec_…` name in `text` (a PromQL expression, a rules file).
fn names_in(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("edgerec_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

/// The family a queried series name is a series of, if one of `exposed` is it: a gauge by
/// its name, a counter by its `_total`, a histogram by its `_bucket`, `_sum` or `_count` (a
/// counter queried by its bare family name would find no series).
fn family_of(name: &str, exposed: &BTreeMap<String, String>) -> Option<String> {
    let suffixes: &[(&str, &str)] = &[
        ("", "gauge"),
        ("", "info"),
        ("_total", "counter"),
        ("_bucket", "histogram"),
        ("_sum", "histogram"),
        ("_count", "histogram"),
    ];
    suffixes.iter().find_map(|(suffix, kind)| {
        let family = name.strip_suffix(suffix)?;
        (exposed.get(family).map(String::as_str) == Some(*kind)).then(|| family.to_string())
    })
}

/// Every PromQL expression of the dashboard: its panels' targets and its variables' queries.
fn dashboard_queries(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr" | "definition" | "query", serde_json::Value::String(s)) => {
                        out.push(s.clone())
                    }
                    _ => dashboard_queries(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| dashboard_queries(v, out)),
        _ => {}
    }
}

#[test]
fn the_alert_rules_pass_promtool_and_fire_as_their_tests_say() {
    let dir = repo_path("deploy/prometheus");
    for args in [
        ["check", "rules", "edgerec-rules.yml"],
        ["test", "rules", "edgerec-rules.test.yml"],
    ] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("promtool (Debian's prometheus) is installed by the test command");
        assert!(
            out.status.success(),
            "promtool {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Every alert says how bad it is, what happened, and where its runbook is — a section
    // of the operations docs that exists.
    let rules = fs::read_to_string(dir.join("edgerec-rules.yml")).unwrap();
    let ops = fs::read_to_string(repo_path("docs/operations.md")).unwrap();
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert!(alerts.len() >= 15, "{alerts:?}");
    let runbooks: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("runbook: docs/operations.md#"))
        .collect();
    assert_eq!(runbooks.len(), alerts.len(), "a runbook for each alert");
    for anchor in runbooks {
        assert!(
            ops.lines().any(|l| l
                .strip_prefix("### ")
                .is_some_and(|h| h.to_lowercase() == anchor)),
            "docs/operations.md has no section for #{anchor}"
        );
    }
    for key in ["severity: ", "summary: "] {
        assert_eq!(
            rules.lines().filter(|l| l.trim().starts_with(key)).count(),
            alerts.len(),
            "every alert has a {key}"
        );
    }
}

#[test]
fn the_dashboard_and_the_rules_query_what_the_services_expose_and_show_all_of_it() {
    let mut a = Appliance::prepare("\"127.0.0.0/8\"", "path = \"store\"", "");
    a.spawn();
    let (code, appliance) = a.get("/metrics");
    assert_eq!(code, 200);
    let lkm = crate::lkm::Service::start_with("metrics_listen = \"127.0.0.1:0\"");
    let key_manager = crate::lkm::service_metrics(&lkm);
    let exposed: BTreeMap<String, String> = families(&appliance)
        .into_iter()
        .chain(families(&key_manager))
        .collect();
    assert!(
        exposed.contains_key("edgerec_ready") && exposed.contains_key("edgerec_lkm_unwraps"),
        "{exposed:?}"
    );
    let dashboard: serde_json::Value =
        serde_json::from_slice(&fs::read(repo_path("deploy/grafana/edgerec.json")).unwrap())
            .unwrap();
    let mut queries = Vec::new();
    dashboard_queries(&dashboard, &mut queries);
    assert!(queries.len() > 20, "{queries:?}");
    let rules = fs::read_to_string(repo_path("deploy/prometheus/edgerec-rules.yml")).unwrap();
    let mut used = BTreeSet::new();
    for name in queries
        .iter()
        .flat_map(|q| names_in(q))
        .chain(names_in(&rules))
    {
        match family_of(&name, &exposed) {
            Some(f) => {
                used.insert(f);
            }
            None => panic!(
                "{name} is queried but neither service exposes it (as a series of its family's type)"
            ),
        }
    }
    let left_out: BTreeSet<String> =
        fs::read_to_string(repo_path("deploy/grafana/not-on-dashboard.txt"))
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .filter_map(|l| l.split(':').next())
            .map(|f| f.trim().to_string())
            .collect();
    for f in exposed.keys() {
        assert!(
            used.contains(f) || left_out.contains(f),
            "{f} is exposed but on no panel or rule, and not in deploy/grafana/not-on-dashboard.txt"
        );
    }
}
