//! SIPREC (RFC 7866): edgerec as the recording server (SRS) session border controllers and
//! PBXs record to. docs/siprec.md lists what real recording clients send and which of their
//! quirks are handled.
//!
//! Its modules, sans-IO (pure functions of their input, tested on captured message bodies and
//! fuzzed):
//! - [`mime`]: a message body split into its parts (SDP, metadata, others), tolerant of what
//!   real clients send.
//! - [`metadata`]: RFC 7865 metadata read (no DTD, bounded) and merged as updates arrive.
//! - [`message`]: SIP messages framed, read (ezk's SIP types) and answered.
//! - [`sdp`]: the offer read stream by stream (ezk's SDP types), the answer written.
//! - [`srs`]: the recording server's SIP state machine: dialogs, answers, refusals, timers.
//! - [`srtp`]: SDES-keyed SRTP legs decrypted on arrival, with state bounded per stream.
//!
//! And the thin tokio layer around them (feature `appliance`): `transport`, the SIP sockets
//! (UDP and TCP) with their bounds.

pub mod message;
pub mod metadata;
pub mod mime;
pub mod sdp;
pub mod srs;
pub mod srtp;
#[cfg(feature = "appliance")]
pub mod transport;
