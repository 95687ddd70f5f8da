//! Cron schedules: an event published at every tick of a cron pattern, by exactly one
//! process among all that declare the schedule.

mod leader;

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use croner::Cron;
use jiff::Timestamp;
use jiff::tz::TimeZone;

use crate::error::{Error, Result};
use crate::event::Event;

pub use leader::Scheduler;

/// One tick of a [`Schedule`]: which schedule, and the time the tick was due (what the
/// cron pattern names, not when the event happened to be sent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tick {
    schedule: String,
    at: SystemTime,
}

impl Tick {
    /// The schedule's name.
    pub fn schedule(&self) -> &str {
        &self.schedule
    }

    /// When the tick was due.
    pub fn at(&self) -> SystemTime {
        self.at
    }

    /// When the tick was due, in milliseconds since the Unix epoch.
    pub fn unix_ms(&self) -> i64 {
        Timestamp::try_from(self.at).map_or(0, |t| t.as_millisecond())
    }
}

/// What one tick publishes.
pub(crate) struct TickMessage {
    pub(crate) routing_key: String,
    pub(crate) event_type: String,
    pub(crate) version: u32,
    pub(crate) body: Vec<u8>,
}

/// The largest body a [`Schedule::json`] may publish (the publisher's default limit).
const MAX_BODY: usize = 16 * 1024 * 1024;

type MakeMessage = Arc<dyn Fn(&Tick) -> Result<TickMessage> + Send + Sync>;

/// A named cron schedule that publishes an event at every tick.
///
/// The pattern has five fields (minute, hour, day of month, month, day of week) or six
/// with seconds first, plus croner's extensions (`L`, `W`, `#`, names); it is read in a
/// time zone (UTC unless [`time_zone`](Schedule::time_zone) says otherwise) with the
/// zone's daylight-saving rules: a local time that a spring-forward skips fires at the
/// first instant after the gap, and one an autumn fold repeats fires once.
///
/// ```
/// use rabbitry::{Event, Schedule};
/// # #[derive(serde::Serialize)] struct ReportDue { day_ms: i64 }
/// # impl Event for ReportDue { const TYPE: &'static str = "report.due"; }
/// let nightly = Schedule::new("nightly-report", "0 30 2 * * *", |tick| ReportDue {
///     day_ms: tick.unix_ms(),
/// })?
/// .time_zone("Europe/Paris")?;
/// assert_eq!(nightly.name(), "nightly-report");
/// # Ok::<(), rabbitry::Error>(())
/// ```
///
/// Add it to a runtime with [`RuntimeBuilder::schedule`](crate::RuntimeBuilder::schedule),
/// or run it without workers with a [`Scheduler`].
#[derive(Clone)]
pub struct Schedule {
    name: String,
    pattern: String,
    cron: Cron,
    zone: TimeZone,
    zone_name: String,
    revision: String,
    message: MakeMessage,
}

impl fmt::Debug for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Schedule")
            .field("name", &self.name)
            .field("pattern", &self.pattern)
            .field("time_zone", &self.zone_name)
            .finish_non_exhaustive()
    }
}

impl Schedule {
    /// A schedule called `name` that publishes `event(tick)` (routing key `E::TYPE`) at
    /// every tick of the cron `pattern`. The name identifies the schedule across processes
    /// and restarts: letters, digits, `.`, `_` and `-`, at most 100 bytes.
    pub fn new<E, F>(name: &str, pattern: &str, event: F) -> Result<Schedule>
    where
        E: Event,
        F: Fn(&Tick) -> E + Send + Sync + 'static,
    {
        let message = move |tick: &Tick| {
            let body = serde_json::to_vec(&event(tick)).map_err(Error::Serialize)?;
            Ok(TickMessage {
                routing_key: E::TYPE.to_owned(),
                event_type: E::TYPE.to_owned(),
                version: E::VERSION,
                body,
            })
        };
        Schedule::build(name, pattern, Arc::new(message))
    }

