//! The upload bandwidth limit (`[upload] bandwidth_bytes_per_sec`): edge links are shared
//! with live calls, so uploads must not take all of it.
//!
//! A token bucket, pure: [`Bucket::take`] is a function of (state, bytes, now) that says how
//! long to wait before sending; tested on a fake clock. [`Throttled`] wraps a reader (the
//! body of an upload) and sleeps as the bucket says. One bucket is shared by every upload,
//! so the limit holds for the appliance as a whole.

use std::io::{self, Read};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A token bucket in bytes: `rate` a second, at most `burst` saved up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    rate: u64,
    burst: u64,
    /// Bytes that may be sent now; negative when the last take ran ahead (debt).
    tokens: i128,
    /// When `tokens` was last brought up to date, in nanoseconds of the caller's clock.
    at_ns: u64,
}

impl Bucket {
    /// A full bucket at `now_ns`. `burst` is clamped to at least one byte.
    pub fn new(rate: u64, burst: u64, now_ns: u64) -> Bucket {
        let burst = burst.max(1);
        Bucket {
            rate: rate.max(1),
            burst,
            tokens: i128::from(burst),
            at_ns: now_ns,
        }
    }

    /// Takes `n` bytes at `now_ns`: returns how long the caller must wait before sending
    /// them (zero while the bucket holds enough).
    pub fn take(&mut self, n: u64, now_ns: u64) -> Duration {
        let elapsed = i128::from(now_ns.saturating_sub(self.at_ns));
        self.at_ns = self.at_ns.max(now_ns);
        let refill = elapsed * i128::from(self.rate) / 1_000_000_000;
        self.tokens = (self.tokens + refill).min(i128::from(self.burst));
        self.tokens -= i128::from(n);
        if self.tokens >= 0 {
            return Duration::ZERO;
        }
        let debt_ns = (-self.tokens) * 1_000_000_000 / i128::from(self.rate);
        Duration::from_nanos(u64::try_from(debt_ns).unwrap_or(u64::MAX))
    }
}

/// A limit shared by every upload: the bucket and the clock it runs on.
#[derive(Debug, Clone)]
pub struct Limit {
    bucket: Arc<Mutex<Bucket>>,
    epoch: Instant,
}

impl Limit {
    /// `rate` bytes a second, bursts of a tenth of a second (at least 64 KiB).
    pub fn new(rate: u64) -> Limit {
        Limit {
            bucket: Arc::new(Mutex::new(Bucket::new(rate, (rate / 10).max(64 << 10), 0))),
            epoch: Instant::now(),
        }
    }

    fn wait_for(&self, n: u64) {
        let now = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let wait = match self.bucket.lock() {
            Ok(mut b) => b.take(n, now),
            Err(poisoned) => poisoned.into_inner().take(n, now),
        };
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
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

    const S: u64 = 1_000_000_000;

    #[test]
    fn a_full_bucket_lets_a_burst_through_then_paces_at_the_rate() {
        let mut b = Bucket::new(1000, 500, 0);
        assert_eq!(b.take(500, 0), Duration::ZERO, "the burst");
        assert_eq!(b.take(250, 0), Duration::from_millis(250), "then the rate");
        // After the wait the debt is paid and refill starts from zero.
        assert_eq!(b.take(100, S / 4 + S / 10), Duration::ZERO);
        assert_eq!(b.take(100, S / 4 + S / 10), Duration::from_millis(100));
    }

    #[test]
    fn long_idle_saves_up_no_more_than_the_burst() {
        let mut b = Bucket::new(1000, 500, 0);
        b.take(500, 0);
        assert_eq!(b.take(400, 3600 * S), Duration::ZERO);
        assert_eq!(b.take(200, 3600 * S), Duration::from_millis(100));
    }

    #[test]
    fn sending_a_megabyte_at_a_hundred_kilobytes_a_second_takes_ten_seconds() {
        let mut b = Bucket::new(100_000, 10_000, 0);
        let mut now = 0u64;
        let mut sent = 0u64;
        while sent < 1_000_000 {
            let wait = b.take(10_000, now);
            now += u64::try_from(wait.as_nanos()).unwrap();
            sent += 10_000;
        }
        // The first 10 kB went in the burst: 9.9 s for the rest.
        assert_eq!(now, 9_900_000_000);
    }

    #[test]
    fn a_clock_that_goes_back_refills_nothing() {
        let mut b = Bucket::new(1000, 100, 5 * S);
        b.take(100, 5 * S);
        assert_eq!(b.take(100, S), Duration::from_millis(100));
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
