//! Broker-held delays: a binary cascade of time-to-live tiers.
//!
//! Tier `n` is a headers exchange and a classic queue, both `<exchange>.delay.<ms>` where
//! `ms` is 100 × 2ⁿ; the queue holds messages for exactly `ms` and then dead-letters them
//! to the next lower tier's exchange (tier 0: to `<exchange>` itself), keeping their
//! routing key. A delay of `u` units of 100 ms is written in binary into the headers
//! `rabbitry-delay-<n>` = `"1"`/`"0"` for every tier up to its highest set bit, and
//! published to that tier's exchange. Each tier exchange sends a message whose bit is 1
//! into its queue and one whose bit is 0 straight on down (an exchange-to-exchange binding;
//! below tier 0, into `<exchange>.delay.due`, a queue with a time-to-live of zero that
//! dead-letters to `<exchange>` at once), so the message waits in exactly the tiers of its
//! set bits: `u` × 100 ms in all, and always arrives dead-lettered from a queue into
//! `<exchange>` — its delivery names `<exchange>` and its own routing key, like any other
//! message. Every message of one tier waits the same time, so the oldest always expires
//! first and a short delay never waits behind a long one.
//!
//! RabbitMQ caps a queue's time-to-live at 2³² − 1 ms (≈ 49.7 days): 26 tiers (the largest
//! ≈ 38.8 days) give delays up to (2²⁶ − 1) × 100 ms ≈ 77.7 days.

use std::time::{Duration, SystemTime};

use lapin::types::FieldTable;

use super::{Arg, classic, declare_error};
use crate::broker::Channel;
use crate::error::{Error, Result};
use crate::headers;

/// The resolution of broker-held delays: a delay is rounded up to a multiple of this.
pub const DELAY_PRECISION: Duration = Duration::from_millis(UNIT_MS);

/// The longest delay the broker can hold: (2²⁶ − 1) × 100 ms, about 77 days 16 hours.
pub const MAX_DELAY: Duration = Duration::from_millis(((1 << LEVELS) - 1) * UNIT_MS);

const UNIT_MS: u64 = 100;
const LEVELS: u32 = 26;

/// The exchange and queue of tier `level` of `exchange`.
fn tier_name(exchange: &str, level: u32) -> String {
    format!("{exchange}.delay.{}", UNIT_MS << level)
}

/// The queue that hands a message whose tier-0 bit is 0 on to `exchange`.
pub(crate) fn due_name(exchange: &str) -> String {
    format!("{exchange}.delay.due")
}

/// The names of the delay tiers of `exchange`: each is an exchange and a queue of that
/// name, besides the queue `<exchange>.delay.due`.
pub(crate) fn tier_names(exchange: &str) -> Vec<String> {
    (0..LEVELS).map(|n| tier_name(exchange, n)).collect()
}

/// The header carrying bit `level` of a delay.
fn bit_header(level: u32) -> String {
    format!("rabbitry-delay-{level}")
}

/// Where a delayed message goes: the tier exchange to publish it to and the headers that
/// route it down the cascade.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct DelayRoute {
    pub(crate) exchange: String,
    pub(crate) headers: Vec<(String, &'static str)>,
}

impl DelayRoute {
    /// Write the route's bits into `table`, and the time the message is due when known.
    pub(crate) fn mark(&self, table: &mut FieldTable, due: Option<SystemTime>) {
        for (key, bit) in &self.headers {
            headers::set(table, key, headers::string(bit));
        }
        if let Some(due) = due {
            let due = headers::string(&headers::timestamp(due));
            headers::set(table, headers::DELAYED_UNTIL, due);
        }
    }
}

/// The route of a message for `exchange` delayed by `delay` (rounded up to the
/// precision); `None` for a delay under one unit's worth of nothing (zero).
pub(crate) fn route(exchange: &str, delay: Duration) -> Result<Option<DelayRoute>> {
    let units = delay.as_nanos().div_ceil(u128::from(UNIT_MS) * 1_000_000);
    if units == 0 {
        return Ok(None);
    }
    if units >= 1 << LEVELS {
        return Err(Error::Config(format!(
            "a delay of {} is longer than the broker can hold ({}); \
             store the event and publish it later, or use a cron schedule",
            humantime::format_duration(delay),
            humantime::format_duration(MAX_DELAY)
        )));
    }
    let top = 127 - units.leading_zeros();
    let headers = (0..=top)
        .map(|n| (bit_header(n), if units >> n & 1 == 1 { "1" } else { "0" }))
        .collect();
    Ok(Some(DelayRoute {
        exchange: tier_name(exchange, top),
        headers,
    }))
}