    /// A schedule that publishes the same JSON `body` with `routing_key` (also its event
    /// type) at every tick: for schedules stored outside the code, such as those
    /// `rabbitry schedules add` keeps.
    pub fn json(
        name: &str,
        pattern: &str,
        routing_key: &str,
        body: &serde_json::Value,
    ) -> Result<Schedule> {
        crate::broker::short("routing key", routing_key)?;
        if routing_key.is_empty() {
            return Err(Error::Config("a schedule's routing key is empty".into()));
        }
        let body = serde_json::to_vec(body).map_err(Error::Serialize)?;
        if body.len() > MAX_BODY {
            return Err(Error::BodyTooLarge {
                size: body.len(),
                limit: MAX_BODY,
            });
        }
        let routing_key = routing_key.to_owned();
        let message = move |_: &Tick| {
            Ok(TickMessage {
                routing_key: routing_key.clone(),
                event_type: routing_key.clone(),
                version: 1,
                body: body.clone(),
            })
        };
        Schedule::build(name, pattern, Arc::new(message))
    }

    fn build(name: &str, pattern: &str, message: MakeMessage) -> Result<Schedule> {
        check_name(name)?;
        let cron = parse(pattern)?;
        Ok(Schedule {
            name: name.to_owned(),
            pattern: pattern.trim().to_owned(),
            cron,
            zone: TimeZone::UTC,
            zone_name: "UTC".into(),
            revision: String::new(),
            message,
        })
    }

    /// Read the pattern in the IANA time zone `zone` (`Europe/Paris`, `America/New_York`,
    /// `UTC`…), from the system's time zone database.
    pub fn time_zone(mut self, zone: &str) -> Result<Schedule> {
        self.zone = TimeZone::get(zone).map_err(|e| {
            Error::Config(format!(
                "unknown time zone '{}' for schedule '{}': {e}",
                crate::headers::truncate(zone, 64),
                self.name
            ))
        })?;
        self.zone_name = zone.to_owned();
        Ok(self)
    }

    /// Mark this schedule as a new revision of its name: a schedule's leader keeps the
    /// last tick it fired, and picks up missed ticks after a failover or a restart — but not
    /// across a change of pattern, time zone or revision, where it starts afresh from now.
    /// Stored schedules use their creation time, so one removed and added again does not
    /// fire the ticks in between.
    pub fn revision(mut self, revision: impl Into<String>) -> Schedule {
        self.revision = revision.into();
        self
    }

    /// What identifies this schedule's ticks beyond its name: its pattern, time zone and
    /// revision.
    pub(crate) fn fingerprint(&self) -> String {
        format!("{}|{}|{}", self.pattern, self.zone_name, self.revision)
    }

    /// The schedule's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The cron pattern, as given.
    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    /// The time zone the pattern is read in.
    pub fn zone(&self) -> &str {
        &self.zone_name
    }

    /// The first tick strictly after `time`, if the pattern has one.
    pub fn next_after(&self, time: SystemTime) -> Option<SystemTime> {
        let from = Timestamp::try_from(time).ok()?;
        self.next_tick(from).map(SystemTime::from)
    }

    pub(crate) fn next_tick(&self, after: Timestamp) -> Option<Timestamp> {
        let start = whole_seconds(after).to_zoned(self.zone.clone());
        let next = self.cron.find_next_occurrence(&start, false).ok()?;
        Some(next.timestamp())
    }

    /// The ticks after `last` up to and including `now`, oldest first, at most `max` of
    /// them (the latest); and how many older ones were left out.
    pub(crate) fn due(&self, last: Timestamp, now: Timestamp, max: usize) -> (Vec<Timestamp>, u64) {
        let mut due = Vec::new();
        let mut skipped = 0u64;
        let now = whole_seconds(now).to_zoned(self.zone.clone());
        let mut cursor = self.cron.find_previous_occurrence(&now, true).ok();
        while let Some(tick) = cursor {
            if tick.timestamp() <= last {
                break;
            }
            if due.len() < max {
                due.push(tick.timestamp());
            } else {
                skipped += 1;
                // Counting every skipped tick of a fine schedule after a long outage would
                // take long; a thousand says enough.
                if skipped >= 1000 {
                    break;
                }
            }
            cursor = self.cron.find_previous_occurrence(&tick, false).ok();
        }
        due.reverse();
        (due, skipped)
    }

    pub(crate) fn message(&self, tick: &Tick) -> Result<TickMessage> {
        (self.message)(tick)
    }
}

/// `t` without its fraction of a second (cron patterns have no finer resolution).
fn whole_seconds(t: Timestamp) -> Timestamp {
    Timestamp::from_second(t.as_second()).unwrap_or(t)
}

