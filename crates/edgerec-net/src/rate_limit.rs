//! Token buckets, the one kind edgerec has, as pure functions of (state, now): a bucket per
//! caller that refuses (the key manager keys them by Hawk credential id, the session by
//! source address and port), or one that paces by going into debt (the upload bandwidth).
//!
//! Invariants:
//! - A bucket starts full (`burst` tokens) and refills at `rate` tokens a second, never
//!   above `burst`; a request takes one token or is refused with the wait until one is due.
//! - Time never runs backwards here: a `now` earlier than the last one refills nothing.
//! - The map of buckets is bounded: buckets that have refilled completely carry no state
//!   worth keeping and are dropped when the map reaches its bound (swept at most every
//!   [`SWEEP_EVERY_MS`], so many new keys cost no scan each). If none can be dropped, a new
//!   key is judged on a fresh bucket that is not kept: the map never grows past its bound,
//!   and a caller who can make up keys (spoofed source addresses) gains nothing it could
//!   not gain by making up a new key anyway.

use std::collections::HashMap;
use std::hash::Hash;

/// One caller's bucket.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenBucket {
    tokens: f64,
    last_ms: u64,
}

/// The limit: `rate` tokens a second, at most `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limit {
    /// Tokens added per second (> 0).
    pub rate: f64,
    /// The bucket's size (≥ 1).
    pub burst: f64,
}

impl TokenBucket {
    /// A full bucket at `now_ms`.
    pub fn full(limit: Limit, now_ms: u64) -> TokenBucket {
        TokenBucket {
            tokens: limit.burst,
            last_ms: now_ms,
        }
    }

    fn refill(&mut self, limit: Limit, now_ms: u64) {
        let elapsed = now_ms.saturating_sub(self.last_ms) as f64 / 1000.0;
        self.tokens = (self.tokens + elapsed * limit.rate).min(limit.burst);
        self.last_ms = self.last_ms.max(now_ms);
    }

    /// Takes a token, or says how many milliseconds until one is due.
    pub fn take(&mut self, limit: Limit, now_ms: u64) -> Result<(), u64> {
        self.refill(limit, now_ms);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            let wait = ((1.0 - self.tokens) / limit.rate * 1000.0).ceil();
            Err((wait as u64).max(1))
        }
    }

    /// Takes `n` tokens at once even if fewer are left (the bucket goes into debt), and
    /// says how long until the debt is paid: for pacing a stream (the upload bandwidth, in
    /// bytes), where nothing is refused, only delayed. Zero while the bucket held enough.
    pub fn take_paced(&mut self, limit: Limit, n: f64, now_ms: u64) -> std::time::Duration {
        self.refill(limit, now_ms);
        self.tokens -= n;
        if self.tokens >= 0.0 {
            std::time::Duration::ZERO
        } else {
            std::time::Duration::from_secs_f64(-self.tokens / limit.rate)
        }
    }

    fn is_full(&self, limit: Limit, now_ms: u64) -> bool {
        let mut b = *self;
        b.refill(limit, now_ms);
        b.tokens >= limit.burst
    }
}

/// A full map is swept for refilled buckets at most this often (ms).
pub const SWEEP_EVERY_MS: u64 = 100;

/// A bucket per key.
#[derive(Debug)]
pub struct PerKey<K> {
    limit: Limit,
    buckets: HashMap<K, TokenBucket>,
    bound: usize,
    last_sweep_ms: Option<u64>,
}

impl<K: Hash + Eq + Clone> PerKey<K> {
    /// Buckets of `limit`, dropping full ones once more than `bound` keys are held.
    pub fn new(limit: Limit, bound: usize) -> PerKey<K> {
        PerKey {
            limit,
            buckets: HashMap::new(),
            bound,
            last_sweep_ms: None,
        }
    }

    /// Takes a token from `key`'s bucket, or says how many milliseconds until one is due.
    pub fn take(&mut self, key: &K, now_ms: u64) -> Result<(), u64> {
        let limit = self.limit;
        if self.buckets.len() >= self.bound && !self.buckets.contains_key(key) {
            if self
                .last_sweep_ms
                .is_none_or(|t| now_ms >= t.saturating_add(SWEEP_EVERY_MS))
            {
                self.last_sweep_ms = Some(now_ms);
                self.buckets.retain(|_, b| !b.is_full(limit, now_ms));
            }
            if self.buckets.len() >= self.bound {
                return TokenBucket::full(limit, now_ms).take(limit, now_ms);
            }
        }
        self.buckets
            .entry(key.clone())
            .or_insert_with(|| TokenBucket::full(limit, now_ms))
            .take(limit, now_ms)
    }

