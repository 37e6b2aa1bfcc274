//! The key manager's private-key operation: a sealed DEK in, the DEK out. Because the
//! service answers anyone holding a credential, this is a decryption oracle, and is built as
//! one: RSA-OAEP by aws-lc-rs (constant-time padding checks, OAEP labels), a single coarse
//! failure for every way an unwrap can go wrong, and opened keys kept in memory only for a
//! bounded time.
//!
//! Invariants:
//! - The state of a key is read from the store on every unwrap: a key destroyed by the
//!   administrator is refused (and dropped from memory) at the next request, not at the next
//!   start.
//! - An opened private key is kept at most `ttl`; after that it is opened again through the
//!   store's protector, so a KMS that withdraws access is obeyed within `ttl` (0 keeps
//!   nothing: every unwrap asks the protector).
//! - Private keys live in [`KekPrivate`] (the `rsa` crate's zeroizing key and aws-lc's copy,
//!   freed with `BN_clear_free`); the unwrap's output buffer is zeroized.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::at_rest::AtRestError;
use crate::keystore::{KeyState, KeyStore, KeyStoreError};
use erec::crypto::Dek;
use erec::format::Wrap;
use erec::keys::{KekId, KekPrivate};

/// Why an unwrap gave no DEK.
#[derive(Debug, thiserror::Error)]
pub enum OracleError {
    /// The store holds no key of that id.
    #[error("no such keypair")]
    Unknown,
    /// The key was destroyed.
    #[error("key destroyed")]
    Destroyed,
    /// The key's protection (a KMS) refused to open it: access was withdrawn.
    #[error("access revoked: {0}")]
    Revoked(String),
    /// The key's protection could not answer (a KMS unreachable), or opened nothing.
    #[error("key protection unavailable: {0}")]
    Unavailable(String),
    /// Anything about the sealed DEK itself: one answer whatever it was.
    #[error("decrypt failed")]
    Failed,
    /// The store could not be read.
    #[error("{0}")]
    Store(String),
}

struct Opened {
    key: Arc<KekPrivate>,
    at: Instant,
}

/// Unwraps DEKs with the store's keys.
pub struct Oracle {
    store: KeyStore,
    ttl: Duration,
    opened: Mutex<HashMap<KekId, Opened>>,
}

impl Oracle {
    /// An oracle over `store`, keeping opened keys for `ttl`.
    pub fn new(store: KeyStore, ttl: Duration) -> Oracle {
        Oracle {
            store,
            ttl,
            opened: Mutex::new(HashMap::new()),
        }
    }

    /// The store.
    pub fn store(&self) -> &KeyStore {
        &self.store
    }

    fn forget(&self, id: &KekId) {
        if let Ok(mut o) = self.opened.lock() {
            o.remove(id);
        }
    }

    fn key(&self, id: &KekId) -> Result<Arc<KekPrivate>, OracleError> {
        let now = Instant::now();
        if let Ok(mut o) = self.opened.lock() {
            o.retain(|_, k| now.duration_since(k.at) < self.ttl);
            if let Some(k) = o.get(id) {
                return Ok(Arc::clone(&k.key));
            }
        }
        let key = Arc::new(self.store.private(id).map_err(|e| match e {
            KeyStoreError::Unknown(_) => OracleError::Unknown,
            KeyStoreError::Destroyed(_) => OracleError::Destroyed,
            KeyStoreError::Protection(AtRestError::Revoked(why)) => OracleError::Revoked(why),
            KeyStoreError::Protection(e) => OracleError::Unavailable(e.to_string()),
            e => OracleError::Store(e.to_string()),
        })?);
        if !self.ttl.is_zero()
            && let Ok(mut o) = self.opened.lock()
        {
            o.insert(
                *id,
                Opened {
                    key: Arc::clone(&key),
                    at: now,
                },
            );
        }
        Ok(key)
    }

    /// Unwraps `sealed` with key `id` ([`KekPrivate::unseal`]: aws-lc-rs OAEP, constant
    /// time, with the wrap-1 label).
    pub fn unwrap(&self, id: &KekId, wrap: Wrap, sealed: &[u8]) -> Result<Dek, OracleError> {
        match self.store.get(&id.to_hex()) {
            Err(KeyStoreError::Unknown(_)) => return Err(OracleError::Unknown),
            Err(e) => return Err(OracleError::Store(e.to_string())),
            Ok(r) if r.state == KeyState::Destroyed => {
                self.forget(id);
                return Err(OracleError::Destroyed);
            }
            Ok(_) => {}
        }
        self.key(id)?
            .unseal(wrap, sealed)
            .map_err(|_| OracleError::Failed)
    }

