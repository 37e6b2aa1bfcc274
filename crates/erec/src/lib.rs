//! EREC v1: the envelope-encrypted recording package, as edgerec writes it and any reader
//! of the format (the platform's decryptor, a second implementation) checks it.
//!
//! No async runtime, no network, no file system beyond the key files a caller names: what
//! a reader of the format needs and nothing else. The modules, from the bottom up:
//!
//! - [`format`](mod@format): the package layout, its limits and keyless structural checks (the
//!   specification is in that module's documentation).
//! - [`crypto`]: data keys, HKDF key derivation, the header MAC and the chunk cipher.
//! - [`keys`]: RSA key-encryption keys (PEM forms, kek ids, DEK sealing) and the
//!   [`keys::Unwrapper`] interface through which readers get a DEK back.
//! - [`writer`] and [`reader`]: streaming sealing and opening, bounded in memory, parallel
//!   across cores through [`pipeline`], the ordered parallel map both use.
//! - [`entries`]: the media plaintext of an `rtp` recording (stream, RTP, event, RTCP).
//! - [`recover`]: keyless crash recovery (a torn tail cut at the last whole record).
//! - [`clock`]: unix milliseconds and UTC calendar dates.
//! - [`error`]: the one error type of reading and writing packages.
//!
//! The types most callers need are re-exported here: [`Sealer`] and [`seal_stream`] to
//! write, [`open_stream`] and [`PackageReader`] to read, the keys ([`KekPublic`],
//! [`KekPrivate`], [`KeyRing`], [`Unwrapper`]) and [`Error`].
//!
//! Feature `aws-lc`: unwraps and key generation through aws-lc-rs (constant-time OAEP,
//! fast key generation) instead of the pure-Rust `rsa` crate.
// Tests unwrap: a failed unwrap is the test's report (the workspace denies it elsewhere).
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod clock;
pub mod crypto;
pub mod entries;
pub mod error;
pub mod format;
pub mod keys;
pub mod pipeline;
pub mod reader;
pub mod recover;
pub mod writer;

pub use error::Error;
// The surface most readers and writers of the format need, without knowing its modules.
pub use keys::{KekId, KekPrivate, KekPublic, KeyRing, Unwrapper};
pub use reader::{PackageReader, ReadMode, open_stream};
pub use writer::{Media, SealOptions, Sealer, seal_stream};
