//! What arrives on an ingest port: RTP and RTCP told apart and checked, and the sequence
//! accounting of one RTP stream. Pure functions of bytes (and, for [`SeqTracker`], of the
//! sequence numbers seen); no socket, no clock.
//!
//! Invariants:
//! - [`classify`] never panics and never allocates; it accepts a datagram only if every
//!   length inside it is consistent (RFC 3550 §5.1 and §6.4, RFC 5761 §4 for telling RTCP
//!   from RTP on one port: a second byte of 200 to 211 is RTCP).
//! - [`SeqTracker`] follows RFC 3550 appendix A.1: sequence numbers are extended to 32 bits
//!   across wrap-around, a jump of up to [`MAX_DROPOUT`] is a gap, a step back of up to
//!   [`MAX_MISORDER`] is reordering (or a duplicate, if seen), anything else is a stray
//!   packet until two in a row confirm a restart of the sender's sequence.

/// Why a datagram was not accepted; the label of `edgerec_datagrams_rejected_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reject {
    /// Shorter than any RTP or RTCP header.
    Short,
    /// Version field is not 2.
    Version,
    /// An RTP header whose CSRC count, extension or padding does not fit the datagram.
    MalformedRtp,
    /// An RTCP compound packet whose lengths do not add up.
    MalformedRtcp,
}

impl Reject {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Reject::Short => "short",
            Reject::Version => "version",
            Reject::MalformedRtp => "malformed_rtp",
            Reject::MalformedRtcp => "malformed_rtcp",
        }
    }
}

/// The fields of an RTP header that recording needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtpHeader {
    /// Payload type (0 PCMU, 8 PCMA, …).
    pub payload_type: u8,
    /// The marker bit.
    pub marker: bool,
    /// Sequence number.
    pub seq: u16,
    /// RTP timestamp.
    pub timestamp: u32,
    /// Synchronisation source.
    pub ssrc: u32,
    /// Offset of the payload in the datagram.
    pub payload_offset: usize,
    /// Length of the payload (padding excluded).
    pub payload_len: usize,
}

/// What an RTCP compound packet says that recording acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RtcpInfo {
    /// The SSRC of the first packet's sender (or the reporter), if the packet has one.
    pub sender_ssrc: Option<u32>,
    /// SSRCs that said goodbye (BYE, packet type 203), at most 31 per BYE packet.
    pub bye: Vec<u32>,
}

/// A datagram, classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Datagram {
    /// An RTP packet.
    Rtp(RtpHeader),
    /// An RTCP compound packet.
    Rtcp(RtcpInfo),
}

/// The RTCP packet type of BYE.
pub const RTCP_BYE: u8 = 203;

/// Tells RTP from RTCP and checks the structure.
pub fn classify(d: &[u8]) -> Result<Datagram, Reject> {
    if d.len() < 4 {
        return Err(Reject::Short);
    }
    if d[0] >> 6 != 2 {
        return Err(Reject::Version);
    }
    if (200..=211).contains(&d[1]) {
        return rtcp(d).map(Datagram::Rtcp);
    }
    rtp(d).map(Datagram::Rtp)
}

fn rtp(d: &[u8]) -> Result<RtpHeader, Reject> {
    if d.len() < 12 {
        return Err(Reject::Short);
    }
    let padding = d[0] & 0x20 != 0;
    let extension = d[0] & 0x10 != 0;
    let cc = usize::from(d[0] & 0x0f);
    let mut off = 12 + 4 * cc;
    if extension {
        if d.len() < off + 4 {
            return Err(Reject::MalformedRtp);
        }
        let words = usize::from(u16::from_be_bytes([d[off + 2], d[off + 3]]));
        off += 4 + 4 * words;
    }
    if d.len() < off {
        return Err(Reject::MalformedRtp);
    }
    let mut end = d.len();
    if padding {
        let pad = usize::from(d[d.len() - 1]);
        if pad == 0 || off + pad > d.len() {
            return Err(Reject::MalformedRtp);
        }
        end -= pad;
    }
    Ok(RtpHeader {
        payload_type: d[1] & 0x7f,
        marker: d[1] & 0x80 != 0,
        seq: u16::from_be_bytes([d[2], d[3]]),
        timestamp: u32::from_be_bytes([d[4], d[5], d[6], d[7]]),
        ssrc: u32::from_be_bytes([d[8], d[9], d[10], d[11]]),
        payload_offset: off,
        payload_len: end - off,
    })
}

