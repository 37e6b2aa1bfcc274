//! The uploader's schedule, sans-IO: which package goes to a worker next, and when the
//! uploader must look again. A function of (state, news, answers, now) like the session,
//! tested on a fake clock; the uploader thread (`crate::appliance::uploader`) owns the
//! channels, the workers, the spool and the wall clock.
//!
//! Invariants:
//! - A package is handed out to at most one worker at a time: news of a package a worker has
//!   (the `ready/` watcher sees its state file rewritten as multipart parts are saved, a
//!   rescan lists it) never hands it out again; the worker's answer decides what becomes
//!   of it.
//! - At most `slots` packages are out at once.
//! - A package is handed out only once its next attempt time has come; among those due,
//!   the oldest recording first (ids are UUIDv7, ordered by time).
//! - A package's next attempt time is read from its state file once (the caller's
//!   `attempt_at`), then kept, so a long outage does not re-read every state file on every
//!   look; a package whose state is gone (stored, moved by an operator) is forgotten.

use std::collections::{BTreeMap, HashSet};

use uuid::Uuid;

/// The packages waiting for the store and those out with a worker.
#[derive(Debug)]
pub struct UploadQueue {
    /// Waiting, each with its next attempt time (ms) once known.
    waiting: BTreeMap<Uuid, Option<u64>>,
    /// Out with a worker.
    in_flight: HashSet<Uuid>,
    slots: usize,
}

impl UploadQueue {
    /// Empty, for `slots` workers (at least one).
    pub fn new(slots: usize) -> UploadQueue {
        UploadQueue {
            waiting: BTreeMap::new(),
            in_flight: HashSet::new(),
            slots: slots.max(1),
        }
    }

    /// A package is in `ready/` (news, or a scan listed it): queued unless a worker has it
    /// or it is queued already (its known attempt time is kept).
    pub fn offer(&mut self, id: Uuid) {
        if !self.in_flight.contains(&id) {
            self.waiting.entry(id).or_insert(None);
        }
    }

    /// A worker is done with `id`: `Some(at)` if the package stays, to be tried again at
    /// `at` (ms); `None` if it left `ready/` (stored, or failed for good).
    pub fn answered(&mut self, id: Uuid, next: Option<u64>) {
        self.in_flight.remove(&id);
        if let Some(at) = next {
            self.waiting.insert(id, Some(at));
        }
    }

    /// The next package to hand out at `now` (ms), marked as out with a worker; `None` if
    /// every slot is taken or nothing is due. `attempt_at` reads a package's next attempt
    /// time from its state (`None`: the package is gone).
    pub fn next_due(
        &mut self,
        now: u64,
        mut attempt_at: impl FnMut(Uuid) -> Option<u64>,
    ) -> Option<Uuid> {
        if self.in_flight.len() >= self.slots {
            return None;
        }
        let mut gone = Vec::new();
        let mut due = None;
        for (id, at) in self.waiting.iter_mut() {
            let at = match *at {
                Some(at) => at,
                None => match attempt_at(*id) {
                    Some(t) => *at.insert(t),
                    None => {
                        gone.push(*id);
                        continue;
                    }
                },
            };
            if at <= now {
                due = Some(*id);
                break;
            }
        }
        for id in gone {
            self.waiting.remove(&id);
        }
        let id = due?;
        self.waiting.remove(&id);
        self.in_flight.insert(id);
        Some(id)
    }

    /// When a waiting package falls due next (ms), if a slot is free for it and its time
    /// is known; a package whose time is not read yet counts as due now.
    pub fn poll_timeout(&self) -> Option<u64> {
        if self.in_flight.len() >= self.slots {
            return None;
        }
        self.waiting.values().map(|at| at.unwrap_or(0)).min()
    }

