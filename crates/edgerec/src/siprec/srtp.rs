//! SRTP legs of a recording (SDES keys from the client's `a=crypto`), decrypted on arrival so
//! that the package holds plain RTP inside its own encryption; the keys live in memory only.
//!
//! The cipher is webrtc-rs's sans-IO SRTP (`rtc-srtp`): `AES_CM_128_HMAC_SHA1_80` and `_32`,
//! replay protection on. What this module adds is a bound: the library keeps state for every
//! SSRC a packet names, before the packet is authenticated, so a sender spraying SSRCs could
//! grow it without end. Here a packet of an SSRC not yet authenticated is tried in a scratch
//! context of its own; only when it authenticates does its SSRC get a context, and at most
//! [`MAX_SSRCS`] are kept (the least recently used goes).
//!
//! Invariants: the master key is zeroized when dropped and never printed; a packet that does
//! not authenticate is an error the caller counts, never passed on; memory is bounded by
//! [`MAX_SSRCS`] contexts and one scratch.

use std::sync::Arc;

use rtc_srtp::context::Context;
use rtc_srtp::crypto::RTCCryptoProvider;
use rtc_srtp::protection_profile::ProtectionProfile;
use zeroize::Zeroizing;

use super::sdp::{SDES_KEY_LEN, Sdes, Suite};

/// The most SSRCs of one stream kept (a leg has one; a restart or a re-INVITE adds one).
pub const MAX_SSRCS: usize = 4;
/// Packets a context remembers for replay protection.
const REPLAY_WINDOW: usize = 128;

/// Why a packet was not decrypted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SrtpError {
    /// The SRTP context could not be made (a key the library refused).
    #[error("SRTP setup: {0}")]
    Setup(String),
    /// Its authentication tag does not verify (a wrong key, a forged or damaged packet).
    #[error("SRTP authentication failed")]
    Auth,
    /// A packet seen before.
    #[error("SRTP replay")]
    Replay,
    /// Too short or not RTP/RTCP.
    #[error("not an SRTP packet: {0}")]
    Malformed(String),
}

/// The incoming SRTP (and SRTCP) of one stream.
pub struct SrtpIn {
    key: Zeroizing<[u8; SDES_KEY_LEN]>,
    profile: ProtectionProfile,
    provider: Arc<dyn RTCCryptoProvider>,
    /// Authenticated SSRCs, most recently used last.
    contexts: Vec<(u32, Context)>,
}

impl std::fmt::Debug for SrtpIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SrtpIn")
            .field("profile", &self.profile)
            .field("ssrcs", &self.contexts.len())
            .finish_non_exhaustive()
    }
}

impl SrtpIn {
    /// The decryptor of a stream the client keyed with `sdes`.
    pub fn new(sdes: &Sdes) -> Result<SrtpIn, SrtpError> {
        let provider =
            rtc_srtp::crypto::default_provider().map_err(|e| SrtpError::Setup(e.to_string()))?;
        let s = SrtpIn {
            key: sdes.key.clone(),
            profile: match sdes.suite {
                Suite::Aes128Sha1_80 => ProtectionProfile::Aes128CmHmacSha1_80,
                Suite::Aes128Sha1_32 => ProtectionProfile::Aes128CmHmacSha1_32,
            },
            provider,
            contexts: Vec::new(),
        };
        s.context()?;
        Ok(s)
    }

    fn context(&self) -> Result<Context, SrtpError> {
        Context::new(
            &self.key[..16],
            &self.key[16..],
            self.profile,
            Some(rtc_srtp::option::srtp_replay_protection(REPLAY_WINDOW)),
            Some(rtc_srtp::option::srtcp_replay_protection(REPLAY_WINDOW)),
            self.provider.crypto(),
        )
        .map_err(|e| SrtpError::Setup(e.to_string()))
    }

    /// SSRCs with a context now.
    pub fn ssrcs(&self) -> usize {
        self.contexts.len()
    }

    /// The plain RTP packet of an SRTP one.
    pub fn rtp(&mut self, packet: &[u8]) -> Result<Vec<u8>, SrtpError> {
        let ssrc = ssrc_at(packet, 8)?;
        self.decrypt(ssrc, |c| c.decrypt_rtp(packet))
    }

    /// The plain RTCP packet of an SRTCP one.
    pub fn rtcp(&mut self, packet: &[u8]) -> Result<Vec<u8>, SrtpError> {
        let ssrc = ssrc_at(packet, 4)?;
        self.decrypt(ssrc, |c| c.decrypt_rtcp(packet))
    }

    fn decrypt(
        &mut self,
        ssrc: u32,
        run: impl Fn(&mut Context) -> Result<bytes::BytesMut, rtc_shared::error::Error>,
    ) -> Result<Vec<u8>, SrtpError> {
        if let Some(i) = self.contexts.iter().position(|(s, _)| *s == ssrc) {
            // The most recently used goes last; a stream's one SSRC is there already.
            if i + 1 != self.contexts.len() {
                let entry = self.contexts.remove(i);
                self.contexts.push(entry);
            }
            let last = self.contexts.len() - 1;
            return run(&mut self.contexts[last].1)
                .map(|b| b.to_vec())
                .map_err(judge);
        }
        // Not authenticated yet: a context of its own, kept only if the packet is genuine.
        let mut scratch = self.context()?;
        let plain = run(&mut scratch).map_err(judge)?;
        if self.contexts.len() == MAX_SSRCS {
            self.contexts.remove(0);
        }
        self.contexts.push((ssrc, scratch));
        Ok(plain.to_vec())
    }
}

