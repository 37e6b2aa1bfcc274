//! The crash journal's format and its bookkeeping, sans-IO: a ring of received datagrams
//! (each with its addresses and kernel arrival time) in a block of bytes, who took each
//! one, and each port's *written mark*. `appliance::journal` keeps it in a memory file that
//! the service manager holds over a `kill -9`; this module is only bytes in, bytes out (and
//! fuzzed: `fuzz/fuzz_targets/media_decode.rs`).
//!
//! How it is used: the ingest thread appends each datagram of an ingest port as it reads it.
//! The recorder writes each entry's *owner* — the port whose recording or candidate took it,
//! or "dropped" (counted, never to be stored) — and, after each record it appends to a
//! package file, that port's written mark: every entry it owns at a position below the mark
//! is in the file. The ring's tail follows the oldest entry not yet written ([`Marks`]). The
//! next process replays the entries from the tail on that have no owner yet or whose
//! owner's mark is not past them ([`select`], [`Ring::take_over`]).
//!
//! Layout (little-endian): 64 bytes of header (magic, capacity, tail, head), a written mark
//! (u64) per port, then the ring. Positions only grow; an entry sits at `position mod
//! capacity` and never wraps (a marker sends the reader to the ring's start). An entry is 56
//! bytes of header (its size, owner, arrival wall-clock time, local and remote address,
//! length) and the datagram, padded to 8 bytes.
//!
//! Invariants: the head moves only after an entry is whole, so a process killed while
//! appending leaves no half entry; reading back checks every size and offset against the
//! bytes, so damaged bytes end the replay early (reported), never a panic or a read outside.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{Ordering, compiler_fence};
use std::time::Duration;

/// The file's first bytes.
const MAGIC: &[u8; 32] = b"edgerec-journal-v1 datagrams   \n";
/// Magic, capacity, tail, head, and room.
const HEADER: usize = 64;
const CAPACITY_AT: usize = 32;
const TAIL_AT: usize = 40;
const HEAD_AT: usize = 48;
/// A written mark per port.
const MARKS: usize = 8 * 65_536;
/// Where the ring starts.
const RING: usize = HEADER + MARKS;
/// An entry's header.
const ENTRY: usize = 56;
/// The size field of a marker that sends the reader to the ring's start.
const WRAP: u32 = u32::MAX;
/// Owner: not yet taken by the recorder.
const UNSET: u32 = 0;
/// Owner: counted and dropped (never to be stored).
const DROPPED: u32 = 1;
/// Owner: the recording or candidate of port `p`, as `OWNED | p`.
const OWNED: u32 = 0x1_0000;
/// The smallest ring: a burst of a few hundred datagrams.
pub const MIN_CAPACITY: u64 = 1 << 20;
/// The largest ring.
pub const MAX_CAPACITY: u64 = 1 << 30;

/// The ring's size for `ports` ingest ports at a flush interval: the flush interval and a
/// quarter of a second more of two legs a port at 50 packets a second (the ring holds what
/// pending chunks hold, plus what admission and the package's making hold), at least 4 MiB.
/// Memory is taken as it is written, so an appliance holds only what its load has used.
pub fn default_capacity(ports: u64, flush_interval: Duration) -> u64 {
    // Two legs of 50 datagrams a second, an entry of about 240 bytes each.
    let per_port_second = 2 * 50 * 240;
    let millis = u64::try_from(flush_interval.as_millis()).unwrap_or(u64::MAX);
    let bytes = ports
        .saturating_mul(per_port_second)
        .saturating_mul(millis.saturating_add(250))
        / 1000;
    bytes.clamp(4 << 20, MAX_CAPACITY).next_multiple_of(8)
}

/// The position after the entry at `pos` of a `len`-byte datagram.
pub fn entry_end(pos: u64, len: usize) -> u64 {
    pos + (ENTRY + len).next_multiple_of(8) as u64
}

/// What an entry says of its datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datagram {
    /// Where it arrived.
    pub local: SocketAddr,
    /// Where it came from.
    pub remote: SocketAddr,
    /// When it arrived: nanoseconds since the Unix epoch (the kernel's stamp).
    pub wall_ns: u64,
    /// Its bytes.
    pub data: Vec<u8>,
}

/// Who took an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// Not yet taken: the recorder had not read it.
    Unset,
    /// Counted and dropped (a duplicate, paused, malformed, refused, over a limit).
    Dropped,
    /// The recording or candidate of this port.
    Port(u16),
}

