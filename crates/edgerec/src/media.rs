//! Media: what RTP and RTCP datagrams are ([`rtp`]: told apart, checked, sequence
//! accounting as RFC 3550 A.1), the G.711 codecs ([`g711`]), and the crash journal's ring
//! of received datagrams ([`journal`]). Pure functions, fuzzed.

pub mod g711;
pub mod journal;
pub mod rtp;
