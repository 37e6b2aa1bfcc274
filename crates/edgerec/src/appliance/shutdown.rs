//! The one shutdown signal of `edgerec run`, passed to every thread and task (mini-redis's
//! pattern, for threads as well as tasks): triggered once, seen by all.
//!
//! Invariants: once triggered it stays triggered; a thread waiting in [`Shutdown::wait`] and
//! a task awaiting [`Shutdown::triggered`] wake at once, not at their next poll, so no loop
//! needs a stop flag and a sleep of its own.

use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// A clonable handle on the signal.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    down: Mutex<bool>,
    changed: Condvar,
    tasks: tokio::sync::Notify,
}

impl Shutdown {
    /// Not triggered.
    pub fn new() -> Shutdown {
        Shutdown::default()
    }

    /// Triggers it: every waiting thread and task wakes.
    pub fn trigger(&self) {
        *self
            .inner
            .down
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = true;
        self.inner.changed.notify_all();
        self.inner.tasks.notify_waiters();
    }

    /// Whether it was triggered.
    pub fn is_triggered(&self) -> bool {
        *self
            .inner
            .down
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits up to `d`, or until triggered: whether it was triggered.
    pub fn wait(&self, d: Duration) -> bool {
        let until = Instant::now() + d;
        let mut down = self
            .inner
            .down
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        while !*down {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            down = self
                .inner
                .changed
                .wait_timeout(down, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        *down
    }

    /// Completes once triggered (at once if it was).
    pub async fn triggered(&self) {
        loop {
            let notified = self.inner.tasks.notified();
            let mut notified = std::pin::pin!(notified);
            // Registered before the check, so a trigger in between is not missed.
            notified.as_mut().enable();
            if self.is_triggered() {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_waiting_thread_wakes_at_the_trigger_not_at_its_timeout() {
        let s = Shutdown::new();
        assert!(!s.wait(Duration::from_millis(1)), "times out untriggered");
        let waiter = {
            let s = s.clone();
            std::thread::spawn(move || s.wait(Duration::from_secs(3600)))
        };
        s.trigger();
        assert!(waiter.join().unwrap(), "woken by the trigger");
        assert!(
            s.is_triggered() && s.wait(Duration::from_secs(3600)),
            "and it stays"
        );
    }

    #[test]
    fn a_task_wakes_at_the_trigger_and_one_that_comes_later_completes_at_once() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let s = Shutdown::new();
        rt.block_on(async {
            let waiting = tokio::spawn({
                let s = s.clone();
                async move { s.triggered().await }
            });
            tokio::task::yield_now().await;
            s.trigger();
            waiting.await.unwrap();
            s.triggered().await;
        });
    }
}
