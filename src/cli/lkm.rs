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
    match &lkm.config.protection {
        crate::lkm::Protection::MasterKey(mk) => eprintln!(
            "edgerec: key store {} set up; its private keys are sealed under {} (keep a copy of \
             that file apart from the backups: without it no key opens)",
            lkm.config.store_dir.display(),
            mk.display()
        ),
        crate::lkm::Protection::Kms(k) => eprintln!(
            "edgerec: key store {} set up; its private keys are sealed by KMS key {} (context \
             organisation={}): they open only while KMS grants Decrypt",
            lkm.config.store_dir.display(),
            k.key_id,
            k.organisation
        ),
    }
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

/// `edgerec lkm credentials remove`.
pub fn remove_credential(config: &Path, id: &str) -> Result<(), Error> {
    let mut lkm = open(config, false)?;
    match crate::lkm::remove_credential(&lkm.config.credentials_file, id) {
        Ok(()) => {
            lkm.record("credentials.remove", None, &format!("ok: {id}"))
                .map_err(Error::Invalid)?;
            eprintln!("edgerec: credential {id} removed; a running service refuses it within 2 s");
            Ok(())
        }
        Err(e) => Err(Error::Invalid(e)),
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

/// `edgerec lkm import PRIV.pem`.
pub fn import(config: &Path, key: &Path) -> Result<(), Error> {
    let mut lkm = open(config, false)?;
    let private = crate::keys::KekPrivate::from_file(key)?;
    match lkm.store.import(&private, crate::clock::now_ms()) {
        Ok(r) => {
            lkm.record("import", Some(&r.id), "ok")
                .map_err(Error::Invalid)?;
            println!("{}", r.id);
            eprintln!(
                "edgerec: imported and sealed in the key store; now delete {} (it is the \
                 current key for new recordings until the next rotation)",
                key.display()
            );
            Ok(())
        }
        Err(e) => {
            lkm.record("import", Some(&private.public().id().to_hex()), "failed")
                .map_err(Error::Invalid)?;
            Err(failed(e))
        }
    }
}

/// `edgerec lkm retire KEKID`.
pub fn retire(config: &Path, id: &str) -> Result<(), Error> {
    let mut lkm = open(config, false)?;
    match lkm.store.retire(id, crate::clock::now_ms()) {
        Ok(r) => {
            lkm.record("retire", Some(&r.id), "ok")
                .map_err(Error::Invalid)?;
            eprintln!(
                "edgerec: {} retired: no new recordings are sealed to it; it still decrypts",
                r.id
            );
            if lkm.store.current().map_err(failed)?.is_none() {
                eprintln!(
                    "edgerec: warning: no active key remains; recorders keep their cached key \
                     until edgerec lkm rotate makes a new one"
                );
            }
            Ok(())
        }
        Err(e) => {
            lkm.record("retire", Some(id), "failed")
                .map_err(Error::Invalid)?;
            Err(failed(e))
        }
    }
}

/// `edgerec lkm destroy KEKID --store-config FILE [--yes]`: shows how many recordings in
/// the store are sealed to the key, then destroys it only when confirmed.
pub fn destroy(config: &Path, store_config: &Path, id: &str, yes: bool) -> Result<(), Error> {
    use std::io::IsTerminal;
    let mut lkm = open(config, false)?;
    let record = lkm.store.get(id).map_err(failed)?;
    if record.state == crate::keystore::KeyState::Destroyed {
        return Err(Error::Invalid(format!("{id} is destroyed already")));
    }
    let kek = crate::keys::KekId::from_hex(id)
        .ok_or_else(|| Error::Invalid(format!("{id}: not a kek id")))?;
    let appliance =
        crate::config::Config::load(store_config).map_err(|e| Error::Invalid(e.to_string()))?;
    eprintln!("edgerec: reading the headers of every package in the store ...");
    match crate::census::count(&appliance.store, &appliance.prefix, &kek) {
        Ok(c) => {
            println!(
                "{} of {} recordings in the store are sealed to {id}; {} of them to this key \
                 alone.",
                c.sealed_to, c.packages, c.only_to
            );
            for (key, why) in &c.unreadable {
                println!("not counted, unreadable: {key}: {why}");
            }
            println!(
                "WARNING: destroying the key makes those {} recordings unreadable for ever, \
                 by anyone. A backup made before (edgerec lkm backup) still holds it.",
                c.only_to
            );
        }
        Err(why) => println!(
            "the store could not be counted ({why}).\nWARNING: every recording sealed to \
             {id} alone becomes unreadable for ever."
        ),
    }
    let confirmed = yes || {
        let stdin = std::io::stdin();
        if stdin.is_terminal() {
            eprint!("type the kek id to destroy it: ");
            let mut line = String::new();
            stdin.read_line(&mut line).is_ok() && line.trim() == id
        } else {
            false
        }
    };
    if !confirmed {
        lkm.record("destroy", Some(id), "not confirmed")
            .map_err(Error::Invalid)?;
        return Err(Error::Invalid(
            "not destroyed: confirm with --yes (or type the kek id) after reading the count".into(),
        ));
    }
    match lkm.store.destroy(id, crate::clock::now_ms()) {
        Ok(r) => {
            lkm.record("destroy", Some(&r.id), "ok")
                .map_err(Error::Invalid)?;
            eprintln!("edgerec: {id} destroyed; the key manager refuses it from its next request");
            Ok(())
        }
        Err(e) => {
            lkm.record("destroy", Some(id), "failed")
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