    /// Whether `key` has a token now (nothing is taken).
    pub fn has_token(&self, key: &K, now_ms: u64) -> bool {
        self.buckets.get(key).is_none_or(|b| {
            let mut b = *b;
            b.refill(self.limit, now_ms);
            b.tokens >= 1.0
        })
    }

    /// How many keys hold state.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether no key holds state.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const L: Limit = Limit {
        rate: 10.0,
        burst: 5.0,
    };

    #[test]
    fn a_full_bucket_gives_its_burst_then_refills_at_the_rate() {
        let mut b = TokenBucket::full(L, 1_000);
        for _ in 0..5 {
            assert_eq!(b.take(L, 1_000), Ok(()));
        }
        assert_eq!(b.take(L, 1_000), Err(100), "one token every 100 ms");
        assert_eq!(b.take(L, 1_050), Err(50));
        assert_eq!(b.take(L, 1_100), Ok(()));
        assert_eq!(b.take(L, 1_100), Err(100));
        // A long pause refills to the burst, no more.
        for _ in 0..5 {
            assert_eq!(b.take(L, 60_000), Ok(()));
        }
        assert!(b.take(L, 60_000).is_err());
    }

    #[test]
    fn a_clock_going_back_refills_nothing() {
        let mut b = TokenBucket::full(L, 10_000);
        for _ in 0..5 {
            b.take(L, 10_000).unwrap();
        }
        assert!(b.take(L, 5_000).is_err());
        assert!(b.take(L, 10_000).is_err(), "the earlier time moved nothing");
        assert_eq!(b.take(L, 10_100), Ok(()));
    }

    #[test]
    fn keys_have_their_own_buckets_and_full_ones_are_dropped_past_the_bound() {
        let mut p = PerKey::new(L, 2);
        for _ in 0..5 {
            p.take(&"a", 0).unwrap();
        }
        assert!(p.take(&"a", 0).is_err());
        assert_eq!(p.take(&"b", 0), Ok(()), "b is not held back by a");
        assert_eq!(p.len(), 2);
        // Later, both have refilled: a third key drops them rather than growing the map.
        p.take(&"c", 10_000).unwrap();
        assert_eq!(p.len(), 1);
        // An empty bucket is never dropped: its caller cannot escape the limit that way.
        let mut p = PerKey::new(L, 1);
        for _ in 0..5 {
            p.take(&"a", 0).unwrap();
        }
        p.take(&"b", 0).unwrap();
        assert!(p.take(&"a", 0).is_err());
        assert_eq!(p.len(), 1, "b was judged on a bucket not kept");
    }

    #[test]
    fn made_up_keys_never_grow_the_map_nor_scan_it_each() {
        let slow = Limit {
            rate: 1.0,
            burst: 1.0,
        };
        let mut p = PerKey::new(slow, 100);
        for k in 0..10_000u32 {
            assert_eq!(p.take(&k, 5), Ok(()), "a new key has its burst");
        }
        assert_eq!(p.len(), 100);
        assert!(p.take(&0, 5).is_err(), "a kept key is still limited");
        assert!(!p.has_token(&0, 5) && p.has_token(&0, 1_005) && p.has_token(&77_777, 5));
        // Once they refill, the next sweep makes room again.
        p.take(&20_000, 2_000).unwrap();
        assert_eq!(p.len(), 1);
    }

    proptest! {
        /// Over any run of requests, no more pass than the burst plus the rate times the
        /// time elapsed.
        #[test]
        fn never_more_than_burst_plus_rate_times_time(gaps in proptest::collection::vec(0u64..300, 1..400)) {
            let mut b = TokenBucket::full(L, 0);
            let (mut now, mut passed) = (0u64, 0u64);
            for g in gaps {
                now += g;
                if b.take(L, now).is_ok() {
                    passed += 1;
                }
                let allowed = L.burst + L.rate * now as f64 / 1000.0;
                prop_assert!(passed as f64 <= allowed + 1e-9, "{passed} > {allowed}");
            }
        }
    }
}
