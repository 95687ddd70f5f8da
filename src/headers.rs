//! Names of the headers rabbitry reads and writes, and tolerant readers for them.
//!
//! Headers arrive from any AMQP client, so every reader accepts any integer or string
//! encoding and never panics on a value of an unexpected type.

use std::time::SystemTime;

use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

/// Number of retries already made (0 or absent on a first delivery).
pub const RETRY_COUNT: &str = "x-retry-count";
/// When the message first failed (RFC 3339, UTC, milliseconds).
pub const FIRST_FAILURE_AT: &str = "x-first-failure-at";
/// When the message last failed (RFC 3339, UTC, milliseconds).
pub const LAST_FAILURE_AT: &str = "x-last-failure-at";
/// The last failure's message, truncated to [`MAX_EXCEPTION_MESSAGE`] bytes.
pub const EXCEPTION_MESSAGE: &str = "x-exception-message";
/// The last failure's kind: see [`FailureKind`](crate::FailureKind).
pub const EXCEPTION_KIND: &str = "x-exception-kind";
/// The worker whose handler failed.
pub const HANDLER: &str = "x-handler";
/// The exchange the message was first published to.
pub const ORIGINAL_EXCHANGE: &str = "x-original-exchange";
/// The routing key the message was first published with.
pub const ORIGINAL_ROUTING_KEY: &str = "x-original-routing-key";
/// The worker queue the message failed in.
pub const ORIGINAL_QUEUE: &str = "x-original-queue";
/// The version of the event's schema, written by the publisher when it is not 1.
pub const EVENT_VERSION: &str = "x-event-version";
/// When a delayed message is due (RFC 3339, UTC, milliseconds): see
/// [`Outgoing::delay`](crate::Outgoing::delay).
pub const DELAYED_UNTIL: &str = "x-delayed-until";
/// The [`Schedule`](crate::Schedule) whose tick published the event.
pub const SCHEDULE: &str = "x-schedule";
/// When the tick that published the event was due (RFC 3339, UTC, milliseconds).
pub const SCHEDULED_AT: &str = "x-scheduled-at";
/// The [`Saga`](crate::Saga) whose step published the event.
pub const SAGA: &str = "x-saga";
/// Written by RabbitMQ itself when it dead-letters a message; rabbitry keeps it as is.
pub const X_DEATH: &str = "x-death";

/// The headers a failure writes on a retry or dead-letter copy: what a fresh copy of the
/// message (a redrive, a routed copy) leaves out so that it starts with a whole retry
/// budget and no failure.
pub const FAILURE: [&str; 6] = [
    RETRY_COUNT,
    FIRST_FAILURE_AT,
    LAST_FAILURE_AT,
    EXCEPTION_MESSAGE,
    EXCEPTION_KIND,
    HANDLER,
];

/// Upper bound on the size of [`EXCEPTION_MESSAGE`], in bytes.
pub const MAX_EXCEPTION_MESSAGE: usize = 1024;

/// Read a non-negative integer header, whatever integer (or decimal string) type the
/// sender used. Negative, fractional or non-numeric values read as `None`.
pub(crate) fn get_u64(headers: Option<&FieldTable>, key: &str) -> Option<u64> {
    let value = headers?.inner().get(key)?;
    match value {
        AMQPValue::ShortShortInt(v) => u64::try_from(*v).ok(),
        AMQPValue::ShortShortUInt(v) => Some(u64::from(*v)),
        AMQPValue::ShortInt(v) => u64::try_from(*v).ok(),
        AMQPValue::ShortUInt(v) => Some(u64::from(*v)),
        AMQPValue::LongInt(v) => u64::try_from(*v).ok(),
        AMQPValue::LongUInt(v) => Some(u64::from(*v)),
        AMQPValue::LongLongInt(v) => u64::try_from(*v).ok(),
        AMQPValue::Timestamp(v) => Some(*v),
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?.trim().parse().ok(),
        AMQPValue::ShortString(s) => s.as_str().trim().parse().ok(),
        _ => None,
    }
}

/// Read a string header (long or short string, valid UTF-8 only).
pub(crate) fn get_str<'a>(headers: Option<&'a FieldTable>, key: &str) -> Option<&'a str> {
    match headers?.inner().get(key)? {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str()),
        _ => None,
    }
}

/// A string header value.
pub(crate) fn string(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value.as_bytes()))
}

/// Set `key` in `table`.
pub(crate) fn set(table: &mut FieldTable, key: &str, value: AMQPValue) {
    table.insert(ShortString::from(key), value);
}

/// `s` cut to at most `max` bytes on a character boundary, with an ellipsis when cut.
pub(crate) fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    const ELLIPSIS: &str = "…";
    let mut end = max.saturating_sub(ELLIPSIS.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{ELLIPSIS}", &s[..end])
}

/// `time` as RFC 3339 in UTC with millisecond precision.
pub(crate) fn timestamp(time: SystemTime) -> String {
    humantime::format_rfc3339_millis(time).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(key: &str, value: AMQPValue) -> FieldTable {
        let mut t = FieldTable::default();
        set(&mut t, key, value);
        t
    }

    #[test]
    fn integers_of_every_width_and_strings_are_read() {
        for v in [
            AMQPValue::ShortShortUInt(3),
            AMQPValue::ShortInt(3),
            AMQPValue::LongInt(3),
            AMQPValue::LongLongInt(3),
            AMQPValue::LongUInt(3),
            string(" 3 "),
            AMQPValue::ShortString("3".into()),
        ] {
            assert_eq!(get_u64(Some(&table("k", v.clone())), "k"), Some(3), "{v:?}");
        }
    }

    #[test]
    fn forged_or_odd_values_read_as_absent() {
        for v in [
            AMQPValue::LongInt(-1),
            AMQPValue::Double(2.5),
            string("many"),
            AMQPValue::Boolean(true),
            AMQPValue::FieldTable(FieldTable::default()),
            AMQPValue::LongString(LongString::from(vec![0xff, 0xfe])),
        ] {
            assert_eq!(get_u64(Some(&table("k", v.clone())), "k"), None, "{v:?}");
        }
        assert_eq!(get_u64(None, "k"), None);
        assert_eq!(get_str(Some(&table("k", AMQPValue::LongInt(1))), "k"), None);
    }

    #[test]
    fn truncation_respects_char_boundaries_and_the_bound() {
        let s = "é".repeat(2000);
        let t = truncate(&s, MAX_EXCEPTION_MESSAGE);
        assert!(t.len() <= MAX_EXCEPTION_MESSAGE);
        assert!(t.ends_with('…'));
        assert_eq!(truncate("short", 10), "short");
    }
}
