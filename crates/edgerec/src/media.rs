//! Media: what RTP and RTCP datagrams are ([`rtp`]: told apart, checked, sequence
//! accounting as RFC 3550 A.1) and the G.711 codecs ([`g711`]). Pure functions, fuzzed.

pub mod g711;
pub mod rtp;
