//! Rates and the limiter behind [`RateLimitLayer`](crate::middleware::RateLimitLayer) and
//! [`PublisherBuilder::rate_limit`](crate::PublisherBuilder::rate_limit).

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::error::{Error, Result};

/// A rate: so many messages per period, with a burst.
///
/// The limit is a generic cell rate (GCRA, the token bucket without the bucket): messages
/// are spaced evenly at `period / count`, and up to `burst` may go at once after a quiet
/// spell. Time is tokio's, so in a test with paused time a limited worker runs instantly
/// and exactly.
///
/// ```
/// use std::time::Duration;
/// use rabbitry::Rate;
///
/// let rate = Rate::per_second(100)?.burst(20);
/// let slow = Rate::new(3, Duration::from_secs(60))?; // three a minute, one at a time
/// assert!(Rate::per_second(0).is_err());
/// # Ok::<(), rabbitry::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    interval: Duration,
    burst: u32,
}

/// The longest spacing a rate may have.
const MAX_INTERVAL: Duration = Duration::from_secs(24 * 3600);

impl Rate {
    /// `count` messages per `period`, one at a time (a burst of 1). Fails with
    /// [`Error::Config`] when `count` or `period` is zero, or the rate is slower than one
    /// a day.
    pub fn new(count: u32, period: Duration) -> Result<Rate> {
        if count == 0 || period.is_zero() {
            return Err(Error::Config(format!(
                "a rate needs a count and a period above zero (got {count} per {period:?}); \
                 to stop a worker, pause it"
            )));
        }
        let interval = period / count;
        if interval.is_zero() {
            return Err(Error::Config(format!(
                "a rate of {count} per {period:?} is faster than one a nanosecond: leave the \
                 limit out instead"
            )));
        }
        if interval > MAX_INTERVAL {
            return Err(Error::Config(format!(
                "a rate of {count} per {period:?} is slower than one a day, the slowest \
                 supported; schedule the work instead"
            )));
        }
        Ok(Rate { interval, burst: 1 })
    }

    /// `count` messages per second, one at a time.
    pub fn per_second(count: u32) -> Result<Rate> {
        Rate::new(count, Duration::from_secs(1))
    }

    /// Let up to `burst` messages go at once after a quiet spell (at least 1).
    pub fn burst(mut self, burst: u32) -> Rate {
        self.burst = burst.max(1);
        self
    }

    /// The spacing between two messages at the steady rate.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// How many messages may go at once.
    pub fn burst_size(&self) -> u32 {
        self.burst
    }
}

/// The shared state of one limit: the theoretical arrival time of the next message.
#[derive(Debug)]
pub(crate) struct Limiter {
    rate: Rate,
    next: Mutex<Option<Instant>>,
}

impl Limiter {
    pub(crate) fn new(rate: Rate) -> Limiter {
        Limiter {
            rate,
            next: Mutex::new(None),
        }
    }

    /// Take a slot now, or say when one will be free.
    pub(crate) fn acquire(&self, now: Instant) -> std::result::Result<(), Instant> {
        let mut next = crate::lock(&self.next);
        let due = next.map_or(now, |t| t.max(now));
        let tolerance = self.rate.interval.saturating_mul(self.rate.burst - 1);
        let allowed_from = due.checked_sub(tolerance).unwrap_or(now);
        if now >= allowed_from {
            *next = Some(due + self.rate.interval);
            Ok(())
        } else {
            Err(allowed_from)
        }
    }

    /// Wait for a slot and take it.
    pub(crate) async fn until_ready(&self) {
        while let Err(at) = self.acquire(Instant::now()) {
            tokio::time::sleep_until(at).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_spaces_evenly() {
        let limiter = Limiter::new(Rate::per_second(10).unwrap().burst(3));
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(limiter.acquire(t0), Ok(()));
        }
        let wait = limiter.acquire(t0).unwrap_err();
        assert_eq!(wait - t0, Duration::from_millis(100));
        assert_eq!(limiter.acquire(wait), Ok(()));
        assert_eq!(
            limiter.acquire(wait).unwrap_err() - wait,
            Duration::from_millis(100)
        );
        // A quiet spell refills the burst, never beyond it.
        let later = wait + Duration::from_secs(10);
        for _ in 0..3 {
            assert_eq!(limiter.acquire(later), Ok(()));
        }
        assert!(limiter.acquire(later).is_err());
    }

    #[test]
    fn zero_rates_are_refused_and_huge_ones_do_not_overflow() {
        assert!(Rate::new(0, Duration::from_secs(1)).is_err());
        assert!(Rate::new(1, Duration::ZERO).is_err());
        assert!(Rate::new(1, Duration::MAX).is_err());
        assert!(Rate::new(1, Duration::from_secs(86_400)).is_ok());
        assert!(Rate::per_second(u32::MAX).is_err());
        let fast = Limiter::new(Rate::per_second(1_000_000_000).unwrap().burst(u32::MAX));
        let now = Instant::now();
        for _ in 0..1000 {
            assert_eq!(fast.acquire(now), Ok(()));
        }
    }
}
