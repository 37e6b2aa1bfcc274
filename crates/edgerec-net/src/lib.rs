//! What edgerec's two services — the recording appliance (`crates/edgerec`) and the key
//! manager (`crates/edgerec-lkm`) — share, so that neither depends on the other:
//!
//! - [`config_text`]: where a value of a configuration file sits, for errors that name its
//!   line.
//! - [`durable`]: small files replaced whole and durably, directory syncs, the one way to
//!   make a temporary file, and the owner-only check of secret files.
//! - [`rate_limit`]: token buckets, one or one per key in a bounded map (pure).
//! - [`answers`]: what servers answer and clients are given, parsed without trust (fuzzed).
//! - `https` (feature `server`): the HTTP(S) servers' TLS configuration and the limits that
//!   hold whatever a client does; `metrics_http` serves a Prometheus registry with them.
//! - `client` (feature `client`): the one HTTPS client builder; `aws`: SigV4 signing and the
//!   one AWS credential resolver.
//!
//! Why a crate of its own rather than part of `erec`: everything here is about running a
//! service (sockets, TLS, files of state); `erec` is the package format alone, which another
//! reader of the format depends on without any of it.
// Tests unwrap: a failed unwrap is the test's report (the workspace denies it elsewhere).
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod answers;
#[cfg(feature = "client")]
pub mod aws;
#[cfg(feature = "client")]
pub mod client;
pub mod config_text;
pub mod durable;
#[cfg(feature = "server")]
pub mod https;
#[cfg(feature = "server")]
pub mod metrics_http;
pub mod rate_limit;
