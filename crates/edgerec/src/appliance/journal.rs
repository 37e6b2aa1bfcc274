//! The crash journal of this process: the datagrams read but not yet in a package file,
//! kept where the next process finds them — a ring ([`crate::media::journal`]) in a memory
//! file (`memfd`, never on disk) that goes into the service manager's descriptor store
//! beside the sockets (`FDNAME=journal`). A `kill -9` loses what the recorder held in memory
//! — a recording's pending chunk (up to a flush interval), a candidate's held packets, what
//! waited in its queue; the next process replays those datagrams from here, with their
//! kernel arrival times, before it reads the sockets, and nothing that reached a package
//! file is replayed.
//!
//! Shared by the ingest thread (which appends, one lock and a copy per `recvmmsg` call) and
//! the recorder (which notes owners and written marks), behind one mutex.
//!
//! Invariants: only datagrams of the ingest ports, their addresses and arrival times are
//! kept — media as received, never keys or metadata; memory only. A full ring does not stop
//! recording: the datagram is recorded, counted as `unprotected`.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::appliance::feed::Batch;
pub use crate::media::journal::{
    Datagram, MAX_CAPACITY, MIN_CAPACITY, Marks, Owner, Ring, default_capacity, entry_end,
};

/// The journal of this process, shared by the ingest thread (which appends) and the
/// recorder (which notes owners and marks).
#[derive(Clone)]
pub struct Journal {
    ring: Arc<Mutex<Ring<memmap2::MmapMut>>>,
    file: Arc<File>,
}

/// What the last process left to replay.
pub struct Replay {
    /// The datagrams, with their positions, in the order they were read.
    pub datagrams: Vec<(u64, Datagram)>,
    /// An entry failed a check: what followed it is lost (logged, counted).
    pub broken: bool,
}

/// Maps the whole memory file. See the invariant of [`crate::appliance::journal`].
#[allow(unsafe_code)]
fn map(file: &File) -> io::Result<memmap2::MmapMut> {
    // SAFETY: the file is an anonymous memory file no one else writes while this process
    // lives: the service manager only holds a descriptor to hand it to the next process,
    // which starts after this one is gone (a `kill -9` or exit first, then `RestartSec=`).
    // Every read through the mapping is bounds-checked and length-checked, so even bytes
    // changed behind our back could only make the replay stop early, never read outside.
    unsafe { memmap2::MmapMut::map_mut(file) }
}

impl Journal {
    /// Takes over the journal the service manager passed (with what it holds to replay), or
    /// makes a new one of `capacity` bytes; the flag says it is new (and so must be stored).
    /// A passed journal of another size is read for its replay, then replaced.
    pub fn open(passed: Option<OwnedFd>, capacity: u64) -> io::Result<(Journal, Replay, bool)> {
        let capacity = capacity
            .clamp(MIN_CAPACITY, MAX_CAPACITY)
            .next_multiple_of(8);
        let mut replay = Replay {
            datagrams: Vec::new(),
            broken: false,
        };
        if let Some(fd) = passed {
            let file = File::from(fd);
            match map(&file).map(Ring::open) {
                Ok(Ok(mut ring)) => {
                    let (datagrams, broken) = ring.take_over();
                    replay = Replay { datagrams, broken };
                    if ring.capacity() == capacity {
                        let j = Journal {
                            ring: Arc::new(Mutex::new(ring)),
                            file: Arc::new(file),
                        };
                        return Ok((j, replay, false));
                    }
                    // Another size: its datagrams are replayed through the new one.
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "the datagram journal passed is not one: a new one is made")
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot map the datagram journal passed: a new one is made")
                }
            }
        }
        // Room for every datagram to replay, whatever size was asked for (the next start
        // makes it the size asked for).
        let needed: u64 = replay
            .datagrams
            .iter()
            .map(|(_, d)| entry_end(0, d.data.len()))
            .sum::<u64>()
            .saturating_add(1 << 16);
        let capacity = capacity.max(needed.next_multiple_of(8)).min(MAX_CAPACITY);
        let fd = rustix::fs::memfd_create("edgerec-journal", rustix::fs::MemfdFlags::CLOEXEC)?;
        let file = File::from(fd);
        file.set_len(Ring::<Vec<u8>>::bytes_for(capacity))?;
        let mut ring = Ring::create(map(&file)?);
        if !replay.datagrams.is_empty() {
            // Moved into the new ring at new positions (the replay's order kept).
            let moved = std::mem::take(&mut replay.datagrams);
            for (_, d) in moved {
                if let Some(pos) = ring.append(d.local, d.remote, d.wall_ns, &d.data) {
                    replay.datagrams.push((pos, d));
                }
            }
        }
        let j = Journal {
            ring: Arc::new(Mutex::new(ring)),
            file: Arc::new(file),
        };
        Ok((j, replay, true))
    }

    fn ring(&self) -> MutexGuard<'_, Ring<memmap2::MmapMut>> {
        // A thread that panicked holding it left the ring's bytes as valid as ever.
        self.ring
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The descriptor, for the store.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// The position after the last entry.
    pub fn head(&self) -> u64 {
        self.ring().head()
    }

    /// The bytes from `tail` to the head.
    pub fn used(&self, tail: u64) -> u64 {
        self.ring().head().saturating_sub(tail)
    }

    /// The ring's size.
    pub fn capacity(&self) -> u64 {
        self.ring().capacity()
    }

    /// Appends the datagrams of `batch` from index `from` on (read at `read_at`, when the
    /// wall clock said `wall`), noting each one's position in the batch; returns how many
    /// found no room.
    pub fn append(
        &self,
        batch: &mut Batch,
        from: usize,
        read_at: Instant,
        wall: SystemTime,
    ) -> u64 {
        let wall_ns = |at: Instant| {
            let w = wall
                .checked_sub(read_at.saturating_duration_since(at))
                .unwrap_or(wall);
            u64::try_from(w.duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos())
                .unwrap_or(u64::MAX)
        };
        let mut ring = self.ring();
        let mut full = 0;
        for (d, data) in batch.iter_mut_from(from) {
            d.journal = ring.append(d.local, d.remote, wall_ns(d.at), data);
            if d.journal.is_none() {
                full += 1;
            }
        }
        full
    }

    /// The datagrams of `batch` were dropped before the recorder saw them (counted).
    pub fn dropped(&self, batch: &Batch) {
        let mut ring = self.ring();
        for (d, _) in batch.iter() {
            if let Some(pos) = d.journal {
                ring.set_owner(pos, Owner::Dropped);
            }
        }
    }

    /// Who took which entries.
    pub fn owners(&self, owners: &[(u64, Owner)]) {
        let mut ring = self.ring();
        for &(pos, owner) in owners {
            ring.set_owner(pos, owner);
        }
    }

    /// Every entry `port` owns below `below` is in its package file.
    pub fn written(&self, port: u16, below: u64) {
        self.ring().set_mark(port, below);
    }

    /// Frees everything before `tail`.
    pub fn set_tail(&self, tail: u64) {
        self.ring().set_tail(tail);
    }
}
