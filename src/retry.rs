//! Retry policies and the delay tiers they need on the broker.

use std::time::Duration;

/// How often and how long to wait before handling a failed message again.
///
/// Delays wait in the broker, in one TTL queue per distinct delay (a *tier*), so a crash
/// loses nothing and a waiting retry holds no prefetch slot. The delay before retry `n`
/// (1-based) is `initial × factorⁿ⁻¹`, capped at `max_delay`. After `max_attempts`
/// handler runs in total, the message goes to the worker's dead-letter queue.
///
/// ```
/// use rabbitry::RetryPolicy;
/// use std::time::Duration;
///
/// let policy = RetryPolicy::exponential(Duration::from_secs(1))
///     .factor(3.0)
///     .max_delay(Duration::from_secs(10))
///     .max_attempts(5);
/// let delays: Vec<_> = (1..5).map(|n| policy.delay_before_retry(n)).collect();
/// assert_eq!(delays, [1, 3, 9, 10].map(Duration::from_secs));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    initial: Duration,
    factor: f64,
    max_delay: Duration,
    max_attempts: u32,
}

/// The longest delay a tier can hold: `x-message-ttl` is an unsigned 32-bit count of ms.
const MAX_TIER_MS: u64 = u32::MAX as u64;

impl RetryPolicy {
    /// Exponential backoff starting at `initial`, doubling, capped at 5 minutes,
    /// 5 attempts in total.
    pub fn exponential(initial: Duration) -> RetryPolicy {
        RetryPolicy {
            initial,
            factor: 2.0,
            max_delay: Duration::from_secs(300),
            max_attempts: 5,
        }
    }

    /// No retries: a failed message goes straight to the dead-letter queue.
    pub fn none() -> RetryPolicy {
        RetryPolicy::exponential(Duration::from_secs(1)).max_attempts(1)
    }

    /// Multiply the delay by `factor` after each retry (at least 1.0).
    pub fn factor(mut self, factor: f64) -> RetryPolicy {
        self.factor = factor;
        self
    }

    /// Never wait longer than `max_delay` between attempts.
    pub fn max_delay(mut self, max_delay: Duration) -> RetryPolicy {
        self.max_delay = max_delay;
        self
    }

    /// Run the handler at most `max_attempts` times in total (1 means no retries).
    pub fn max_attempts(mut self, max_attempts: u32) -> RetryPolicy {
        self.max_attempts = max_attempts;
        self
    }

    /// The total number of handler runs allowed.
    pub fn attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The delay before retry `n` (1 is the first retry, after the first failure).
    pub fn delay_before_retry(&self, n: u32) -> Duration {
        Duration::from_millis(self.tier_ms(n))
    }

    /// The tier (whole milliseconds) that holds retry `n`.
    pub(crate) fn tier_ms(&self, n: u32) -> u64 {
        let exp = i32::try_from(n.saturating_sub(1)).unwrap_or(i32::MAX);
        let ms = self.initial.as_secs_f64() * 1000.0 * self.factor.powi(exp);
        let cap = self.max_delay.as_millis().min(u128::from(MAX_TIER_MS)) as u64;
        // `as` saturates for floats: an overflowing power becomes u64::MAX, then the cap.
        (ms.ceil() as u64).clamp(1, cap.max(1))
    }

    /// The distinct tiers this policy uses, shortest first.
    pub(crate) fn tiers(&self) -> Vec<u64> {
        let mut tiers: Vec<u64> = (1..self.max_attempts).map(|n| self.tier_ms(n)).collect();
        tiers.dedup();
        tiers
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.max_attempts == 0 {
            return Err("retry max_attempts must be at least 1 (1 means no retries)".into());
        }
        if self.max_attempts > 1 && self.initial.is_zero() {
            return Err("retry initial delay must be at least 1ms".into());
        }
        if !self.factor.is_finite() || self.factor < 1.0 {
            return Err(format!(
                "retry factor must be a finite number >= 1.0, got {}",
                self.factor
            ));
        }
        if self.max_delay < self.initial {
            return Err(format!(
                "retry max_delay ({:?}) is shorter than the initial delay ({:?})",
                self.max_delay, self.initial
            ));
        }
        if self.max_delay.as_millis() > u128::from(MAX_TIER_MS) {
            return Err(format!(
                "retry max_delay must be at most {}ms (the broker's TTL limit), got {:?}",
                MAX_TIER_MS, self.max_delay
            ));
        }
        Ok(())
    }
}