/// Declare the delay tiers of `exchange` (and `exchange` itself). Idempotent.
pub(crate) async fn declare(ch: &Channel, exchange: &str) -> Result<()> {
    ch.declare_exchange(exchange, "topic")
        .await
        .map_err(|e| declare_error("exchange", exchange, e))?;
    for level in 0..LEVELS {
        let tier = tier_name(exchange, level);
        ch.declare_exchange(&tier, "headers")
            .await
            .map_err(|e| declare_error("exchange", &tier, e))?;
    }
    let due = due_name(exchange);
    declare_tier_queue(ch, &due, 0, exchange).await?;
    for level in 0..LEVELS {
        let tier = tier_name(exchange, level);
        // Where the tier's queue hands its messages on, and its bit-0 messages go.
        let below = match level {
            0 => exchange.to_owned(),
            n => tier_name(exchange, n - 1),
        };
        declare_tier_queue(ch, &tier, UNIT_MS << level, &below).await?;
        let bit = bit_header(level);
        ch.bind_headers(&tier, false, &tier, &[(&bit, "1")])
            .await
            .map_err(|e| declare_error("binding", &format!("{tier} -> {tier}"), e))?;
        let zero = match level {
            0 => ch.bind_headers(&due, false, &tier, &[(&bit, "0")]).await,
            _ => ch.bind_headers(&below, true, &tier, &[(&bit, "0")]).await,
        };
        zero.map_err(|e| declare_error("binding", &format!("{tier} (bit 0)"), e))?;
    }
    Ok(())
}

/// A durable classic queue holding messages `ttl_ms`, then dead-lettering them to `next`
/// with their routing key.
async fn declare_tier_queue(ch: &Channel, name: &str, ttl_ms: u64, next: &str) -> Result<()> {
    let spec = classic(
        name.to_owned(),
        vec![
            ("x-message-ttl", Arg::Int(ttl_ms as i64)),
            ("x-dead-letter-exchange", Arg::Str(next.to_owned())),
        ],
    );
    ch.declare_queue(name, spec.field_table())
        .await
        .map(drop)
        .map_err(|e| declare_error("queue", name, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delay_is_written_in_binary_from_its_highest_tier_down() {
        // 2.5 s = 25 units = 0b11001: tiers 4 (1.6 s), 3 (0.8 s) and 0 (0.1 s).
        let r = route("events", Duration::from_millis(2500))
            .unwrap()
            .unwrap();
        assert_eq!(r.exchange, "events.delay.1600");
        let bits: Vec<&str> = r.headers.iter().map(|(_, v)| *v).collect();
        assert_eq!(bits, ["1", "0", "0", "1", "1"]);
        assert_eq!(r.headers[4].0, "rabbitry-delay-4");
    }

    #[test]
    fn delays_round_up_never_down() {
        let r = route("e", Duration::from_millis(101)).unwrap().unwrap();
        // 2 units: tier 1 only.
        assert_eq!(r.exchange, "e.delay.200");
        assert_eq!(
            r.headers,
            [
                ("rabbitry-delay-0".into(), "0"),
                ("rabbitry-delay-1".into(), "1")
            ]
        );
        assert_eq!(
            route("e", Duration::from_nanos(1))
                .unwrap()
                .unwrap()
                .exchange,
            "e.delay.100"
        );
        assert!(route("e", Duration::ZERO).unwrap().is_none());
    }

    #[test]
    fn the_longest_delay_fits_and_one_more_unit_does_not() {
        let r = route("e", MAX_DELAY).unwrap().unwrap();
        assert_eq!(r.headers.len(), LEVELS as usize);
        assert!(r.headers.iter().all(|(_, v)| *v == "1"));
        // The largest tier's time-to-live stays within RabbitMQ's 2^32 - 1 ms.
        assert!(UNIT_MS << (LEVELS - 1) <= u64::from(u32::MAX));
        let e = route("e", MAX_DELAY + DELAY_PRECISION).unwrap_err();
        assert!(
            e.to_string().contains("longer than the broker can hold"),
            "{e}"
        );
        assert!(route("e", Duration::MAX).is_err());
    }
}
