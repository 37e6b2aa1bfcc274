//! The upload bandwidth limit (`[upload] bandwidth_bytes_per_sec`): edge links are shared
//! with live calls, so uploads must not take all of it.
//!
//! A token bucket in bytes, edgerec's one kind (`edgerec_net::rate_limit::TokenBucket`,
//! its `take_paced` a pure function of (state, bytes, now) that says how long to wait
//! before sending, tested on a fake clock). [`Throttled`] wraps a reader (the body of an
//! upload) and sleeps as the bucket says. One bucket is shared by every upload, so the
//! limit holds for the appliance as a whole.

use std::io::{self, Read};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use edgerec_net::rate_limit::{self, TokenBucket};

/// A limit shared by every upload: one token bucket in bytes (the one kind of bucket
/// edgerec has, `edgerec_net::rate_limit`, paced into debt rather than refusing) and the
/// clock it runs on.
#[derive(Debug, Clone)]
pub struct Limit {
    bucket: Arc<Mutex<TokenBucket>>,
    limit: rate_limit::Limit,
    epoch: Instant,
}

impl Limit {
    /// `rate` bytes a second, bursts of a tenth of a second (at least 64 KiB).
    pub fn new(rate: u64) -> Limit {
        let limit = bytes_per_sec(rate);
        Limit {
            bucket: Arc::new(Mutex::new(TokenBucket::full(limit, 0))),
            limit,
            epoch: Instant::now(),
        }
    }

    fn wait_for(&self, n: u64) {
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        let wait = match self.bucket.lock() {
            Ok(mut b) => b.take_paced(self.limit, n as f64, now),
            Err(poisoned) => poisoned.into_inner().take_paced(self.limit, n as f64, now),
        };
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }
}

/// The bucket of `rate` bytes a second: bursts of a tenth of a second, at least 64 KiB.
fn bytes_per_sec(rate: u64) -> rate_limit::Limit {
    rate_limit::Limit {
        rate: rate.max(1) as f64,
        burst: (rate / 10).max(64 << 10) as f64,
    }
}

/// A reader that keeps to a [`Limit`]: reads at most 64 KiB at a time and waits as the
/// bucket says after each.
pub struct Throttled<R> {
    inner: R,
    limit: Limit,
}

impl<R> Throttled<R> {
    /// `inner`, kept to `limit`.
    pub fn new(inner: R, limit: Limit) -> Throttled<R> {
        Throttled { inner, limit }
    }
}

impl<R: Read> Read for Throttled<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let max = buf.len().min(64 << 10);
        let n = self.inner.read(&mut buf[..max])?;
        self.limit.wait_for(n as u64);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const S: u64 = 1000;

    fn limit(rate: f64, burst: f64) -> rate_limit::Limit {
        rate_limit::Limit { rate, burst }
    }

    #[test]
    fn a_full_bucket_lets_a_burst_through_then_paces_at_the_rate() {
        let l = limit(1000.0, 500.0);
        let mut b = TokenBucket::full(l, 0);
        assert_eq!(b.take_paced(l, 500.0, 0), Duration::ZERO, "the burst");
        assert_eq!(
            b.take_paced(l, 250.0, 0),
            Duration::from_millis(250),
            "then the rate"
        );
        // After the wait the debt is paid and refill starts from zero.
        assert_eq!(b.take_paced(l, 100.0, S / 4 + S / 10), Duration::ZERO);
        assert_eq!(
            b.take_paced(l, 100.0, S / 4 + S / 10),
            Duration::from_millis(100)
        );
    }

    #[test]
    fn long_idle_saves_up_no_more_than_the_burst() {
        let l = limit(1000.0, 500.0);
        let mut b = TokenBucket::full(l, 0);
        b.take_paced(l, 500.0, 0);
        assert_eq!(b.take_paced(l, 400.0, 3600 * S), Duration::ZERO);
        assert_eq!(b.take_paced(l, 200.0, 3600 * S), Duration::from_millis(100));
    }

    #[test]
    fn sending_a_megabyte_at_a_hundred_kilobytes_a_second_takes_ten_seconds() {
        let l = limit(100_000.0, 10_000.0);
        let mut b = TokenBucket::full(l, 0);
        let mut now = 0u64;
        let mut sent = 0u64;
        while sent < 1_000_000 {
            let wait = b.take_paced(l, 10_000.0, now);
            now += u64::try_from(wait.as_millis()).unwrap();
            sent += 10_000;
        }
        // The first 10 kB went in the burst: 9.9 s for the rest.
        assert_eq!(now, 9_900);
    }

    #[test]
    fn a_clock_that_goes_back_refills_nothing() {
        let l = limit(1000.0, 100.0);
        let mut b = TokenBucket::full(l, 5 * S);
        b.take_paced(l, 100.0, 5 * S);
        assert_eq!(b.take_paced(l, 100.0, S), Duration::from_millis(100));
    }

    #[test]
    fn the_limits_burst_is_a_tenth_of_a_second_and_at_least_64_kib() {
        assert_eq!(bytes_per_sec(10 << 20).burst, (1 << 20) as f64);
        assert_eq!(bytes_per_sec(1000).burst, (64 << 10) as f64);
    }

    #[test]
    fn the_reader_passes_every_byte_through() {
        let data: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let mut r = Throttled::new(&data[..], Limit::new(1 << 30));
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        assert_eq!(out, data);
    }
}