impl Owner {
    fn encode(self) -> u32 {
        match self {
            Owner::Unset => UNSET,
            Owner::Dropped => DROPPED,
            Owner::Port(p) => OWNED | u32::from(p),
        }
    }

    fn decode(v: u32) -> Option<Owner> {
        match v {
            UNSET => Some(Owner::Unset),
            DROPPED => Some(Owner::Dropped),
            v if v & !0xffff == OWNED => u16::try_from(v & 0xffff).ok().map(Owner::Port),
            _ => None,
        }
    }
}

/// The entries from the tail on that the next process must replay: those no owner took
/// yet, and those whose owner's written mark is not past them. `entries` are in position
/// order; `marks` is each port's mark.
pub fn select(entries: &[(u64, Owner)], marks: impl Fn(u16) -> u64) -> Vec<u64> {
    entries
        .iter()
        .filter(|(pos, owner)| match owner {
            Owner::Unset => true,
            Owner::Dropped => false,
            Owner::Port(p) => *pos >= marks(*p),
        })
        .map(|(pos, _)| *pos)
        .collect()
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("four bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("eight bytes"))
}

fn ip_bytes(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    }
}

fn ip_from(b: &[u8]) -> IpAddr {
    let v6 = Ipv6Addr::from(<[u8; 16]>::try_from(b).expect("sixteen bytes"));
    v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
}

/// The ring over its bytes (the memory file's mapping; a vector in the tests). Sans-IO.
#[derive(Debug)]
pub struct Ring<M> {
    mem: M,
    cap: u64,
    tail: u64,
    head: u64,
}

/// Why bytes are not a ring.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RingError {
    /// No magic, or a header that does not fit the bytes.
    #[error("not a datagram journal (or one of another size)")]
    NotJournal,
}

impl<M: AsRef<[u8]> + AsMut<[u8]>> Ring<M> {
    /// A new, empty ring over `mem` (its size: [`Ring::bytes_for`]).
    pub fn create(mut mem: M) -> Ring<M> {
        let cap = (mem.as_ref().len() - RING) as u64;
        let b = mem.as_mut();
        b[..RING].fill(0);
        b[..32].copy_from_slice(MAGIC);
        b[CAPACITY_AT..CAPACITY_AT + 8].copy_from_slice(&cap.to_le_bytes());
        Ring {
            mem,
            cap,
            tail: 0,
            head: 0,
        }
    }

    /// The ring a last process left in `mem`.
    pub fn open(mem: M) -> Result<Ring<M>, RingError> {
        let b = mem.as_ref();
        if b.len() < RING || b[..32] != MAGIC[..] {
            return Err(RingError::NotJournal);
        }
        let (cap, tail, head) = (
            u64_at(b, CAPACITY_AT),
            u64_at(b, TAIL_AT),
            u64_at(b, HEAD_AT),
        );
        if cap != (b.len() - RING) as u64
            || cap % 8 != 0
            || tail > head
            || head - tail > cap
            || head.checked_add(2 * cap).is_none()
        {
            return Err(RingError::NotJournal);
        }
        Ok(Ring {
            mem,
            cap,
            tail,
            head,
        })
    }

    /// The bytes a ring of `cap` bytes takes.
    pub fn bytes_for(cap: u64) -> u64 {
        RING as u64 + cap
    }

    fn off(&self, pos: u64) -> usize {
        RING + usize::try_from(pos % self.cap).expect("the ring is in memory")
    }

    /// The position after the last entry.
    pub fn head(&self) -> u64 {
        self.head
    }

    /// The ring's size in bytes.
    pub fn capacity(&self) -> u64 {
        self.cap
    }

