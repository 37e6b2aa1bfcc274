//! `edgerec lkm init|rotate|keys|credentials|backup|restore|destroy|…`: the key manager
//! administrator's acts, each written to its audit log (synced before the command reports
//! success; `destroy` writes its line before the key goes). None prints or writes a private
//! key in the clear, and none prints a credential's key but `credentials add`, once.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::Error;
use edgerec_lkm::keystore::RestoreOptions;
use edgerec_lkm::manager::{Lkm, LkmConfig};
use edgerec_lkm::roles::Role;

fn open(config: &Path, init: bool) -> Result<Lkm, Error> {
    let cfg = LkmConfig::load(config).map_err(failed)?;
    Lkm::open(cfg, init).map_err(failed)
}

/// The key manager's typed errors end here, as the command's message (exit code 1).
fn failed(e: impl std::fmt::Display) -> Error {
    Error::Invalid(e.to_string())
}

/// `edgerec lkm init`.
pub fn init(config: &Path) -> Result<(), Error> {
    let mut lkm = open(config, true)?;
    if let Some(current) = lkm.store.current(erec::clock::now_ms()).map_err(failed)? {
        return Err(Error::Invalid(format!(
            "the key store {} is set up already (current key {}); use edgerec lkm rotate for a new key",
            lkm.config.store_dir.display(),
            current.id
        )));
    }
    let r = lkm.rotate("init").map_err(failed)?;
    println!("{}", r.id);
    match &lkm.config.protection {
        edgerec_lkm::manager::Protection::MasterKey(mk) => eprintln!(
            "edgerec: key store {} set up; its private keys are sealed under {} (keep a copy of \
             that file apart from the backups: without it no key opens)",
            lkm.config.store_dir.display(),
            mk.display()
        ),
        edgerec_lkm::manager::Protection::Kms(k) => eprintln!(
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
    let r = lkm.rotate("rotate").map_err(failed)?;
    println!("{}", r.id);
    Ok(())
}

/// `edgerec lkm keys`.
pub fn keys(config: &Path, json: bool) -> Result<(), Error> {
    // A read of the key store alone: it works while the audit log cannot be opened (a lost
    // key store, before its restore).
    let cfg = LkmConfig::load(config).map_err(failed)?;
    let store = Lkm::open_store(&cfg).map_err(failed)?;
    let all = store.list().map_err(failed)?;
    let current = store
        .current(erec::clock::now_ms())
        .map_err(failed)?
        .map(|r| r.id);
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
            erec::clock::Utc::from_unix_ms(r.date_created).rfc3339(),
            if current.as_deref() == Some(r.id.as_str()) {
                "*"
            } else {
                ""
            }
        );
    }
    Ok(())
}

/// `edgerec lkm credentials add [--role ROLE]`.
pub fn add_credential(config: &Path, id: &str, role: Role) -> Result<(), Error> {
    let mut lkm = open(config, false)?;
    match edgerec_lkm::manager::add_credential(&lkm.config.credentials_file, id, role) {
        Ok(key) => {
            lkm.record("credentials.add", None, &format!("ok: {id} as {role}"))
                .map_err(failed)?;
            println!("id: {id}\nkey: {}\nalgorithm: sha256", key.as_str());
            eprintln!(
                "edgerec: give this key to the client's configuration now; it is not shown again \
                 (role {role}: {})",
                role_use(role)
            );
            Ok(())
        }
        Err(e) => {
            lkm.record("credentials.add", None, "failed")
                .map_err(failed)?;
            Err(failed(e))
        }
    }
}

/// What a role is for, in a sentence.
fn role_use(role: Role) -> &'static str {
    match role {
        Role::Recorder => "public keys only, what a recording appliance holds",
        Role::Decrypt => "also unwraps data keys: playback, edgerec open and export --lkm",
        Role::Platform => "also makes key pairs: the platform's contract client",
        Role::Admin => "everything, issuing credentials through the API included",
    }
}