fn ssrc_at(packet: &[u8], at: usize) -> Result<u32, SrtpError> {
    packet
        .get(at..at + 4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_be_bytes)
        .ok_or_else(|| SrtpError::Malformed("too short".into()))
}

fn judge(e: rtc_shared::error::Error) -> SrtpError {
    use rtc_shared::error::Error as E;
    match e {
        E::ErrFailedToVerifyAuthTag
        | E::RtpFailedToVerifyAuthTag
        | E::RtcpFailedToVerifyAuthTag => SrtpError::Auth,
        E::SrtpSsrcDuplicated(..) | E::SrtcpSsrcDuplicated(..) => SrtpError::Replay,
        other => SrtpError::Malformed(other.to_string()),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sdes(suite: Suite) -> Sdes {
        let mut key = [0u8; SDES_KEY_LEN];
        for (i, b) in key.iter_mut().enumerate() {
            *b = i as u8 * 7 + 1;
        }
        Sdes {
            tag: 1,
            suite,
            key: Zeroizing::new(key),
        }
    }

    fn rtp(seq: u16, ssrc: u32) -> Vec<u8> {
        let mut p = vec![0x80, 0x00];
        p.extend_from_slice(&seq.to_be_bytes());
        p.extend_from_slice(&(u32::from(seq) * 160).to_be_bytes());
        p.extend_from_slice(&ssrc.to_be_bytes());
        p.extend((0..160).map(|i| (i as u8) ^ (seq as u8)));
        p
    }

    /// A sender's context for the same key (what the client does).
    pub(crate) fn sender(s: &Sdes) -> Context {
        let provider = rtc_srtp::crypto::default_provider().unwrap();
        let profile = match s.suite {
            Suite::Aes128Sha1_80 => ProtectionProfile::Aes128CmHmacSha1_80,
            Suite::Aes128Sha1_32 => ProtectionProfile::Aes128CmHmacSha1_32,
        };
        Context::new(
            &s.key[..16],
            &s.key[16..],
            profile,
            None,
            None,
            provider.crypto(),
        )
        .unwrap()
    }

    #[test]
    fn both_suites_decrypt_what_a_sender_encrypts() {
        for suite in [Suite::Aes128Sha1_80, Suite::Aes128Sha1_32] {
            let s = sdes(suite);
            let mut tx = sender(&s);
            let mut rx = SrtpIn::new(&s).unwrap();
            for seq in 0..50u16 {
                let plain = rtp(seq, 0xdead_beef);
                let wire = tx.encrypt_rtp(&plain).unwrap();
                let tag = match suite {
                    Suite::Aes128Sha1_80 => 10,
                    Suite::Aes128Sha1_32 => 4,
                };
                assert_eq!(wire.len(), plain.len() + tag);
                assert_ne!(&wire[12..plain.len()], &plain[12..], "encrypted");
                assert_eq!(rx.rtp(&wire).unwrap(), plain);
            }
            // SRTCP of the same sender.
            let rr = [
                0x81u8, 201, 0, 7, 0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            ];
            let wire = tx.encrypt_rtcp(&rr).unwrap();
            assert_eq!(rx.rtcp(&wire).unwrap(), rr);
        }
    }

    #[test]
    fn forged_damaged_replayed_and_wrongly_keyed_packets_are_refused() {
        let s = sdes(Suite::Aes128Sha1_80);
        let mut tx = sender(&s);
        let mut rx = SrtpIn::new(&s).unwrap();
        let wire = tx.encrypt_rtp(&rtp(1, 42)).unwrap();
        let mut damaged = wire.to_vec();
        damaged[20] ^= 1;
        assert_eq!(rx.rtp(&damaged), Err(SrtpError::Auth));
        assert_eq!(
            rx.ssrcs(),
            0,
            "nothing kept for a packet that did not authenticate"
        );
        assert!(rx.rtp(&wire).is_ok());
        assert_eq!(rx.rtp(&wire), Err(SrtpError::Replay));
        let mut other = sdes(Suite::Aes128Sha1_80);
        other.key[0] ^= 1;
        let mut wrong = SrtpIn::new(&other).unwrap();
        assert_eq!(
            wrong.rtp(&tx.encrypt_rtp(&rtp(2, 42)).unwrap()),
            Err(SrtpError::Auth)
        );
        assert!(matches!(rx.rtp(&[0x80, 0]), Err(SrtpError::Malformed(_))));
        assert!(!format!("{rx:?}").contains("key"), "no key in Debug");
    }

    #[test]
    fn sprayed_ssrcs_keep_no_state_and_genuine_ones_are_bounded() {
        let s = sdes(Suite::Aes128Sha1_32);
        let mut tx = sender(&s);
        let mut rx = SrtpIn::new(&s).unwrap();
        // Junk with a thousand SSRCs: refused, nothing kept.
        for ssrc in 0..1000u32 {
            let mut junk = rtp(1, ssrc);
            junk.extend_from_slice(&[0; 4]);
            assert_eq!(rx.rtp(&junk), Err(SrtpError::Auth));
        }
        assert_eq!(rx.ssrcs(), 0);
        // Genuine SSRCs: at most MAX_SSRCS kept, the oldest dropped; the live one goes on.
        for ssrc in 1..=(MAX_SSRCS as u32 + 2) {
            assert!(rx.rtp(&tx.encrypt_rtp(&rtp(1, ssrc)).unwrap()).is_ok());
        }
        assert_eq!(rx.ssrcs(), MAX_SSRCS);
        let last = MAX_SSRCS as u32 + 2;
        for seq in 2..20 {
            assert!(rx.rtp(&tx.encrypt_rtp(&rtp(seq, last)).unwrap()).is_ok());
        }
    }
}
