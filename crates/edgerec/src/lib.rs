//! edgerec: the on-premises media tier of a contact-center recording system — RTP in,
//! envelope-encrypted packages out, delivered to a store with retry — built on the package
//! format of the [`erec`] crate, the key manager of `edgerec-lkm` and the service plumbing
//! of `edgerec-net`. The map, by subsystem:
//!
//! - [`media`]: RTP and RTCP told apart and checked, sequence accounting (RFC 3550 A.1),
//!   G.711. Sans-IO, no features needed.
//! - `appliance` (feature `appliance`): `edgerec run` — the sans-IO recording `session`
//!   (ports, admission, streams, chunks, timers), the `ingest` thread (a packet ring, or
//!   epoll and `recvmmsg`), the `recorder` and `uploader` threads, the `spool` (package
//!   files, upload state, crash recovery), the `inbox`, the `control` API, the key sources
//!   (`kek_watch`, `kek_fetch`), `metrics`, the TOML `config`, and `run`, which wires them.
//! - `store` (feature `appliance`): the store interface, object keys and the `dir` store;
//!   `s3` (SigV4, resumable multipart) and `http`; the upload `retry` policy and
//!   `bandwidth` limit; the key `census` of a store. The crate's `unsafe` code maps a
//!   spool package for upload (`store::wire`) and the datagram journal
//!   (`appliance::journal`), takes the descriptors a service manager passed
//!   (`appliance::service_manager`), and makes and reads the packet ring
//!   (`appliance::ingest::ring`, its `sys` module).
//! - `export` (feature `cli`): recordings decrypted into WAV, pcap or their original file;
//!   `bulk` export from files or a store, resumable; `pgp` outputs.
//! - [`tools`]: `loadgen` (paced G.711 test streams, feature `appliance`) and `replay` (a
//!   pcap capture sent again with its own timing, feature `pcap`).
//! - `cli` (feature `cli`): the `edgerec` command line, the key manager's commands among
//!   them; `hardening`, the first thing every process does (no core files, not dumpable).
//! - [`siprec`]: the recording server of SIPREC (RFC 7866): its sans-IO parts — SIP
//!   messages framed, read and answered (`message`), bodies split (`mime`), RFC 7865
//!   metadata read and merged (`metadata`), the SDP offer read and answered (`sdp`), the
//!   SIP state machine of dialogs, answers, refusals and timers (`srs`), SRTP legs
//!   decrypted (`srtp`). No features needed (fuzzed).
//! - [`package_files`]: the one walk that finds package files on disk (symlinks never
//!   followed), for export and the census.
//! - [`error`]: the error of the commands and the exit codes of the interface contract.
// Tests unwrap: a failed unwrap is the test's report (the workspace denies it elsewhere).
#![cfg_attr(test, allow(clippy::unwrap_used))]
#![deny(unsafe_code)]
#![warn(missing_docs)]
// An application crate: its map links the private modules it names, for its maintainers
// (`cargo doc --document-private-items`).
#![allow(rustdoc::private_intra_doc_links)]

#[cfg(feature = "appliance")]
pub mod appliance;
#[cfg(feature = "cli")]
pub mod cli;
pub mod error;
#[cfg(feature = "cli")]
pub(crate) mod export;
#[cfg(feature = "cli")]
pub(crate) mod hardening;
pub mod media;
#[cfg(any(feature = "cli", feature = "appliance"))]
pub(crate) mod package_files;
pub mod siprec;
#[cfg(feature = "appliance")]
pub mod store;
pub mod tools;

pub use error::Error;
