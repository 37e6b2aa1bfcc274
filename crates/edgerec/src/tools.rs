//! Test traffic: `loadgen` (paced G.711 streams, feature `appliance`) and `replay` (a pcap
//! capture read and sent again with its own timing, feature `pcap`).

#[cfg(feature = "appliance")]
pub(crate) mod loadgen;
#[cfg(feature = "pcap")]
pub mod replay;