fn rtcp(d: &[u8]) -> Result<RtcpInfo, Reject> {
    let mut info = RtcpInfo {
        sender_ssrc: None,
        bye: Vec::new(),
    };
    let mut off = 0;
    while off < d.len() {
        let p = &d[off..];
        if p.len() < 4 || p[0] >> 6 != 2 {
            return Err(Reject::MalformedRtcp);
        }
        let len = 4 * (usize::from(u16::from_be_bytes([p[2], p[3]])) + 1);
        if len > p.len() {
            return Err(Reject::MalformedRtcp);
        }
        let body = &p[4..len];
        if off == 0 && body.len() >= 4 {
            info.sender_ssrc = Some(u32::from_be_bytes([body[0], body[1], body[2], body[3]]));
        }
        if p[1] == RTCP_BYE {
            let count = usize::from(p[0] & 0x1f);
            if body.len() < 4 * count {
                return Err(Reject::MalformedRtcp);
            }
            info.bye.extend(
                body[..4 * count]
                    .chunks_exact(4)
                    .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]])),
            );
        }
        off += len;
    }
    Ok(info)
}

/// A forward jump of up to this many is a gap (RFC 3550 A.1).
pub const MAX_DROPOUT: u16 = 3000;
/// A step back of up to this many is reordering (RFC 3550 A.1).
pub const MAX_MISORDER: u16 = 100;

/// What one sequence number means for its stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqOutcome {
    /// The first packet, or the next one.
    InOrder,
    /// Ahead of the next expected by `lost` packets (which may still come, reordered).
    Gap {
        /// Packets skipped.
        lost: u32,
    },
    /// Seen before: counted, not stored.
    Duplicate,
    /// Older than the highest seen but not seen before: stored, counted as reordered.
    Reordered,
    /// Far from the stream's sequence: stored, but not counted until confirmed.
    Stray,
    /// Two packets in sequence far from the old sequence: the sender restarted; the
    /// counts start again from this packet.
    Restart,
}

/// Sequence accounting of one RTP stream (RFC 3550 A.1, plus a window of 128 seen sequence
/// numbers below the highest, to tell a duplicate from a late packet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqTracker {
    max_seq: u16,
    cycles: u32,
    base: u32,
    /// `bad_seq` of A.1: the sequence number that would confirm a restart.
    bad_seq: Option<u16>,
    /// Bit i set: `max - i` was received (bit 0 is `max` itself).
    seen: u128,
    received: u64,
    duplicates: u64,
    reordered: u64,
}

impl SeqTracker {
    /// A tracker whose first packet has sequence number `seq`.
    pub fn new(seq: u16) -> SeqTracker {
        SeqTracker {
            max_seq: seq,
            cycles: 0,
            base: u32::from(seq),
            bad_seq: None,
            seen: 1,
            received: 1,
            duplicates: 0,
            reordered: 0,
        }
    }

    /// The extended highest sequence number.
    pub fn extended_max(&self) -> u64 {
        u64::from(self.cycles) + u64::from(self.max_seq)
    }

    /// Packets expected since the first (or the last restart).
    pub fn expected(&self) -> u64 {
        self.extended_max() + 1 - u64::from(self.base)
    }

    /// Distinct packets received since the first (or the last restart).
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Expected but not received (never negative: duplicates are not counted as received).
    pub fn lost(&self) -> u64 {
        self.expected().saturating_sub(self.received)
    }

