//! The upload retry policy: what a store's status means ([`classify`], which the stores
//! apply), and how long to wait after a transient failure ([`Policy::after_transient`],
//! which the uploader applies). Pure functions of (policy, attempts, status or wait asked,
//! a random number), tested on fixed inputs; the uploader supplies the randomness and the
//! clock.
//!
//! Rules (docs/operations.md, "Retry"): 5xx, 408, 429, timeouts and connection errors are
//! retried, forever by default, with exponential backoff and full jitter applied after the cap (the wait is
//! uniform between zero and `min(max, initial × 2^(attempts−1))`, so a thousand appliances
//! that lost the store at the same moment do not come back in step). A `Retry-After` the
//! store sends is a floor for the wait, within the cap. 409 and 412 mean "something is
//! already there": the store looks at what (same SHA-256: done; another: a conflict). Every
//! other 4xx is permanent: the package goes to `failed/` with the reason, never deleted.

use std::time::Duration;

/// The policy's knobs (`[upload]`: `retry_initial_ms`, `retry_max_ms`, `max_attempts`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// The first wait's upper bound.
    pub initial: Duration,
    /// The cap on any wait.
    pub max: Duration,
    /// Give up (to `failed/`) after this many attempts; `None` retries forever.
    pub max_attempts: Option<u32>,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(300),
            max_attempts: None,
        }
    }
}

/// What to do after a transient failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Try again after this long.
    RetryAfter(Duration),
    /// Give up: the package goes to `failed/`.
    Fail,
}

/// The class of an HTTP status.
pub fn classify(code: u16) -> Class {
    match code {
        200..=299 => Class::Success,
        409 | 412 => Class::Exists,
        408 | 429 | 500..=599 => Class::Transient,
        _ => Class::Permanent,
    }
}

/// See [`classify`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// 2xx.
    Success,
    /// 409, 412: something is already under the key.
    Exists,
    /// 408, 429, 5xx.
    Transient,
    /// Every other status (auth, bad request, not found, …).
    Permanent,
}

impl Policy {
    /// The verdict on attempt number `attempts` that failed transiently (the store already
    /// told transient from permanent): retry after a jittered wait, or give up if attempts
    /// are bounded and used up.
    pub fn after_transient(
        &self,
        attempts: u32,
        retry_after: Option<Duration>,
        random: u64,
    ) -> Verdict {
        if self.max_attempts.is_some_and(|m| attempts >= m) {
            return Verdict::Fail;
        }
        Verdict::RetryAfter(self.wait(attempts, retry_after, random))
    }

    /// The wait before attempt `attempts + 1`: full jitter under the capped exponential
    /// bound, raised to `retry_after` (itself capped) if the store asked for more.
    pub fn wait(&self, attempts: u32, retry_after: Option<Duration>, random: u64) -> Duration {
        let bound = self.bound(attempts);
        let bound_ms = u64::try_from(bound.as_millis()).unwrap_or(u64::MAX);
        let jitter = Duration::from_millis(random % bound_ms.saturating_add(1));
        match retry_after {
            Some(asked) => jitter.max(asked.min(self.max)),
            None => jitter,
        }
    }

    /// `min(max, initial × 2^(attempts−1))`.
    pub fn bound(&self, attempts: u32) -> Duration {
        let doublings = attempts.saturating_sub(1).min(63);
        let factor = 1u64 << doublings;
        let initial_ms = u64::try_from(self.initial.as_millis()).unwrap_or(u64::MAX);
        let max_ms = u64::try_from(self.max.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(initial_ms.saturating_mul(factor).min(max_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: Policy = Policy {
        initial: Duration::from_millis(1000),
        max: Duration::from_millis(300_000),
        max_attempts: None,
    };

    #[test]
    fn statuses_are_classified_as_the_design_says() {
        for code in [200, 201, 204] {
            assert_eq!(classify(code), Class::Success, "{code}");
        }
        for code in [409, 412] {
            assert_eq!(classify(code), Class::Exists, "{code}");
        }
        for code in [400, 401, 403, 404, 405, 411, 413] {
            assert_eq!(classify(code), Class::Permanent, "{code}");
        }
        for code in [500, 502, 503, 504, 408, 429] {
            assert_eq!(classify(code), Class::Transient, "{code}");
        }
    }

    #[test]
    fn the_bound_doubles_to_the_cap_and_the_jitter_stays_under_it() {
        let ms = |d: Duration| d.as_millis() as u64;
        assert_eq!(ms(P.bound(1)), 1000);
        assert_eq!(ms(P.bound(2)), 2000);
        assert_eq!(ms(P.bound(9)), 256_000);
        assert_eq!(ms(P.bound(10)), 300_000);
        assert_eq!(ms(P.bound(u32::MAX)), 300_000);
        // Full jitter: anything from 0 to the bound, drawn from the random number.
        assert_eq!(ms(P.wait(3, None, 0)), 0);
        assert_eq!(ms(P.wait(3, None, 4000)), 4000);
        assert_eq!(ms(P.wait(3, None, 4001)), 0);
        assert_eq!(ms(P.wait(3, None, 2500)), 2500);
        for r in [1u64, 77, 123_456_789, u64::MAX] {
            assert!(P.wait(40, None, r) <= P.max);
        }
    }

    #[test]
    fn retry_after_is_a_floor_within_the_cap() {
        let asked = |s| Some(Duration::from_secs(s));
        assert_eq!(
            P.after_transient(1, asked(30), 0),
            Verdict::RetryAfter(Duration::from_secs(30))
        );
        assert_eq!(
            P.after_transient(1, asked(86_400), 0),
            Verdict::RetryAfter(P.max),
            "a store cannot park a package for a day"
        );
        assert_eq!(
            P.after_transient(12, asked(1), 299_000),
            Verdict::RetryAfter(Duration::from_millis(299_000))
        );
    }

    #[test]
    fn forever_by_default_bounded_if_asked() {
        assert!(matches!(
            P.after_transient(1_000_000, None, 5),
            Verdict::RetryAfter(_)
        ));
        let bounded = Policy {
            max_attempts: Some(3),
            ..P
        };
        assert!(matches!(
            bounded.after_transient(2, None, 5),
            Verdict::RetryAfter(_)
        ));
        assert_eq!(bounded.after_transient(3, None, 5), Verdict::Fail);
    }
}