    /// Appends a datagram; its position, or `None` when the ring has no room (or it is
    /// larger than an entry can be).
    pub fn append(
        &mut self,
        local: SocketAddr,
        remote: SocketAddr,
        wall_ns: u64,
        data: &[u8],
    ) -> Option<u64> {
        let len = u16::try_from(data.len()).ok()?;
        let total = (ENTRY + data.len()).next_multiple_of(8) as u64;
        let room_to_end = self.cap - self.head % self.cap;
        let pos = if room_to_end < total {
            self.head + room_to_end
        } else {
            self.head
        };
        if pos + total - self.tail > self.cap {
            return None;
        }
        if pos != self.head {
            let at = self.off(self.head);
            self.mem.as_mut()[at..at + 4].copy_from_slice(&WRAP.to_le_bytes());
        }
        let at = self.off(pos);
        let b = &mut self.mem.as_mut()[at..at + ENTRY + data.len()];
        b[0..4].copy_from_slice(
            &u32::try_from(total)
                .expect("an entry is small")
                .to_le_bytes(),
        );
        b[4..8].copy_from_slice(&UNSET.to_le_bytes());
        b[8..16].copy_from_slice(&wall_ns.to_le_bytes());
        b[16..32].copy_from_slice(&ip_bytes(local.ip()));
        b[32..48].copy_from_slice(&ip_bytes(remote.ip()));
        b[48..50].copy_from_slice(&local.port().to_le_bytes());
        b[50..52].copy_from_slice(&remote.port().to_le_bytes());
        b[52..54].copy_from_slice(&len.to_le_bytes());
        b[54..56].fill(0);
        b[ENTRY..].copy_from_slice(data);
        // The head moves only after the entry is whole: a kill between the two leaves the
        // entry unwritten, never half written.
        compiler_fence(Ordering::SeqCst);
        self.head = pos + total;
        self.put(HEAD_AT, self.head);
        Some(pos)
    }

    fn put(&mut self, at: usize, v: u64) {
        self.mem.as_mut()[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }

    /// Notes who took the entry at `pos` (if it is still in the ring).
    pub fn set_owner(&mut self, pos: u64, owner: Owner) {
        if pos < self.tail || pos >= self.head {
            return;
        }
        let at = self.off(pos) + 4;
        self.mem.as_mut()[at..at + 4].copy_from_slice(&owner.encode().to_le_bytes());
    }

    /// `port`'s written mark (see the module documentation).
    pub fn mark(&self, port: u16) -> u64 {
        u64_at(self.mem.as_ref(), HEADER + 8 * usize::from(port))
    }

    /// Raises `port`'s written mark to `below`.
    pub fn set_mark(&mut self, port: u16, below: u64) {
        if below > self.mark(port) {
            self.put(HEADER + 8 * usize::from(port), below);
        }
    }

    /// Frees everything before `tail`.
    pub fn set_tail(&mut self, tail: u64) {
        let tail = tail.min(self.head);
        if tail > self.tail {
            self.tail = tail;
            self.put(TAIL_AT, tail);
        }
    }

    /// The entries from the tail to the head: position, owner, datagram. Stops at the
    /// first entry that fails a check (returned as `true`: the rest cannot be read).
    pub fn entries(&self) -> (Vec<(u64, Owner, Datagram)>, bool) {
        let b = self.mem.as_ref();
        let mut out = Vec::new();
        let mut pos = self.tail;
        while pos < self.head {
            let at = self.off(pos);
            let room = self.cap - pos % self.cap;
            let total = if room >= 4 { u32_at(b, at) } else { 0 };
            if total == WRAP {
                pos += room;
                continue;
            }
            let total = u64::from(total);
            let len = if room >= ENTRY as u64 {
                usize::from(u16::from_le_bytes([b[at + 52], b[at + 53]]))
            } else {
                usize::MAX
            };
            let owner = if room >= 8 {
                Owner::decode(u32_at(b, at + 4))
            } else {
                None
            };
            let fits = total % 8 == 0
                && len != usize::MAX
                && total == (ENTRY + len).next_multiple_of(8) as u64
                && total <= room
                && pos + total <= self.head;
            let (true, Some(owner)) = (fits, owner) else {
                return (out, true);
            };
            let e = &b[at..at + ENTRY + len];
            let local = SocketAddr::new(ip_from(&e[16..32]), u16::from_le_bytes([e[48], e[49]]));
            let remote = SocketAddr::new(ip_from(&e[32..48]), u16::from_le_bytes([e[50], e[51]]));
            out.push((
                pos,
                owner,
                Datagram {
                    local,
                    remote,
                    wall_ns: u64_at(e, 8),
                    data: e[ENTRY..].to_vec(),
                },
            ));
            pos += total;
        }
        (out, false)
    }

    /// Makes the ring the next process's: the entries to replay (from [`select`]) are
    /// unowned, every other entry dropped, and every mark cleared — in that order, so that a
    /// kill in between leaves a ring that says the same. Returns the datagrams to replay with
    /// their positions, and whether an entry failed a check.
    pub fn take_over(&mut self) -> (Vec<(u64, Datagram)>, bool) {
        let (entries, broken) = self.entries();
        let owners: Vec<(u64, Owner)> = entries.iter().map(|(p, o, _)| (*p, *o)).collect();
        let replay = select(&owners, |p| self.mark(p));
        let mut keep = replay.iter().peekable();
        let mut out = Vec::with_capacity(replay.len());
        for (pos, _, d) in entries {
            if keep.peek() == Some(&&pos) {
                keep.next();
                self.set_owner(pos, Owner::Unset);
                out.push((pos, d));
            } else {
                self.set_owner(pos, Owner::Dropped);
            }
        }
        if broken {
            // What follows a broken entry cannot be read: the ring ends there.
            let end = out
                .last()
                .map_or(self.tail, |(p, d)| entry_end(*p, d.data.len()));
            self.head = end.max(self.tail);
            self.put(HEAD_AT, self.head);
        }
        self.mem.as_mut()[HEADER..RING].fill(0);
        (out, broken)
    }
}

impl Ring<Vec<u8>> {
    /// The ring a last process would have left with this tail and head and these first
    /// bytes of its ring (marks zero): what the fuzzer reads back.
    pub fn from_parts(cap: u64, tail: u64, head: u64, bytes: &[u8]) -> Result<Self, RingError> {
        let cap = cap.next_multiple_of(8);
        let len = usize::try_from(cap).map_err(|_| RingError::NotJournal)?;
        let mut ring = Ring::create(vec![0u8; RING + len]);
        let n = bytes.len().min(len);
        ring.mem[RING..RING + n].copy_from_slice(&bytes[..n]);
        ring.put(TAIL_AT, tail);
        ring.put(HEAD_AT, head);
        Ring::open(ring.mem)
    }
}

/// The recorder's side (sans-IO): which ports hold entries not yet written, and so where
/// the tail may go. Positions are the ring's.
#[derive(Debug, Default)]
pub struct Marks {
    /// Per owner port: no entry it owns before this position is unwritten (a lower bound).
    pending_from: HashMap<u16, u64>,
    /// Per owner port: its last entry.
    last_owned: HashMap<u16, u64>,
    /// The position after the last entry the recorder took.
    processed_end: u64,
}

impl Marks {
    /// Marks for a ring whose first entry still to be taken is at `start`.
    pub fn new(start: u64) -> Marks {
        Marks {
            processed_end: start,
            ..Marks::default()
        }
    }

