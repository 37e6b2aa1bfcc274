//! `edgerec lkm init|rotate|keys|credentials|backup|restore`: the key manager administrator's
//! acts, each written to its audit log. None prints or writes a private key in the clear.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::Error;
use crate::lkm::{Lkm, LkmConfig};

fn open(config: &Path, init: bool) -> Result<Lkm, Error> {
    let cfg = LkmConfig::load(config).map_err(Error::Invalid)?;
    Lkm::open(cfg, init).map_err(Error::Invalid)
}

fn failed(e: impl std::fmt::Display) -> Error {
    Error::Invalid(e.to_string())
}

/// `edgerec lkm init`.
pub fn init(config: &Path) -> Result<(), Error> {
    let mut lkm = open(config, true)?;
    if let Some(current) = lkm.store.current().map_err(failed)? {
        return Err(Error::Invalid(format!(
            "the key store {} is set up already (current key {}); use edgerec lkm rotate for a new key",
            lkm.config.store_dir.display(),
            current.id
        )));
    }
    let r = lkm.rotate("init").map_err(Error::Invalid)?;
    println!("{}", r.id);
    eprintln!(
        "edgerec: key store {} set up; its private keys are sealed under {} (keep a copy of that \
         file apart from the backups: without it no key opens)",
        lkm.config.store_dir.display(),
        lkm.config.master_key_file.display()
    );
    Ok(())
}

/// `edgerec lkm rotate`.
pub fn rotate(config: &Path) -> Result<(), Error> {
    let mut lkm = open(config, false)?;
    let r = lkm.rotate("rotate").map_err(Error::Invalid)?;
    println!("{}", r.id);
    Ok(())
}

/// `edgerec lkm keys`.
pub fn keys(config: &Path, json: bool) -> Result<(), Error> {
    let lkm = open(config, false)?;
    let all = lkm.store.list().map_err(failed)?;
    let current = lkm.store.current().map_err(failed)?.map(|r| r.id);
    if json {
        let v: Vec<_> = all
            .iter()
            .map(|r| {
                serde_json::json!({
                    "id": r.id,
                    "state": r.state,
                    "dateCreated": r.date_created,
                    "retiredAt": r.retired_at,
                    "destroyedAt": r.destroyed_at,
                    "current": current.as_deref() == Some(r.id.as_str()),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&v).expect("JSON values always serialize")
        );
        return Ok(());
    }
    println!("{:<66} {:<10} {:<25} CURRENT", "KEK ID", "STATE", "CREATED");
    for r in &all {
        let state = serde_json::to_value(r.state).expect("a state always serializes");
        println!(
            "{:<66} {:<10} {:<25} {}",
            r.id,
            state.as_str().unwrap_or_default(),
            crate::clock::Utc::from_unix_ms(r.date_created).rfc3339(),
            if current.as_deref() == Some(r.id.as_str()) {
                "*"
            } else {
                ""
            }
        );
    }
    Ok(())
}

/// `edgerec lkm credentials add`.
pub fn add_credential(config: &Path, id: &str, admin: bool) -> Result<(), Error> {
    let mut lkm = open(config, false)?;
    match crate::lkm::add_credential(&lkm.config.credentials_file, id, admin) {
        Ok(key) => {
            lkm.record(
                if admin {
                    "credentials.add_admin"
                } else {
                    "credentials.add"
                },
                None,
                "ok",
            )
            .map_err(Error::Invalid)?;
            println!("id: {id}\nkey: {}\nalgorithm: sha256", key.as_str());
            eprintln!(
                "edgerec: give this key to the client's configuration now; it is not shown again"
            );
            Ok(())
        }
        Err(e) => {
            lkm.record("credentials.add", None, "failed")
                .map_err(Error::Invalid)?;
            Err(Error::Invalid(e))
        }
    }
}

/// `edgerec lkm backup`.
pub fn backup(config: &Path, out: &Path) -> Result<(), Error> {
    let mut lkm = open(config, false)?;
    let bytes = lkm.store.backup().map_err(failed)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .map_err(|e| Error::Invalid(format!("{}: {e}", out.display())))?;
    f.write_all(&bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::Invalid(format!("{}: {e}", out.display())))?;
    lkm.record("backup", None, "ok").map_err(Error::Invalid)?;
    eprintln!(
        "edgerec: {} keys backed up to {} (sealed: restoring needs the master key too)",
        lkm.store.list().map_err(failed)?.len(),
        out.display()
    );
    Ok(())
}

/// `edgerec lkm restore`.
pub fn restore(config: &Path, backup: &Path) -> Result<(), Error> {
    let mut lkm = open(config, false)?;
    let bytes =
        std::fs::read(backup).map_err(|e| Error::Invalid(format!("{}: {e}", backup.display())))?;
    match lkm.store.restore(&bytes) {
        Ok(n) => {
            lkm.record("restore", None, "ok").map_err(Error::Invalid)?;
            eprintln!("edgerec: {n} keys restored from {}", backup.display());
            Ok(())
        }
        Err(e) => {
            lkm.record("restore", None, "failed")
                .map_err(Error::Invalid)?;
            Err(failed(e))
        }
    }
}

/// `edgerec lkm serve`.
pub fn serve(config: &Path) -> Result<(), Error> {
    super::appliance::init_logging();
    let cfg = LkmConfig::load(config).map_err(Error::Invalid)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Invalid(format!("cannot start the runtime: {e}")))?;
    runtime
        .block_on(crate::lkm_server::serve(cfg))
        .map_err(Error::Invalid)
}