    /// Duplicates seen.
    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    /// Late packets seen.
    pub fn reordered(&self) -> u64 {
        self.reordered
    }

    /// Accounts for one packet.
    pub fn update(&mut self, seq: u16) -> SeqOutcome {
        let udelta = seq.wrapping_sub(self.max_seq);
        if udelta == 0 {
            self.duplicates += 1;
            return SeqOutcome::Duplicate;
        }
        if udelta < MAX_DROPOUT {
            if seq < self.max_seq {
                self.cycles = self.cycles.wrapping_add(1 << 16);
            }
            self.seen = if udelta >= 128 {
                1
            } else {
                (self.seen << udelta) | 1
            };
            self.max_seq = seq;
            self.bad_seq = None;
            self.received += 1;
            return match udelta - 1 {
                0 => SeqOutcome::InOrder,
                lost => SeqOutcome::Gap {
                    lost: u32::from(lost),
                },
            };
        }
        let back = 0u16.wrapping_sub(udelta); // how far behind max_seq
        if back <= MAX_MISORDER {
            let bit = 1u128 << back;
            if self.seen & bit != 0 {
                self.duplicates += 1;
                return SeqOutcome::Duplicate;
            }
            self.seen |= bit;
            self.received += 1;
            self.reordered += 1;
            return SeqOutcome::Reordered;
        }
        if self.bad_seq == Some(seq) {
            // Two in sequence: the sender restarted its sequence numbers.
            *self = SeqTracker::new(seq);
            return SeqOutcome::Restart;
        }
        self.bad_seq = Some(seq.wrapping_add(1));
        SeqOutcome::Stray
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rtp_packet(seq: u16, ssrc: u32, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0x80, 0x00];
        p.extend_from_slice(&seq.to_be_bytes());
        p.extend_from_slice(&(u32::from(seq) * 160).to_be_bytes());
        p.extend_from_slice(&ssrc.to_be_bytes());
        p.extend_from_slice(payload);
        p
    }

    #[test]
    fn classifies_rtp_with_csrc_extension_and_padding() {
        let p = rtp_packet(7, 0xdead_beef, &[0xff; 160]);
        let Ok(Datagram::Rtp(h)) = classify(&p) else {
            panic!("not rtp")
        };
        assert_eq!(
            (h.seq, h.ssrc, h.payload_offset, h.payload_len),
            (7, 0xdead_beef, 12, 160)
        );
        // One CSRC, a one-word extension, 4 bytes of padding.
        let mut q = vec![0x80 | 0x20 | 0x10 | 1, 8];
        q.extend_from_slice(&[0, 1, 0, 0, 0, 2, 0, 0, 0, 3]);
        q.extend_from_slice(&[9, 9, 9, 9]); // CSRC
        q.extend_from_slice(&[0xbe, 0xde, 0, 1, 1, 2, 3, 4]); // extension, one word
        q.extend_from_slice(&[0xd5; 20]);
        q.extend_from_slice(&[0, 0, 0, 4]);
        let Ok(Datagram::Rtp(h)) = classify(&q) else {
            panic!("not rtp")
        };
        assert_eq!(
            (h.payload_type, h.payload_offset, h.payload_len),
            (8, 24, 20)
        );
    }

    #[test]
    fn rejects_what_does_not_fit() {
        assert_eq!(classify(&[0x80]), Err(Reject::Short));
        assert_eq!(classify(&[0x80, 0, 0, 1, 0, 0]), Err(Reject::Short));
        let mut p = rtp_packet(1, 1, &[1; 10]);
        p[0] = 0x40;
        assert_eq!(classify(&p), Err(Reject::Version));
        p[0] = 0x8f; // 15 CSRCs in a 22-byte packet
        assert_eq!(classify(&p), Err(Reject::MalformedRtp));
        p[0] = 0xa0; // padding
        *p.last_mut().unwrap() = 0;
        assert_eq!(classify(&p), Err(Reject::MalformedRtp));
        *p.last_mut().unwrap() = 200;
        assert_eq!(classify(&p), Err(Reject::MalformedRtp));
        p[0] = 0x90; // extension header past the end
        p.truncate(14);
        assert_eq!(classify(&p), Err(Reject::MalformedRtp));
    }