    /// The position after the last entry taken.
    pub fn processed_end(&self) -> u64 {
        self.processed_end
    }

    /// The entry at `pos` (ending at `end`) was taken by `owner`.
    pub fn took(&mut self, pos: u64, end: u64, owner: Owner) {
        self.processed_end = self.processed_end.max(end);
        if let Owner::Port(p) = owner {
            self.last_owned.insert(p, pos);
            self.pending_from.entry(p).or_insert(pos);
        }
    }

    /// Every entry `port` owns below `below` is in its package file.
    pub fn written(&mut self, port: u16, below: u64) {
        let Some(from) = self.pending_from.get_mut(&port) else {
            return;
        };
        if self.last_owned.get(&port).is_none_or(|&l| l < below) {
            self.pending_from.remove(&port);
            self.last_owned.remove(&port);
        } else {
            *from = (*from).max(below);
        }
    }

    /// The ports with entries not yet written.
    pub fn pending(&self) -> impl Iterator<Item = u16> + '_ {
        self.pending_from.keys().copied()
    }

    /// Where the tail may go: before the oldest entry not yet written or not yet taken.
    pub fn tail(&self) -> u64 {
        self.pending_from
            .values()
            .copied()
            .min()
            .unwrap_or(u64::MAX)
            .min(self.processed_end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(cap: u64) -> Ring<Vec<u8>> {
        Ring::create(vec![
            0u8;
            usize::try_from(Ring::<Vec<u8>>::bytes_for(cap))
                .unwrap()
        ])
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn entries_come_back_whole_across_the_wrap_and_a_full_ring_refuses() {
        let mut r = ring(1024);
        let remote: SocketAddr = "[2001:db8::7]:5004".parse().unwrap();
        let mut at = Vec::new();
        for i in 0..6u8 {
            at.push(r.append(addr(40_000), remote, 1_000 + u64::from(i), &[i; 100]));
        }
        // 160 bytes each: six fit in 1024, the seventh does not.
        assert!(at.iter().all(Option::is_some));
        assert_eq!(r.append(addr(40_000), remote, 0, &[9; 100]), None);
        // Freed up to the third, the next ones wrap to the ring's start.
        r.set_tail(at[3].unwrap());
        let p = r.append(addr(40_001), remote, 7, &[7; 100]).unwrap();
        assert_eq!(p, 1024, "the wrap skips the 64 bytes left at the end");
        let (entries, broken) = Ring::open(r.mem.clone()).unwrap().entries();
        assert!(!broken);
        let got: Vec<(u64, u8, u16)> = entries
            .iter()
            .map(|(p, _, d)| (*p, d.data[0], d.local.port()))
            .collect();
        assert_eq!(
            got,
            [
                (480, 3, 40_000),
                (640, 4, 40_000),
                (800, 5, 40_000),
                (1024, 7, 40_001)
            ]
        );
        assert_eq!(entries[3].2.remote, remote);
        assert_eq!(entries[3].2.wall_ns, 7);
    }

    #[test]
    fn what_was_not_written_is_replayed_and_nothing_that_was() {
        // Port 40000's recording wrote everything it owns below 300; port 40002's nothing.
        let owners = [
            (100, Owner::Port(40_000)),
            (200, Owner::Dropped),
            (250, Owner::Port(40_002)),
            (300, Owner::Port(40_000)),
            (400, Owner::Unset),
        ];
        let marks = |p: u16| if p == 40_000 { 300 } else { 0 };
        assert_eq!(select(&owners, marks), [250, 300, 400]);
    }

    #[test]
    fn a_taken_over_ring_replays_the_same_after_a_second_kill() {
        let mut r = ring(4096);
        let p: Vec<u64> = (0..4u8)
            .map(|i| r.append(addr(40_000), addr(9), 0, &[i; 20]).unwrap())
            .collect();
        r.set_owner(p[0], Owner::Port(40_000));
        r.set_owner(p[1], Owner::Dropped);
        r.set_owner(p[2], Owner::Port(40_000));
        r.set_mark(40_000, p[1]);
        let (replay, broken) = r.take_over();
        assert!(!broken);
        let got: Vec<u64> = replay.iter().map(|(p, _)| *p).collect();
        assert_eq!(got, [p[2], p[3]]);
        assert_eq!(r.mark(40_000), 0, "marks cleared");
        // Killed before replaying: the next process replays the same.
        let (again, _) = Ring::open(r.mem.clone()).unwrap().take_over();
        assert_eq!(again, replay);
    }

    #[test]
    fn a_damaged_entry_ends_the_replay_without_a_panic() {
        let mut r = ring(4096);
        let a = r.append(addr(40_000), addr(9), 0, &[1; 20]).unwrap();
        let b = r.append(addr(40_000), addr(9), 0, &[2; 20]).unwrap();
        r.append(addr(40_000), addr(9), 0, &[3; 20]).unwrap();
        let at = r.off(b);
        r.mem[at..at + 4].copy_from_slice(&13u32.to_le_bytes());
        let (replay, broken) = r.take_over();
        assert!(broken);
        assert_eq!(replay.len(), 1);
        assert_eq!(replay[0].0, a);
        // Every byte of the header or an entry changed: open refuses or the replay stops.
        for i in (0..HEADER).chain(RING..RING + 200) {
            let mut m = r.mem.clone();
            m[i] ^= 0xa5;
            if let Ok(mut r) = Ring::open(m) {
                let _ = r.take_over();
            }
        }
    }

    #[test]
    fn the_tail_waits_for_the_oldest_entry_not_written() {
        let mut m = Marks::new(0);
        m.took(0, 100, Owner::Port(1));
        m.took(100, 200, Owner::Port(2));
        m.took(200, 300, Owner::Dropped);
        m.took(300, 400, Owner::Port(1));
        assert_eq!(m.tail(), 0);
        // Port 1's chunk with its entries before 300 went out.
        m.written(1, 300);
        assert_eq!(m.tail(), 100);
        m.written(2, 300);
        assert_eq!(m.tail(), 300);
        m.written(1, 400);
        assert_eq!(m.tail(), 400, "everything taken is written");
        assert_eq!(m.pending().count(), 0);
    }

    #[test]
    fn the_default_size_follows_the_ports_and_the_flush_interval() {
        assert_eq!(default_capacity(10, Duration::from_secs(1)), 4 << 20);
        let big = default_capacity(2_000, Duration::from_secs(1));
        assert_eq!(big, 60_000_000);
        assert_eq!(
            default_capacity(60_000, Duration::from_secs(60)),
            MAX_CAPACITY
        );
    }
}
