//! The recordings in progress, by port, kept where the next process finds them: a memory
//! file (`memfd`, never on disk) that goes into the service manager's descriptor store
//! beside the sockets (`FDNAME=carry`). After a crash, `kill -9` or a restart, the next
//! process reads which recording each port had, and the first recording it starts on that
//! port continues it (`continues` in its metadata, as a maximum-duration split does), so
//! export joins the call back together.
//!
//! Layout: 32 bytes of magic, then one 32-byte slot per port (`32 + 32 × port`): the id of
//! the recording in progress there (zero for none) and the source address (IPv6, or IPv4
//! mapped) of the stream that started it — a recording after the restart continues it only
//! when it comes from there too, so a port given to another caller is not chained. Only ids
//! and addresses are kept, never media, metadata or keys.
//!
//! Invariants: a slot is written when the recording's package is asked for and cleared when
//! it ends for any reason but the appliance's stop (a planned restart continues it too); a
//! slot the next process finds is used once, by the first recording on its port, and
//! forgotten after `forget_after` if none comes (the call ended during the outage).

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv6Addr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;

use uuid::Uuid;

/// The file's first bytes.
const MAGIC: &[u8; 32] = b"edgerec-carry-v2 ids and sources";
/// A slot: the recording id, its source address.
const SLOT: u64 = 32;
/// Magic and one slot per port.
const LEN: u64 = SLOT + SLOT * 65_536;

/// Where `port`'s slot is.
fn slot(port: u16) -> u64 {
    SLOT + SLOT * u64::from(port)
}

/// What a slot names: the recording, and the source of the stream that started it.
pub type Carried = (Uuid, IpAddr);

/// A slot's bytes.
fn encode(id: Uuid, source: IpAddr) -> [u8; 32] {
    let mut b = [0u8; 32];
    b[..16].copy_from_slice(id.as_bytes());
    let v6 = match source {
        IpAddr::V4(a) => a.to_ipv6_mapped(),
        IpAddr::V6(a) => a,
    };
    b[16..].copy_from_slice(&v6.octets());
    b
}

/// The recordings a file names: its slots that are not zero. `None` if it is not a carry
/// file.
pub fn parse(bytes: &[u8]) -> Option<HashMap<u16, Carried>> {
    if bytes.get(..32) != Some(&MAGIC[..]) {
        return None;
    }
    let mut found = HashMap::new();
    for (i, s) in bytes[32..].chunks_exact(32).enumerate() {
        let id = Uuid::from_slice(&s[..16]).ok()?;
        let v6: [u8; 16] = s[16..].try_into().ok()?;
        let v6 = Ipv6Addr::from(v6);
        let source = v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4);
        if !id.is_nil()
            && let Ok(port) = u16::try_from(i)
        {
            found.insert(port, (id, source));
        }
    }
    Some(found)
}

/// The carry file of this process.
pub struct Carry {
    file: File,
}

impl Carry {
    /// Takes over the file the service manager passed (with what it names), or makes a new
    /// one (naming nothing); the flag says it is new (and so must be stored).
    pub fn open(passed: Option<OwnedFd>) -> io::Result<(Carry, HashMap<u16, Carried>, bool)> {
        if let Some(fd) = passed {
            let file = File::from(fd);
            let mut bytes = vec![0u8; usize::try_from(LEN).expect("a megabyte fits")];
            if file.read_exact_at(&mut bytes, 0).is_ok()
                && let Some(found) = parse(&bytes)
            {
                return Ok((Carry { file }, found, false));
            }
            tracing::warn!("the carried recordings file is not one: a new one is made");
        }
        let fd = rustix::fs::memfd_create("edgerec-carry", rustix::fs::MemfdFlags::CLOEXEC)?;
        let file = File::from(fd);
        file.set_len(LEN)?;
        file.write_all_at(MAGIC, 0)?;
        Ok((Carry { file }, HashMap::new(), true))
    }

    /// The recording in progress on `port` is `id`, started by a stream from `source`.
    pub fn set(&self, port: u16, id: Uuid, source: IpAddr) {
        self.write(port, &encode(id, source));
    }

    fn write(&self, port: u16, bytes: &[u8; 32]) {
        if let Err(e) = self.file.write_all_at(bytes, slot(port)) {
            tracing::warn!(error = %e, port, "cannot note the recording for a restart");
        }
    }

    /// No recording is in progress on `port`, if `id` was the one noted.
    pub fn clear(&self, port: u16, id: Uuid) {
        let mut now = [0u8; 16];
        if self.file.read_exact_at(&mut now, slot(port)).is_ok() && now == *id.as_bytes() {
            self.write(port, &[0u8; 32]);
        }
    }

    /// The descriptor, for the store.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_hold_ids_and_sources_by_port_and_zero_is_none() {
        let mut bytes = vec![0u8; usize::try_from(LEN).unwrap()];
        assert_eq!(parse(&bytes), None, "no magic");
        bytes[..32].copy_from_slice(MAGIC);
        assert_eq!(parse(&bytes), Some(HashMap::new()));
        let id = Uuid::from_u128(0x0123_4567_89ab_7def_8123_4567_89ab_cdef);
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        let v6: IpAddr = "2001:db8::7".parse().unwrap();
        let at = usize::try_from(slot(40_002)).unwrap();
        bytes[at..at + 32].copy_from_slice(&encode(id, v4));
        let at = usize::try_from(slot(65_535)).unwrap();
        bytes[at..at + 32].copy_from_slice(&encode(id, v6));
        assert_eq!(
            parse(&bytes),
            Some(HashMap::from([(40_002, (id, v4)), (65_535, (id, v6))]))
        );
        assert_eq!(slot(65_535) + SLOT, LEN, "the last slot ends the file");
    }

    #[test]
    fn a_carry_file_is_taken_over_with_what_it_names() {
        let (c, found, fresh) = Carry::open(None).unwrap();
        assert!(fresh && found.is_empty());
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let from: IpAddr = "192.0.2.7".parse().unwrap();
        c.set(40_000, a, from);
        c.set(40_002, b, from);
        c.clear(40_002, a);
        let dup = c.file.try_clone().unwrap();
        let (c2, found, fresh) = Carry::open(Some(OwnedFd::from(dup))).unwrap();
        assert!(!fresh);
        assert_eq!(
            found,
            HashMap::from([(40_000, (a, from)), (40_002, (b, from))]),
            "only its own id clears a slot"
        );
        c2.clear(40_002, b);
        let (_, found, _) = Carry::open(Some(OwnedFd::from(c2.file))).unwrap();
        assert_eq!(found, HashMap::from([(40_000, (a, from))]));
        // Not a carry file: a new one.
        let junk = tempfile::tempfile().unwrap();
        let (_, found, fresh) = Carry::open(Some(OwnedFd::from(junk))).unwrap();
        assert!(fresh && found.is_empty());
    }
}
