//! `edgerec run`: logging, the runtime and the signals around [`crate::appliance::run::run`].

use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;

use crate::appliance::config::Config;
use crate::appliance::reload::{ReloadFrom, SetLogLevel};

/// Logs to standard error at `EDGEREC_LOG` (info by default). Returns how to change the
/// level later (`[log] level`), unless `EDGEREC_LOG` is set: then it rules.
pub fn init_logging() -> Option<SetLogLevel> {
    let from_env = std::env::var_os("EDGEREC_LOG").is_some();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("EDGEREC_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_filter_reloading();
    let handle = builder.reload_handle();
    builder.init();
    (!from_env).then(|| {
        Box::new(move |level: &str| {
            let filter =
                tracing_subscriber::EnvFilter::try_new(level).map_err(|e| e.to_string())?;
            handle.reload(filter).map_err(|e| e.to_string())
        }) as SetLogLevel
    })
}

/// `edgerec check-config`: the config validated as `run` validates it, nothing started.
pub fn check_config(config: &Path) -> ExitCode {
    match Config::load(config) {
        Ok(c) => {
            let (first, last) = c.ports;
            println!("config {}: valid", config.display());
            println!(
                "  ingest ports {first}-{last}, spool {}",
                c.recorder.spool_dir.display()
            );
            if let Some(s) = &c.siprec {
                let (a, b) = s.media_ports;
                println!(
                    "  siprec on {} (tls: {}), media ports {a}-{b}, advertised as {}",
                    s.listen,
                    s.tls.as_ref().map_or("no".to_string(), |t| t.0.to_string()),
                    s.advertise
                );
            }
            if let Some(ctl) = &c.control {
                println!("  control API on {}", ctl.listen);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("edgerec: {e}");
            ExitCode::from(1)
        }
    }
}

/// Loads the config, starts the runtime, runs until SIGTERM or SIGINT; SIGHUP reloads.
pub fn run(path: &Path) -> ExitCode {
    let set_log_level = init_logging();
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("edgerec: {e}");
            return ExitCode::from(1);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("edgerec: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    return Err(crate::appliance::run::RunError::Start(format!(
                        "cannot watch SIGTERM: {e}"
                    )));
                }
            };
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        };
        let reload = ReloadFrom {
            path: path.to_path_buf(),
            set_log_level,
        };
        crate::appliance::run::run(config, reload, shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edgerec: {e}");
            ExitCode::from(1)
        }
    }
}

/// `edgerec loadgen`.
pub fn loadgen(
    target: &str,
    ports: &str,
    (streams, per_port): (usize, usize),
    seconds: f64,
    seed: u32,
    replay: Option<&std::path::Path>,
) -> Result<(), crate::Error> {
    use std::net::ToSocketAddrs;
    let invalid = |m: String| crate::Error::Invalid(m);
    // A range A-B, or a list P1,P2,… (ports a media server allocated).
    let list: Vec<u16> = if ports.contains(',') {
        ports
            .split(',')
            .map(|p| p.trim().parse::<u16>().ok().filter(|p| *p > 0))
            .collect::<Option<_>>()
            .ok_or_else(|| invalid(format!("--ports {ports}: not a list of ports P1,P2,…")))?
    } else {
        let (a, b) = crate::appliance::config::parse_ports(ports)
            .ok_or_else(|| invalid(format!("--ports {ports}: not a port range A-B")))?;
        (a..=b).collect()
    };
    let (first, last) = (
        *list.iter().min().expect("a range or list has a port"),
        *list.iter().max().expect("a range or list has a port"),
    );
    let ip = (target, first)
        .to_socket_addrs()
        .map_err(|e| invalid(format!("--target {target}: {e}")))?
        .next()
        .ok_or_else(|| invalid(format!("--target {target}: no address")))?
        .ip();
    if replay.is_some() && ports.contains(',') {
        return Err(invalid(
            "--replay takes a port range A-B, not a list".into(),
        ));
    }
    if let Some(file) = replay {
        let f = std::fs::File::open(file)
            .map_err(|e| invalid(format!("--replay {}: {e}", file.display())))?;
        let bad = |e: crate::tools::replay::ReplayError| {
            invalid(format!("--replay {}: {e}", file.display()))
        };
        let (datagrams, skipped) =
            crate::tools::replay::read(std::io::BufReader::new(f)).map_err(bad)?;
        let r = crate::tools::replay::Replay::new(datagrams, first, last).map_err(bad)?;
        let span = r.datagrams().last().map(|d| d.offset).unwrap_or_default();
        eprintln!(
            "loadgen: replaying {} datagrams ({} skipped: not UDP) of {} to {ip} over {:.1} s",
            r.datagrams().len(),
            skipped,
            file.display(),
            span.as_secs_f64()
        );
        let sent = r.run(ip)?;
        println!("sources {}", sent.sources);
        println!("packets_sent {}", sent.packets);
        println!("bytes_sent {}", sent.bytes);
        println!("send_errors {}", sent.errors);
        return Ok(());
    }
    if !(seconds > 0.0 && seconds.is_finite()) || streams == 0 {
        return Err(invalid("--streams and --seconds must be positive".into()));
    }
    let plan = crate::tools::loadgen::Plan::on(&list, streams, per_port, seed);
    eprintln!(
        "loadgen: {streams} streams of 20 ms PCMU to {ip} ports {first}-{last} for {seconds} s"
    );
    let r = crate::tools::loadgen::run(ip, &plan, seconds)?;
    println!("streams {streams}");
    println!("ticks {}", r.ticks);
    println!("packets_sent {}", r.packets);
    println!("bytes_sent {}", r.bytes);
    println!("send_errors {}", r.errors);
    println!("late_ticks {}", r.late_ticks);
    Ok(())
}

/// `edgerec identity show`: the appliance id and public key of the config's
/// `[identity] key_file`.
pub fn identity_show(config: &Path, json: bool) -> Result<(), crate::Error> {
    let c = Config::load(config).map_err(|e| crate::Error::Invalid(e.to_string()))?;
    let identity = crate::appliance::identity::Identity::load(&c.identity_key)
        .map_err(|e| crate::Error::Invalid(e.to_string()))?;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "appliance_id": identity.id(),
                "public_key_pem": identity.public_pem(),
            })
        );
    } else {
        // Text before the PEM block is allowed (RFC 7468, 5.2): the file stays a public key.
        print!("appliance id {}\n{}", identity.id(), identity.public_pem());
    }
    Ok(())
}
