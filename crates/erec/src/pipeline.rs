//! An ordered parallel map with bounded memory: items come from one source in order, are
//! transformed on worker threads, and reach the sink in the source's order.
//!
//! Used to seal and open packages on every core: records are independent, so the chunk
//! cipher runs in parallel while one thread reads and the caller's thread writes.
//!
//! Invariants: at most `2 × workers` items wait in each queue, so memory stays a few chunks;
//! the sink sees items strictly in order and the first error (in source order) ends the run,
//! after every item before it has reached the sink; all threads are joined before return.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, sync_channel};
use std::sync::{Arc, Mutex};

/// How many worker threads to use: the machine's parallelism, at least one.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// A few reusable byte buffers, so that a stream of chunks does not allocate (and page
/// in) fresh memory for every chunk.
#[derive(Debug, Default)]
pub struct BufPool {
    free: Mutex<Vec<Vec<u8>>>,
}

impl BufPool {
    /// At most this many buffers are kept.
    const KEEP: usize = 16;

    /// A buffer, recycled when one is free. Its contents are whatever it last held (it is
    /// not cleared, so that callers that overwrite it need not zero it first).
    pub fn take(&self) -> Vec<u8> {
        self.free
            .lock()
            .ok()
            .and_then(|mut f| f.pop())
            .unwrap_or_default()
    }

    /// Gives a buffer back.
    pub fn give(&self, v: Vec<u8>) {
        if let Ok(mut f) = self.free.lock()
            && f.len() < Self::KEEP
        {
            f.push(v);
        }
    }
}

/// Runs `source → work → sink`. `source` returns `Ok(None)` at its end. With one worker
/// everything runs on the calling thread.
pub fn ordered_map<I, O, E>(
    workers: usize,
    mut source: impl FnMut() -> Result<Option<I>, E> + Send,
    work: impl Fn(I) -> Result<O, E> + Sync,
    mut sink: impl FnMut(O) -> Result<(), E>,
) -> Result<(), E>
where
    I: Send,
    O: Send,
    E: Send,
{
    if workers <= 1 {
        // One worker: no threads at all, the same order and error semantics.
        while let Some(item) = source()? {
            sink(work(item)?)?;
        }
        return Ok(());
    }
    let depth = 2 * workers;
    let stop = AtomicBool::new(false);
    let (job_tx, job_rx) = sync_channel::<(u64, I)>(depth);
    let (res_tx, res_rx) = sync_channel::<(u64, Result<O, E>)>(depth);
    let job_rx: Arc<Mutex<Receiver<(u64, I)>>> = Arc::new(Mutex::new(job_rx));

    std::thread::scope(|s| {
        {
            let res_tx = res_tx.clone();
            let stop = &stop;
            s.spawn(move || {
                let mut seq = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    match source() {
                        Ok(Some(item)) => {
                            if job_tx.send((seq, item)).is_err() {
                                return;
                            }
                        }
                        Ok(None) => return,
                        Err(e) => {
                            let _ = res_tx.send((seq, Err(e)));
                            return;
                        }
                    }
                    seq += 1;
                }
            });
        }
        for _ in 0..workers {
            let job_rx = Arc::clone(&job_rx);
            let res_tx = res_tx.clone();
            let work = &work;
            s.spawn(move || {
                loop {
                    let next = match job_rx.lock() {
                        Ok(rx) => rx.recv(),
                        Err(_) => return,
                    };
                    let Ok((seq, item)) = next else { return };
                    if res_tx.send((seq, work(item))).is_err() {
                        return;
                    }
                }
            });
        }
        // Only the workers hold the job queue now: when they are gone, the source's send fails.
        drop(job_rx);
        drop(res_tx);

        let mut pending: BTreeMap<u64, Result<O, E>> = BTreeMap::new();
        let mut next = 0u64;
        let result = (|| {
            for (seq, r) in &res_rx {
                pending.insert(seq, r);
                while let Some(r) = pending.remove(&next) {
                    sink(r?)?;
                    next += 1;
                }
            }
            Ok(())
        })();
        stop.store(true, Ordering::Relaxed);
        drop(res_rx);
        drop(pending);
        result
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_order_and_stops_at_first_error() {
        let mut n = 0u32;
        let mut seen = Vec::new();
        let r: Result<(), String> = ordered_map(
            3,
            || {
                n += 1;
                Ok((n <= 1000).then_some(n))
            },
            |i| {
                if i == 700 {
                    Err(format!("bad {i}"))
                } else {
                    Ok(i * 2)
                }
            },
            |o| {
                seen.push(o);
                Ok(())
            },
        );
        assert_eq!(r, Err("bad 700".to_string()));
        assert_eq!(seen, (1..700).map(|i| i * 2).collect::<Vec<_>>());
    }

    #[test]
    fn one_worker_runs_inline_with_the_same_semantics() {
        let mut n = 0u32;
        let mut seen = Vec::new();
        let r: Result<(), u32> = ordered_map(
            1,
            || {
                n += 1;
                Ok((n <= 10).then_some(n))
            },
            |i| if i == 7 { Err(i) } else { Ok(i) },
            |o| {
                seen.push(o);
                Ok(())
            },
        );
        assert_eq!((r, seen), (Err(7), vec![1, 2, 3, 4, 5, 6]));
    }

    #[test]
    fn source_error_arrives_after_earlier_items() {
        let mut n = 0u32;
        let mut seen = 0;
        let r: Result<(), &str> = ordered_map(
            2,
            || {
                n += 1;
                if n == 50 { Err("src") } else { Ok(Some(n)) }
            },
            Ok,
            |_| {
                seen += 1;
                Ok(())
            },
        );
        assert_eq!((r, seen), (Err("src"), 49));
    }
}