/// `edgerec lkm credentials list`: ids and roles, never keys.
pub fn list_credentials(config: &Path, json: bool) -> Result<(), Error> {
    let cfg = LkmConfig::load(config).map_err(failed)?;
    let all = edgerec_lkm::manager::list_credentials(&cfg.credentials_file).map_err(failed)?;
    if json {
        let v: Vec<_> = all
            .iter()
            .map(|(id, role)| {
                serde_json::json!({
                    "id": id,
                    "role": role.unwrap_or(Role::Platform),
                    "roleSet": role.is_some(),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&v).expect("JSON values always serialize")
        );
        return Ok(());
    }
    println!("{:<40} ROLE", "ID");
    for (id, role) in &all {
        match role {
            Some(r) => println!("{id:<40} {r}"),
            None => println!(
                "{id:<40} platform (no role set: it can decrypt; edgerec lkm credentials \
                 set-role {id} ROLE)"
            ),
        }
    }
    Ok(())
}

/// `edgerec lkm credentials set-role ID ROLE`.
pub fn set_role(config: &Path, id: &str, role: Role) -> Result<(), Error> {
    let mut lkm = open(config, false)?;
    match edgerec_lkm::manager::set_role(&lkm.config.credentials_file, id, role) {
        Ok(before) => {
            let was = before.map_or("unset (platform)".to_string(), |r| r.to_string());
            lkm.record(
                "credentials.set_role",
                None,
                &format!("ok: {id} from {was} to {role}"),
            )
            .map_err(failed)?;
            eprintln!(
                "edgerec: credential {id}: role {role} (was {was}); a running service applies it \
                 within 2 s"
            );
            Ok(())
        }
        Err(e) => Err(failed(e)),
    }
}

/// `edgerec lkm credentials remove`.
pub fn remove_credential(config: &Path, id: &str) -> Result<(), Error> {
    let mut lkm = open(config, false)?;
    match edgerec_lkm::manager::remove_credential(&lkm.config.credentials_file, id) {
        Ok(()) => {
            lkm.record("credentials.remove", None, &format!("ok: {id}"))
                .map_err(failed)?;
            eprintln!("edgerec: credential {id} removed; a running service refuses it within 2 s");
            Ok(())
        }
        Err(e) => Err(failed(e)),
    }
}

/// `edgerec lkm backup`.
pub fn backup(config: &Path, out: &Path) -> Result<(), Error> {
    let mut lkm = open(config, false)?;
    let bytes = lkm.store.backup(erec::clock::now_ms()).map_err(failed)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .map_err(|e| Error::Invalid(format!("{}: {e}", out.display())))?;
    f.write_all(&bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::Invalid(format!("{}: {e}", out.display())))?;
    lkm.record("backup", None, "ok").map_err(failed)?;
    eprintln!(
        "edgerec: {} keys backed up to {} (sealed, under a MAC: restoring needs the master key \
         or KMS key too)",
        lkm.store.list().map_err(failed)?.len(),
        out.display()
    );
    Ok(())
}

/// `edgerec lkm restore [--accept-unauthenticated] [--undestroy KEKID] FILE`. The key
/// store is restored first and the audit log opened after: in KMS mode the backup may bring
/// back the integrity key that keys the log.
pub fn restore(
    config: &Path,
    backup: &Path,
    accept_unauthenticated: bool,
    undestroy: Option<&str>,
) -> Result<(), Error> {
    let cfg = LkmConfig::load(config).map_err(failed)?;
    let store = Lkm::open_store(&cfg).map_err(failed)?;
    let bytes =
        std::fs::read(backup).map_err(|e| Error::Invalid(format!("{}: {e}", backup.display())))?;
    let opts = RestoreOptions {
        accept_unauthenticated,
    };
    let now = erec::clock::now_ms();
    if let Some(id) = undestroy {
        let done = store.undestroy(&bytes, id, opts, now);
        drop(store);
        let mut lkm = Lkm::open(cfg, false).map_err(failed)?;
        return match done {
            Ok(r) => {
                lkm.record("restore.undestroy", Some(&r.id), "ok: retired")
                    .map_err(failed)?;
                eprintln!(
                    "edgerec: {id} brought back from {} as retired: it decrypts what was sealed \
                     to it and is never current again",
                    backup.display()
                );
                Ok(())
            }
            Err(e) => {
                lkm.record("restore.undestroy", Some(id), "failed")
                    .map_err(failed)?;
                Err(failed(e))
            }
        };
    }
    let done = store.restore(&bytes, opts, now);
    drop(store);
    let mut lkm = Lkm::open(cfg, false).map_err(failed)?;
    match done {
        Ok(done) => {
            let what = format!(
                "ok: {} written, {} retired, {} newer here{}",
                done.written,
                done.retired.len(),
                done.kept_newer.len(),
                if done.unauthenticated {
                    ", WITHOUT a MAC (--accept-unauthenticated)"
                } else {
                    ""
                }
            );
            lkm.record("restore", None, &what).map_err(failed)?;
            eprintln!(
                "edgerec: {} keys restored from {}",
                done.written,
                backup.display()
            );
            for id in &done.retired {
                eprintln!(
                    "edgerec: {id} restored as retired: newer than the current key, which a \
                     restore never changes"
                );
            }
            for id in &done.kept_newer {
                eprintln!(
                    "edgerec: {id} kept as it is here (retired or destroyed since the backup)"
                );
            }
            Ok(())
        }
        Err(e) => {
            lkm.record("restore", None, "failed").map_err(failed)?;
            Err(failed(e))
        }
    }
}

/// `edgerec lkm import PRIV.pem`.
pub fn import(config: &Path, key: &Path) -> Result<(), Error> {
    let mut lkm = open(config, false)?;
    let private = erec::keys::KekPrivate::from_file(key)?;
    match lkm.store.import(&private, erec::clock::now_ms()) {
        Ok(r) => {
            lkm.record("import", Some(&r.id), "ok").map_err(failed)?;
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
                .map_err(failed)?;
            Err(failed(e))
        }
    }
}

/// `edgerec lkm retire KEKID`.
pub fn retire(config: &Path, id: &str) -> Result<(), Error> {
    let mut lkm = open(config, false)?;
    match lkm.store.retire(id, erec::clock::now_ms()) {
        Ok(r) => {
            lkm.record("retire", Some(&r.id), "ok").map_err(failed)?;
            eprintln!(
                "edgerec: {} retired: no new recordings are sealed to it; it still decrypts",
                r.id
            );
            if lkm
                .store
                .current(erec::clock::now_ms())
                .map_err(failed)?
                .is_none()
            {
                eprintln!(
                    "edgerec: warning: no active key remains; recorders keep their cached key \
                     until edgerec lkm rotate makes a new one"
                );
            }
            Ok(())
        }
        Err(e) => {
            lkm.record("retire", Some(id), "failed").map_err(failed)?;
            Err(failed(e))
        }
    }
}

/// What `edgerec lkm destroy` is told.
pub struct DestroyArgs<'a> {
    /// The appliance config whose store is counted.
    pub store_config: &'a Path,
    /// The kek id.
    pub id: &'a str,
    /// Destroy without asking (after the count is shown).
    pub yes: bool,
    /// Destroy even though recordings sealed to the key alone remain, or the store could
    /// not be counted whole.
    pub force: bool,
    /// Where to write the ids of the recordings sealed to the key alone.
    pub list: Option<&'a Path>,
}

/// `edgerec lkm destroy KEKID --store-config FILE [--yes] [--force] [--list FILE]`: counts
/// the recordings in the store sealed to the key, refuses while some are sealed to it alone
/// (or the count is incomplete) unless forced, then destroys it only when confirmed.
pub fn destroy(config: &Path, args: DestroyArgs) -> Result<(), Error> {
    use std::io::IsTerminal;
    let id = args.id;
    let mut lkm = open(config, false)?;
    let record = lkm.store.get(id).map_err(failed)?;
    if record.state == edgerec_lkm::keystore::KeyState::Destroyed {
        return Err(Error::Invalid(format!("{id} is destroyed already")));
    }
    let kek = erec::keys::KekId::from_hex(id)
        .ok_or_else(|| Error::Invalid(format!("{id}: not a kek id")))?;
    let appliance = crate::appliance::config::Config::load(args.store_config)
        .map_err(|e| Error::Invalid(e.to_string()))?;
    eprintln!("edgerec: reading the headers of every package in the store ...");
    let gone: Vec<erec::keys::KekId> = lkm
        .store
        .list()
        .map_err(failed)?
        .iter()
        .filter(|r| r.state == edgerec_lkm::keystore::KeyState::Destroyed)
        .filter_map(|r| erec::keys::KekId::from_hex(&r.id))
        .collect();
    let blocker =
        match crate::store::census::count(&appliance.store, &appliance.prefix, &kek, &gone) {
            Ok(c) => {
                println!(
                    "{} of {} recordings in the store are sealed to {id}; {} of them to this key \
                 alone (or besides it only to keys destroyed already).",
                    c.sealed_to, c.packages, c.only_to
                );
                if c.skipped > 0 {
                    println!(
                        "{} other objects in the store were not read (not *.erec, or not regular \
                     files)",
                        c.skipped
                    );
                }
                for (key, why) in &c.unreadable {
                    println!("not counted, unreadable: {key}: {why}");
                }
                if let Some(list) = args.list {
                    let mut text = c.only_ids.join("\n");
                    if !text.is_empty() {
                        text.push('\n');
                    }
                    edgerec_net::durable::replace_file(list, text.as_bytes())
                        .map_err(|e| Error::Invalid(format!("{}: {e}", list.display())))?;
                    println!(
                        "the ids of those {} recordings are in {}",
                        c.only_to,
                        list.display()
                    );
                }
                println!(
                    "WARNING: destroying the key makes those {} recordings unreadable for ever, \
                 by anyone. A backup made before (edgerec lkm backup) still holds it.",
                    c.only_to
                );
                if c.only_to > 0 {
                    Some(format!(
                        "{} recordings are sealed to this key alone (delete them first: --list \
                     FILE names them)",
                        c.only_to
                    ))
                } else if !c.unreadable.is_empty() {
                    Some(format!(
                        "{} objects in the store could not be read, so the count is incomplete",
                        c.unreadable.len()
                    ))
                } else {
                    None
                }
            }
            Err(why) => {
                println!(
                    "the store could not be counted ({why}).\nWARNING: every recording sealed to \
                 {id} alone becomes unreadable for ever."
                );
                Some(format!("the store could not be counted ({why})"))
            }
        };
    if let Some(why) = &blocker
        && !args.force
    {
        lkm.record("destroy", Some(id), "refused: recordings remain")
            .map_err(failed)?;
        return Err(Error::Invalid(format!(
            "not destroyed: {why}; --force destroys it all the same"
        )));
    }
    let confirmed = args.yes || {
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
            .map_err(failed)?;
        return Err(Error::Invalid(
            "not destroyed: confirm with --yes (or type the kek id) after reading the count".into(),
        ));
    }
    // On disk before the key goes: an irreversible act is never unaudited.
    lkm.record(
        "destroy",
        Some(id),
        if blocker.is_some() {
            "started (--force)"
        } else {
            "started"
        },
    )
    .map_err(failed)?;
    match lkm.store.destroy(id, erec::clock::now_ms()) {
        Ok(r) => {
            lkm.record("destroy", Some(&r.id), "ok").map_err(failed)?;
            eprintln!("edgerec: {id} destroyed; the key manager refuses it from its next request");
            Ok(())
        }
        Err(e) => {
            lkm.record("destroy", Some(id), "failed").map_err(failed)?;
            Err(failed(e))
        }
    }
}

/// `edgerec lkm verify-audit [--config lkm.toml] FILE`: the chain, and with the key manager's
/// config every line's MAC under its audit key and the keying point its key store records.
pub fn verify_audit(config: Option<&Path>, file: &Path) -> Result<(), Error> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| Error::Invalid(format!("{}: {e}", file.display())))?;
    let Some(config) = config else {
        let chain = edgerec_lkm::audit::verify(&text)?;
        let keyed = match chain.keyed_from {
            Some(n) => format!(
                "keyed from line {n}; MACs not checked (give --config lkm.toml to check them)"
            ),
            None => "no keyed line; MACs not checked (give --config lkm.toml)".to_string(),
        };
        println!(
            "{}: {} lines, chain intact; {keyed}; last hash {}",
            file.display(),
            chain.next_seq,
            hex::encode(chain.last_hash)
        );
        return Ok(());
    };
    let cfg = LkmConfig::load(config).map_err(failed)?;
    let store = Lkm::open_store(&cfg).map_err(failed)?;
    let key = edgerec_lkm::manager::audit_key(store.protector().as_ref()).map_err(failed)?;
    let chain = edgerec_lkm::audit::verify_keyed(&text, Some(&key))?;
    // The keying point the key store records belongs to the live log; an archive (or a copy
    // elsewhere) is checked line by line only.
    let live = std::fs::canonicalize(file).ok() == std::fs::canonicalize(&cfg.audit_log).ok();
    let marker = if live {
        store.audit_marker().map_err(failed)?
    } else {
        None
    };
    if !live {
        let keyed = match chain.keyed_from {
            Some(n) => format!("MACs verified under the audit key from line {n}"),
            None => "no keyed line".to_string(),
        };
        println!(
            "{}: {} lines, chain intact; {keyed} (not the configured audit_log: its keying \
             point is not checked); last hash {}",
            file.display(),
            chain.next_seq,
            hex::encode(chain.last_hash)
        );
        return Ok(());
    }
    let keyed = match (marker, chain.keyed_from) {
        (Some(m), _) => {
            let seq = edgerec_lkm::audit::read_keying_marker(&key, &m).map_err(|e| {
                Error::Invalid(format!(
                    "the audit log's keying record in the key store: {e}"
                ))
            })?;
            edgerec_lkm::audit::check_keying(&chain, seq)?;
            match seq {
                0 => "every line's MAC verified under the audit key".to_string(),
                n => format!(
                    "MACs verified under the audit key from line {}, as the key store records; \
                     lines 1 to {n} were written before keying (hash chain only)",
                    n + 1
                ),
            }
        }
        (None, Some(n)) => {
            return Err(edgerec_lkm::audit::AuditError {
                line: n,
                why: "keyed, but the key store records no keying point".into(),
            }
            .into());
        }
        (None, None) => "no keyed line, and the key store records no keying point yet".into(),
    };
    println!(
        "{}: {} lines, chain intact; {keyed}; last hash {}",
        file.display(),
        chain.next_seq,
        hex::encode(chain.last_hash)
    );
    Ok(())
}

