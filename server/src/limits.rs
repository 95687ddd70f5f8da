//! Per-token publish rates (GCRA, governor): each limited token has a limiter of its own.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

/// The limiters of the tokens seen so far, by token id.
#[derive(Default)]
pub(crate) struct Limits {
    limiters: Mutex<HashMap<String, (u32, Arc<DefaultDirectRateLimiter>)>>,
}

impl Limits {
    /// Take one publish from token `id`'s allowance of `per_second` (bursts of as many);
    /// `Err(seconds)` to wait when it is spent.
    pub(crate) fn check(&self, id: &str, per_second: u32) -> Result<(), u64> {
        let Some(rate) = NonZeroU32::new(per_second) else {
            return Ok(());
        };
        let limiter = {
            let mut limiters = self.limiters.lock().unwrap_or_else(|e| e.into_inner());
            if limiters.len() > 10_000 {
                limiters.clear(); // a bound, not a policy: limits restart from full
            }
            let entry = limiters.entry(id.to_owned()).or_insert_with(|| {
                (
                    per_second,
                    Arc::new(RateLimiter::direct(Quota::per_second(rate))),
                )
            });
            if entry.0 != per_second {
                *entry = (
                    per_second,
                    Arc::new(RateLimiter::direct(Quota::per_second(rate))),
                );
            }
            entry.1.clone()
        };
        limiter.check().map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_gets_its_rate_and_then_a_wait_of_whole_seconds() {
        let limits = Limits::default();
        for _ in 0..3 {
            assert!(limits.check("a", 3).is_ok());
        }
        assert_eq!(limits.check("a", 3), Err(1));
        assert!(
            limits.check("b", 3).is_ok(),
            "tokens are limited separately"
        );
    }
}