    /// Packages out with a worker.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Nothing waits and nothing is out.
    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty() && self.in_flight.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<Uuid> {
        // UUIDv7 made in order are in order.
        (0..n)
            .map(|i| Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0000 + i as u128))
            .collect()
    }

    #[test]
    fn hands_out_the_oldest_due_first_and_never_more_than_the_slots() {
        let p = ids(5);
        let mut q = UploadQueue::new(2);
        for id in p.iter().rev() {
            q.offer(*id);
        }
        let now = 1_000;
        assert_eq!(q.next_due(now, |_| Some(0)), Some(p[0]));
        assert_eq!(q.next_due(now, |_| Some(0)), Some(p[1]));
        assert_eq!(q.next_due(now, |_| Some(0)), None, "both slots taken");
        assert_eq!(
            q.poll_timeout(),
            None,
            "nothing to wait for until a worker answers"
        );
        q.answered(p[0], None);
        assert_eq!(q.next_due(now, |_| Some(0)), Some(p[2]));
        assert_eq!(q.in_flight(), 2);
    }

    #[test]
    fn news_of_a_package_out_with_a_worker_never_hands_it_out_again() {
        let p = ids(1);
        let mut q = UploadQueue::new(4);
        q.offer(p[0]);
        assert_eq!(q.next_due(0, |_| Some(0)), Some(p[0]));
        // The watcher sees its state file rewritten three times; a rescan lists it.
        for _ in 0..4 {
            q.offer(p[0]);
        }
        assert_eq!(q.next_due(0, |_| Some(0)), None);
        // Its worker says it stays (a transient failure): back in the queue at that time.
        q.answered(p[0], Some(500));
        assert_eq!(q.poll_timeout(), Some(500));
        assert_eq!(q.next_due(499, |_| panic!("its time is known")), None);
        assert_eq!(q.next_due(500, |_| panic!("its time is known")), Some(p[0]));
    }

    #[test]
    fn a_state_is_read_once_and_a_package_gone_is_forgotten() {
        let p = ids(3);
        let mut q = UploadQueue::new(1);
        for id in &p {
            q.offer(*id);
        }
        let mut reads = Vec::new();
        let mut attempt_at = |id: Uuid| {
            reads.push(id);
            if id == p[0] {
                None // stored meanwhile
            } else {
                Some(10_000)
            }
        };
        // Not due yet: every state read once, the gone one dropped.
        assert_eq!(q.next_due(5_000, &mut attempt_at), None);
        assert_eq!(reads, p);
        assert_eq!(q.poll_timeout(), Some(10_000));
        reads.clear();
        assert_eq!(
            q.next_due(10_000, |id| panic!("read {id} again")),
            Some(p[1])
        );
        q.offer(p[1]); // announced again while out: ignored
        q.answered(p[1], None);
        assert_eq!(q.next_due(10_000, |_| Some(0)), Some(p[2]));
        q.answered(p[2], None);
        assert!(q.is_empty());
    }

    #[test]
    fn an_unread_package_counts_as_due_now() {
        let p = ids(1);
        let mut q = UploadQueue::new(1);
        assert_eq!(q.poll_timeout(), None);
        q.offer(p[0]);
        assert_eq!(q.poll_timeout(), Some(0));
    }

    #[test]
    fn a_long_outage_retries_each_package_on_its_own_schedule() {
        // A fake clock over an hour: three packages failing with different backoffs each
        // come back exactly at their times, never early, never twice at once.
        let p = ids(3);
        let mut q = UploadQueue::new(3);
        for id in &p {
            q.offer(*id);
        }
        let backoff = [7_000u64, 60_000, 300_000];
        let mut attempts = [0u32; 3];
        let mut now = 0u64;
        while now < 3_600_000 {
            while let Some(id) = q.next_due(now, |_| Some(now)) {
                let i = p.iter().position(|x| *x == id).unwrap();
                attempts[i] += 1;
                q.answered(id, Some(now + backoff[i]));
            }
            now = q.poll_timeout().expect("every package waits");
        }
        assert_eq!(attempts, [515, 60, 12]);
    }
}