fn parse(pattern: &str) -> Result<Cron> {
    croner::parser::CronParser::new()
        .parse(pattern.trim())
        .map_err(|e| {
            Error::Config(format!(
                "invalid cron pattern '{}': {e}",
                crate::headers::truncate(pattern, 100)
            ))
        })
}

/// A schedule name: it becomes part of a queue name and of message ids.
pub(crate) fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 100
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "schedule name '{}' must be 1 to 100 letters, digits, '.', '_' or '-'",
            crate::headers::truncate(name, 100)
        )))
    }
}

/// The clock schedules read: the system's, or — on the in-memory broker — tokio's, so
/// that with paused time a schedule runs instantly and exactly.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Clock {
    Wall,
    Tokio {
        base: SystemTime,
        at: tokio::time::Instant,
    },
}

impl Clock {
    pub(crate) fn for_url(url: &str) -> Clock {
        if crate::broker::is_memory_url(url) {
            let (base, at) = crate::broker::memory_epoch(url);
            Clock::Tokio { base, at }
        } else {
            Clock::Wall
        }
    }

    pub(crate) fn now(&self) -> Timestamp {
        let now = match self {
            Clock::Wall => SystemTime::now(),
            Clock::Tokio { base, at } => *base + at.elapsed(),
        };
        Timestamp::try_from(now).unwrap_or(Timestamp::UNIX_EPOCH)
    }

    /// How long until `t` by this clock (zero if past).
    pub(crate) fn until(&self, t: Timestamp) -> Duration {
        let left = t.as_millisecond() - self.now().as_millisecond();
        Duration::from_millis(left.max(0) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn every(pattern: &str) -> Schedule {
        Schedule::json("t", pattern, "tick", &serde_json::json!({})).unwrap()
    }

    #[test]
    fn bad_patterns_names_and_zones_are_clear_errors() {
        let e = every_err("61 * * * *");
        assert!(e.contains("invalid cron pattern '61 * * * *'"), "{e}");
        let e = Schedule::json("bad name/", "* * * * *", "t", &serde_json::json!(1))
            .unwrap_err()
            .to_string();
        assert!(e.contains("schedule name"), "{e}");
        let e = every("* * * * *")
            .time_zone("Mars/Olympus_Mons")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown time zone 'Mars/Olympus_Mons'"), "{e}");
    }

    fn every_err(pattern: &str) -> String {
        Schedule::json("t", pattern, "tick", &serde_json::json!({}))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn due_ticks_are_those_after_the_last_up_to_now_latest_kept() {
        let s = every("*/10 * * * * *");
        let (due, skipped) = s.due(ts("2026-12-01T10:00:00Z"), ts("2026-12-01T10:00:35.5Z"), 10);
        assert_eq!(
            due,
            [
                ts("2026-12-01T10:00:10Z"),
                ts("2026-12-01T10:00:20Z"),
                ts("2026-12-01T10:00:30Z")
            ]
        );
        assert_eq!(skipped, 0);
        let (due, skipped) = s.due(ts("2026-12-01T10:00:00Z"), ts("2026-12-01T10:01:00Z"), 2);
        assert_eq!(
            due,
            [ts("2026-12-01T10:00:50Z"), ts("2026-12-01T10:01:00Z")]
        );
        assert_eq!(skipped, 4);
        let (due, _) = s.due(ts("2026-12-01T10:00:30Z"), ts("2026-12-01T10:00:39Z"), 10);
        assert!(due.is_empty());
    }

    #[test]
    fn daylight_saving_gaps_and_folds_fire_once() {
        // Europe/Paris springs forward on 2026-03-29 at 02:00 → 03:00 and falls back on
        // 2026-10-25 at 03:00 → 02:00.
        let s = every("0 30 2 * * *").time_zone("Europe/Paris").unwrap();
        // The skipped 02:30 fires at the first instant after the gap (03:00 CEST, 01:00 UTC).
        let next = s.next_tick(ts("2026-03-28T23:00:00Z")).unwrap();
        assert_eq!(next, ts("2026-03-29T01:00:00Z"));
        // The repeated 02:30 fires once: the day's ticks from the 24th to the 26th are three.
        let (due, _) = s.due(ts("2026-10-24T00:00:00Z"), ts("2026-10-26T12:00:00Z"), 10);
        assert_eq!(due.len(), 3, "{due:?}");
    }
}
