//! edgerec: the on-premises media tier of a contact-center recording system, built on the
//! package format of the [`erec`] crate (format, crypto, keys, writer, reader).
//!
//! The parts that need no async runtime and no network build without the default features,
//! so that the fuzz targets stay small:
//!
//! - `export` (feature `cli`): recordings decrypted into WAV, pcap or their original file.
//! - [`g711`]: µ-law and A-law to and from linear PCM.
//! - [`rtp`]: RTP and RTCP told apart and checked; sequence accounting (RFC 3550 A.1).
//! - [`session`]: the sans-IO recording state machine (ports, streams, chunks, timers).
//! - [`spool`]: the spool directories, package files, upload state and crash recovery.
//! - [`store`]: the store interface, object keys, and the `dir` store; `s3` (feature
//!   `appliance`): the S3 store (SigV4). The one `unsafe` block of the crate maps a spool
//!   package for upload (`s3::map`); everything else is safe code (`deny(unsafe_code)`).
//! - `loadgen` (feature `appliance`): paced G.711 test streams; `replay` (feature `pcap`, part of `cli`): a
//!   pcap capture sent again with its own timing.
//! - `ingest`, `recorder`, `uploader`, `run` (feature `appliance`): the ingest thread (epoll,
//!   `recvmmsg`), the recorder and uploader threads, and `edgerec run`, which wires them.
//! - [`retry`]: the upload retry policy (which outcomes retry, backoff with full jitter).
//! - [`error`]: the error of the commands and the exit codes of the interface contract.
//! - `hardening` (feature `cli`): no core files, not dumpable — the first thing every
//!   process does.
//! - The key manager is the `edgerec-lkm` crate; the CLI's `lkm` commands drive it.
//!
//! What both services share (HTTPS servers and client, AWS signing, token buckets, durable
//! files) is in the `edgerec-net` crate.
//!
//! The command-line tools live behind the `cli` feature in [`cli`]; the appliance's
//! configuration (`config`) behind the `appliance` feature.
#![deny(unsafe_code)]
#![warn(missing_docs)]

#[cfg(feature = "appliance")]
pub mod bandwidth;
#[cfg(feature = "cli")]
pub mod bulk;
#[cfg(feature = "appliance")]
pub mod census;
#[cfg(feature = "cli")]
pub mod cli;
#[cfg(feature = "appliance")]
pub mod config;
#[cfg(feature = "appliance")]
pub mod control;
pub mod error;
#[cfg(feature = "cli")]
pub mod export;
pub mod g711;
#[cfg(feature = "cli")]
pub mod hardening;
#[cfg(feature = "appliance")]
pub mod http_store;
#[cfg(feature = "appliance")]
pub mod inbox;
#[cfg(feature = "appliance")]
pub mod ingest;
#[cfg(feature = "appliance")]
pub mod kek_fetch;
#[cfg(feature = "appliance")]
pub mod kek_watch;
#[cfg(feature = "appliance")]
pub mod loadgen;
#[cfg(feature = "appliance")]
pub mod metrics;
#[cfg(feature = "cli")]
pub mod pgp_out;
#[cfg(feature = "appliance")]
pub mod recorder;
#[cfg(feature = "pcap")]
pub mod replay;
pub mod retry;
pub mod rtp;
#[cfg(feature = "appliance")]
pub mod run;
#[cfg(feature = "appliance")]
pub mod s3;
pub mod session;
#[cfg(feature = "appliance")]
pub mod spool;
#[cfg(feature = "appliance")]
pub mod store;
#[cfg(feature = "appliance")]
pub mod uploader;

pub use error::Error;
