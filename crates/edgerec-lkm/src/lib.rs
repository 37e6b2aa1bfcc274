//! edgerec's Local Key Manager: the organisation's RSA key pairs, kept on its own machine,
//! apart from the recorders. Recorders fetch public keys from it; only credentials with the
//! `decrypt` role get a data key unwrapped. The modules:
//!
//! - [`roles`]: who may do what (pure).
//! - [`at_rest`]: private keys at rest (master key, encrypt-then-MAC) and the
//!   [`at_rest::Protector`] interface KMS implements too.
//! - [`keystore`]: generate, rotate, retire, destroy, back up and restore key pairs.
//! - [`audit`]: the keyed, hash-chained audit log and its group-commit writer.
//! - `manager` (feature `server`): the administrator's acts, with `lkm.toml` (its `config`)
//!   and the Hawk `credentials` file; `at_rest`'s `kms` protection.
//! - `server` (feature `server`): the HTTPS contract (axum, rustls, Hawk via its
//!   `hawk_auth`), the unwrap `oracle`, and the service's `metrics` (private to it).
//! - `client` (feature `client`): what recorders and `open`/`export --lkm` use.
//!
//! It depends on the package format (`erec`) and the shared service plumbing
//! (`edgerec-net`), never on the appliance or its stores.
// Tests unwrap: a failed unwrap is the test's report (the workspace denies it elsewhere).
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod at_rest;
pub mod audit;
#[cfg(feature = "client")]
pub mod client;
pub mod keystore;
#[cfg(feature = "server")]
pub mod manager;
pub mod roles;
#[cfg(feature = "server")]
pub mod server;