    /// How many keys are open in memory now.
    #[cfg(test)]
    fn open_keys(&self) -> usize {
        self.opened.lock().map(|o| o.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::at_rest::{MasterKey, Protector};

    fn oracle(dir: &std::path::Path, ttl: Duration) -> (Oracle, erec::keys::KekPublic) {
        let store = KeyStore::open(dir, Arc::new(MasterKey::generate().unwrap())).unwrap();
        let r = store.generate(1_000).unwrap();
        let public = store.public(&r).unwrap();
        (Oracle::new(store, ttl), public)
    }

    #[test]
    fn both_wraps_unwrap_and_every_bad_input_is_one_answer() {
        let dir = tempfile::tempdir().unwrap();
        let (o, public) = oracle(dir.path(), Duration::from_secs(60));
        let dek = Dek::generate().unwrap();
        for wrap in [Wrap::OaepSha256, Wrap::OaepSha1] {
            let sealed = public.seal(&dek, wrap).unwrap();
            let got = o.unwrap(&public.id(), wrap, &sealed).unwrap();
            assert_eq!(got.expose(), dek.expose());
        }
        assert_eq!(o.open_keys(), 1, "opened once, kept");
        // The other wrap, a flipped byte, a short body: all "decrypt failed".
        let sealed = public.seal(&dek, Wrap::OaepSha256).unwrap();
        let mut flipped = sealed.clone();
        flipped[100] ^= 1;
        for (wrap, body) in [
            (Wrap::OaepSha1, &sealed[..]),
            (Wrap::OaepSha256, &flipped[..]),
            (Wrap::OaepSha256, &sealed[..10]),
            (Wrap::OaepSha256, &[][..]),
        ] {
            let e = o.unwrap(&public.id(), wrap, body).unwrap_err();
            assert!(matches!(e, OracleError::Failed), "{e}");
        }
        // A 48-byte secret wrapped correctly is not a DEK either.
        use rsa::pkcs1::DecodeRsaPublicKey;
        let rsa_pub = rsa::PublicKey::from_pkcs1_der(&public.to_pkcs1_der()).unwrap();
        let long = rsa_pub
            .encrypt(
                &mut getrandom::SysRng,
                rsa::oaep::Oaep::<sha1::Sha1>::new(),
                &[7u8; 48],
            )
            .unwrap();
        assert!(matches!(
            o.unwrap(&public.id(), Wrap::OaepSha1, &long),
            Err(OracleError::Failed)
        ));
        let other = KekId([9; 32]);
        assert!(matches!(
            o.unwrap(&other, Wrap::OaepSha1, &sealed),
            Err(OracleError::Unknown)
        ));
    }

    #[test]
    fn a_destroyed_key_is_refused_at_once_though_it_was_open() {
        let dir = tempfile::tempdir().unwrap();
        let (o, public) = oracle(dir.path(), Duration::from_secs(3600));
        let dek = Dek::generate().unwrap();
        let sealed = public.seal(&dek, Wrap::OaepSha256).unwrap();
        o.unwrap(&public.id(), Wrap::OaepSha256, &sealed).unwrap();
        o.store().destroy(&public.id().to_hex(), 2_000).unwrap();
        assert!(matches!(
            o.unwrap(&public.id(), Wrap::OaepSha256, &sealed),
            Err(OracleError::Destroyed)
        ));
        assert_eq!(o.open_keys(), 0, "dropped from memory");
    }

    /// A protector that can be told to refuse, as a KMS withdrawing access does.
    struct Switch(MasterKey, std::sync::atomic::AtomicBool);

    impl Protector for Switch {
        fn seal(&self, plain: &[u8], context: &str) -> Result<Vec<u8>, AtRestError> {
            self.0.seal(plain, context)
        }
        fn open(
            &self,
            blob: &[u8],
            context: &str,
        ) -> Result<zeroize::Zeroizing<Vec<u8>>, AtRestError> {
            if self.1.load(std::sync::atomic::Ordering::SeqCst) {
                self.0.open(blob, context)
            } else {
                Err(AtRestError::Revoked("DisabledException".into()))
            }
        }
        fn integrity_key(
            &self,
            purpose: &str,
        ) -> Result<zeroize::Zeroizing<[u8; 32]>, AtRestError> {
            self.0.integrity_key(purpose)
        }
    }

    #[test]
    fn without_a_cache_a_refusing_protector_is_obeyed_at_the_next_unwrap() {
        let dir = tempfile::tempdir().unwrap();
        let switch = Arc::new(Switch(
            MasterKey::generate().unwrap(),
            std::sync::atomic::AtomicBool::new(true),
        ));
        let store = KeyStore::open(dir.path(), Arc::clone(&switch) as Arc<dyn Protector>).unwrap();
        let public = store.public(&store.generate(1).unwrap()).unwrap();
        let o = Oracle::new(store, Duration::ZERO);
        let dek = Dek::generate().unwrap();
        let sealed = public.seal(&dek, Wrap::OaepSha256).unwrap();
        o.unwrap(&public.id(), Wrap::OaepSha256, &sealed).unwrap();
        switch.1.store(false, std::sync::atomic::Ordering::SeqCst);
        let e = o
            .unwrap(&public.id(), Wrap::OaepSha256, &sealed)
            .unwrap_err();
        assert!(
            matches!(e, OracleError::Revoked(ref w) if w.contains("Disabled")),
            "{e}"
        );
        switch.1.store(true, std::sync::atomic::Ordering::SeqCst);
        o.unwrap(&public.id(), Wrap::OaepSha256, &sealed).unwrap();
    }
}