    #[test]
    fn rtcp_compound_with_bye() {
        // SR (6 words after the header: sender info, no report blocks) + BYE of two SSRCs.
        let mut d = vec![0x80, 200, 0, 6];
        d.extend_from_slice(&0x1111_1111u32.to_be_bytes());
        d.extend_from_slice(&[0; 20]);
        d.extend_from_slice(&[0x82, 203, 0, 2]);
        d.extend_from_slice(&0x1111_1111u32.to_be_bytes());
        d.extend_from_slice(&0x2222_2222u32.to_be_bytes());
        assert_eq!(
            classify(&d),
            Ok(Datagram::Rtcp(RtcpInfo {
                sender_ssrc: Some(0x1111_1111),
                bye: vec![0x1111_1111, 0x2222_2222]
            }))
        );
        let mut bad = d.clone();
        bad[3] = 7; // length runs past the end
        assert_eq!(classify(&bad), Err(Reject::MalformedRtcp));
        let mut bad = d.clone();
        bad.push(0); // trailing byte
        assert_eq!(classify(&bad), Err(Reject::MalformedRtcp));
        let mut bad = d;
        bad[28] = 0x9f; // BYE claims 31 SSRCs
        assert_eq!(classify(&bad), Err(Reject::MalformedRtcp));
    }

    #[test]
    fn sequence_in_order_gap_reorder_duplicate() {
        let mut t = SeqTracker::new(100);
        assert_eq!(t.update(101), SeqOutcome::InOrder);
        assert_eq!(t.update(104), SeqOutcome::Gap { lost: 2 });
        assert_eq!(t.lost(), 2);
        assert_eq!(t.update(103), SeqOutcome::Reordered);
        assert_eq!(t.update(103), SeqOutcome::Duplicate);
        assert_eq!(t.update(104), SeqOutcome::Duplicate);
        assert_eq!((t.lost(), t.received(), t.expected()), (1, 4, 5));
        assert_eq!((t.duplicates(), t.reordered()), (2, 1));
    }

    #[test]
    fn sequence_wraps() {
        let mut t = SeqTracker::new(65534);
        assert_eq!(t.update(65535), SeqOutcome::InOrder);
        assert_eq!(t.update(0), SeqOutcome::InOrder);
        assert_eq!(t.update(2), SeqOutcome::Gap { lost: 1 });
        assert_eq!(t.extended_max(), 65536 + 2);
        assert_eq!(t.update(1), SeqOutcome::Reordered);
        assert_eq!(t.update(65535), SeqOutcome::Duplicate);
        assert_eq!((t.expected(), t.received(), t.lost()), (5, 5, 0));
    }

    #[test]
    fn a_restart_needs_two_in_sequence() {
        let mut t = SeqTracker::new(1000);
        assert_eq!(t.update(30_000), SeqOutcome::Stray);
        assert_eq!(t.update(1001), SeqOutcome::InOrder);
        assert_eq!(t.update(40_000), SeqOutcome::Stray);
        assert_eq!(t.update(40_001), SeqOutcome::Restart);
        assert_eq!((t.expected(), t.received(), t.lost()), (1, 1, 0));
        assert_eq!(t.update(40_002), SeqOutcome::InOrder);
    }

    #[test]
    fn long_gaps_forget_the_window() {
        let mut t = SeqTracker::new(0);
        assert_eq!(t.update(2000), SeqOutcome::Gap { lost: 1999 });
        assert_eq!(
            t.update(1850),
            SeqOutcome::Stray,
            "beyond the misorder window"
        );
        assert_eq!(t.update(1990), SeqOutcome::Reordered);
        assert_eq!(t.update(1990), SeqOutcome::Duplicate);
    }
}
