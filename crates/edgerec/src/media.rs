//! Media: what RTP and RTCP datagrams are ([`rtp`]: told apart, checked, sequence
//! accounting as RFC 3550 A.1), the G.711 codecs ([`g711`]), and the crash journal's ring
//! of received datagrams ([`journal`]); the media types a recording may have
//! ([`MEDIA_TYPES`]). Pure functions, fuzzed.

pub mod g711;
pub mod journal;
pub mod rtp;

/// The media types a recording may have, as the platform names its conversations' media
/// (`media_type` in an inbox file's sidecar; a recorded call is a `call`).
pub const MEDIA_TYPES: [&str; 7] = [
    "call",
    "email",
    "chat",
    "message",
    "callback",
    "screen",
    "transcript",
];