/// `edgerec lkm audit-archive`: the audit log (verified first) moved aside to
/// `<log>.<UTC time>`, and a new one started whose first line names the archive, its line
/// count and its last hash; the key store records keying from the new log's first line. Run
/// with the service stopped: a running one sees its log replaced and refuses audited requests
/// until it is started again (no line is lost either way).
pub fn audit_archive(config: &Path) -> Result<(), Error> {
    let lkm = open(config, false)?;
    let chain = lkm.audit.chain();
    let cfg = lkm.config.clone();
    drop(lkm);
    let log = &cfg.audit_log;
    let when = erec::clock::Utc::from_unix_ms(erec::clock::now_ms())
        .rfc3339()
        .replace([':', '-'], "")
        .replace('.', "");
    let name = log
        .file_name()
        .map_or_else(|| "audit".into(), |n| n.to_string_lossy().into_owned());
    let archive = log.with_file_name(format!("{name}.{when}"));
    if archive.exists() {
        return Err(Error::Invalid(format!(
            "{} exists already",
            archive.display()
        )));
    }
    std::fs::rename(log, &archive)
        .and_then(|()| edgerec_net::durable::sync_dir(log.parent().unwrap_or(Path::new("."))))
        .map_err(|e| Error::Invalid(format!("{}: {e}", log.display())))?;
    let store = Lkm::open_store(&cfg).map_err(failed)?;
    let key = edgerec_lkm::manager::audit_key(store.protector().as_ref()).map_err(failed)?;
    store
        .set_audit_marker(&edgerec_lkm::audit::keying_marker(&key, 0))
        .map_err(failed)?;
    drop(store);
    let mut lkm = Lkm::open(cfg, false).map_err(failed)?;
    lkm.record(
        "audit.archived",
        None,
        &format!(
            "continues {}: {} lines, last hash {}",
            archive.display(),
            chain.next_seq,
            hex::encode(chain.last_hash)
        ),
    )
    .map_err(failed)?;
    println!("{}", archive.display());
    eprintln!(
        "edgerec: the audit log was archived to {} ({} lines, last hash {}); a new log begins \
         with a line naming it",
        archive.display(),
        chain.next_seq,
        hex::encode(chain.last_hash)
    );
    Ok(())
}

/// `edgerec lkm serve`.
pub fn serve(config: &Path) -> Result<(), Error> {
    super::appliance::init_logging();
    let cfg = LkmConfig::load(config).map_err(failed)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Invalid(format!("cannot start the runtime: {e}")))?;
    runtime
        .block_on(edgerec_lkm::server::serve(cfg))
        .map_err(failed)
}