impl Default for RetryPolicy {
    /// `exponential(1s)`: 1s, 2s, 4s, 8s, then the dead-letter queue.
    fn default() -> Self {
        RetryPolicy::exponential(Duration::from_secs(1))
    }
}

/// The tier that holds a retry requested with an explicit delay: the delay rounded up to
/// two significant digits of milliseconds, so that arbitrary delays share few queues.
pub(crate) fn tier_for_delay(delay: Duration) -> u64 {
    let ms = delay.as_millis().clamp(1, u128::from(MAX_TIER_MS)) as u64;
    if ms < 100 {
        return ms;
    }
    let step = 10u64.pow(ms.ilog10() - 1);
    ms.div_ceil(step).saturating_mul(step).min(MAX_TIER_MS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exponential_tiers_are_capped_and_distinct() {
        let p = RetryPolicy::exponential(Duration::from_millis(100))
            .max_delay(Duration::from_millis(500))
            .max_attempts(6);
        assert_eq!(p.tiers(), vec![100, 200, 400, 500]);
        assert_eq!(p.tier_ms(5), 500);
    }

    #[test]
    fn a_single_attempt_needs_no_tier() {
        assert!(RetryPolicy::none().tiers().is_empty());
        assert_eq!(RetryPolicy::none().validate(), Ok(()));
    }

    #[test]
    fn default_policy_is_valid_with_four_retries() {
        let p = RetryPolicy::default();
        assert_eq!(p.validate(), Ok(()));
        assert_eq!(p.tiers(), vec![1000, 2000, 4000, 8000]);
    }

    #[test]
    fn huge_attempt_numbers_saturate_at_the_cap() {
        let p = RetryPolicy::exponential(Duration::from_secs(1)).max_attempts(u32::MAX);
        assert_eq!(p.tier_ms(u32::MAX), 300_000);
    }

    #[test]
    fn invalid_policies_are_refused_with_a_reason() {
        let base = RetryPolicy::exponential(Duration::from_secs(1));
        assert!(
            base.clone()
                .max_attempts(0)
                .validate()
                .unwrap_err()
                .contains("max_attempts")
        );
        assert!(
            base.clone()
                .factor(0.5)
                .validate()
                .unwrap_err()
                .contains("factor")
        );
        assert!(base.clone().factor(f64::NAN).validate().is_err());
        assert!(
            base.clone()
                .max_delay(Duration::from_millis(10))
                .validate()
                .unwrap_err()
                .contains("shorter")
        );
        assert!(RetryPolicy::exponential(Duration::ZERO).validate().is_err());
        assert!(
            base.max_delay(Duration::from_secs(60 * 24 * 3600))
                .validate()
                .unwrap_err()
                .contains("TTL")
        );
    }

    #[test]
    fn explicit_delays_round_up_to_two_significant_digits() {
        assert_eq!(tier_for_delay(Duration::from_millis(0)), 1);
        assert_eq!(tier_for_delay(Duration::from_millis(57)), 57);
        assert_eq!(tier_for_delay(Duration::from_millis(1234)), 1300);
        assert_eq!(tier_for_delay(Duration::from_millis(999)), 1000);
        assert_eq!(tier_for_delay(Duration::from_secs(30)), 30_000);
        assert_eq!(
            tier_for_delay(Duration::from_secs(u64::MAX)),
            u64::from(u32::MAX)
        );
    }
}
