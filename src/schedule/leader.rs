//! Running schedules with one leader per schedule, elected through the broker.
//!
//! Each schedule has a durable single-active-consumer queue, `<exchange>.schedule.<name>`,
//! holding one token message: `{"last_fired_ms": …}`, the last tick fired. Every process
//! running the schedule consumes the queue; the broker delivers only to the active
//! consumer, so the one process holding the token (delivered, not acknowledged) is the
//! leader. When its connection dies the broker requeues the token to the next consumer.
//!
//! The leader fires due ticks **on the channel that holds the token** (confirmed), then
//! publishes a new token with the new last tick (confirmed), then acknowledges the old one.
//! That is the fence: a stalled leader whose connection the broker has closed can publish
//! nothing, and the broker hands the token to someone else only after closing it. A crash
//! between firing and the new token fires the same ticks again with the same message ids
//! (UUID v5 of exchange, schedule and tick), which an inbox drops. Missed ticks — while no
//! process ran, or during a failover — are fired when a leader next holds the token,
//! oldest first, up to [`Scheduler::max_catch_up`] of the latest; older ones are skipped
//! with a warning.

use std::collections::HashSet;
use std::future::Future;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::SelectAll;
use jiff::Timestamp;
use lapin::BasicProperties;
use lapin::types::FieldTable;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{Clock, Schedule, Tick};
use crate::broker::{self, Channel, Confirm, Connection, Incoming};
use crate::error::{Error, Result};
use crate::headers;
use crate::publisher::event_properties;
use crate::runtime::connect::{self, Settings};

/// How often a leader renews its token when no tick is due (a held delivery must be
/// acknowledged within RabbitMQ's consumer timeout, 30 minutes by default).
const RENEW_EVERY: Duration = Duration::from_secs(60);

/// Runs [`Schedule`]s: every process running a schedule competes for it, and exactly one
/// fires each tick (see the [module docs](crate::Schedule) for the guarantees).
///
/// A [`RuntimeBuilder`](crate::RuntimeBuilder) runs one for its
/// [`schedule`](crate::RuntimeBuilder::schedule)s; use it directly to run schedules without
/// workers:
///
/// ```no_run
/// use rabbitry::{Event, Schedule, Scheduler};
/// # #[derive(serde::Serialize)] struct Heartbeat;
/// # impl Event for Heartbeat { const TYPE: &'static str = "ops.heartbeat"; }
/// # async fn run() -> rabbitry::Result<()> {
/// let every_minute = Schedule::new("heartbeat", "* * * * *", |_| Heartbeat)?;
/// Scheduler::new("amqp://guest:guest@127.0.0.1:5672/%2f", "events")
///     .schedule(every_minute)
///     .run_until(async { tokio::signal::ctrl_c().await.ok(); })
///     .await?;
/// # Ok(()) }
/// ```
#[must_use = "a scheduler does nothing until .run_until(…).await"]
pub struct Scheduler {
    url: String,
    exchange: String,
    schedules: Vec<Schedule>,
    max_catch_up: usize,
    connection_name: String,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("url", &broker::redact_url(&self.url))
            .field("exchange", &self.exchange)
            .field("schedules", &self.schedules)
            .finish_non_exhaustive()
    }
}

/// A schedule's token: what its leader fired last, for which version of the schedule.
#[derive(Debug, Serialize, Deserialize)]
struct Token {
    last_fired_ms: i64,
    #[serde(default)]
    schedule: String,
}

impl Scheduler {
    /// A scheduler publishing to `exchange` on the broker at `url`.
    pub fn new(url: impl Into<String>, exchange: impl Into<String>) -> Scheduler {
        let url = url.into();
        Scheduler {
            url,
            exchange: exchange.into(),
            schedules: Vec::new(),
            max_catch_up: 100,
            connection_name: "rabbitry-scheduler".into(),
        }
    }

    /// Run `schedule` too.
    pub fn schedule(mut self, schedule: Schedule) -> Scheduler {
        self.schedules.push(schedule);
        self
    }

    /// How many missed ticks of one schedule a new leader fires (the latest; default 100,
    /// at least 1).
    pub fn max_catch_up(mut self, ticks: usize) -> Scheduler {
        self.max_catch_up = ticks.max(1);
        self
    }

    /// The connection name shown in RabbitMQ's management UI.
    pub fn connection_name(mut self, name: impl Into<String>) -> Scheduler {
        self.connection_name = name.into();
        self
    }

    /// The queue holding the token of schedule `name` on `exchange`.
    pub fn token_queue(exchange: &str, name: &str) -> String {
        format!("{exchange}.schedule.{name}")
    }

    /// Check the schedules: names unique, queue names within AMQP's limit.
    pub(crate) fn check(&self) -> Result<()> {
        let mut names = HashSet::new();
        for s in &self.schedules {
            if !names.insert(s.name()) {
                return Err(Error::Config(format!(
                    "two schedules are called '{}'",
                    s.name()
                )));
            }
            broker::short(
                "schedule queue",
                &Scheduler::token_queue(&self.exchange, s.name()),
            )?;
        }
        Ok(())
    }

    /// Run until `stop` completes: connect (retrying with backoff while the broker is
    /// away), compete for every schedule, fire what this process leads. Returns an error
    /// only for invalid settings; broker failures are retried.
    pub async fn run_until(self, stop: impl Future<Output = ()>) -> Result<()> {
        self.check()?;
        if self.schedules.is_empty() {
            stop.await;
            return Ok(());
        }
        let token = CancellationToken::new();
        let run = self.run(&token);
        tokio::pin!(run, stop);
        tokio::select! {
            result = &mut run => return result,
            () = &mut stop => token.cancel(),
        }
        run.await
    }

    pub(crate) async fn run(&self, stop: &CancellationToken) -> Result<()> {
        let settings = Settings {
            url: self.url.clone(),
            connection_name: self.connection_name.clone(),
            grace: Duration::ZERO,
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(10),
        };
        let mut pause = settings.reconnect_min;
        loop {
            let Some(conn) = connect::connect(&settings, stop, None).await? else {
                return Ok(());
            };
            // Read once connected: an in-memory broker exists by now, and its clock is the
            // one every runtime on it shares.
            let mut session = Session {
                scheduler: self,
                clock: Clock::for_url(&self.url),
                slots: Vec::new(),
            };
            let started = tokio::time::Instant::now();
            let ended = session.run(&conn, stop).await;
            conn.close().await;
            match ended {
                Ok(()) => return Ok(()),
                // A token queue declared otherwise by someone else: waiting will not help.
                Err(e @ Error::TopologyConflict { .. }) => return Err(e),
                Err(e) => {
                    // Back off when sessions keep failing at once; start over after a long one.
                    pause = match started.elapsed() > RENEW_EVERY {
                        true => settings.reconnect_min,
                        false => (pause * 2).min(settings.reconnect_max),
                    };
                    warn!(error = %e, retry_in = ?pause, "the scheduler's session ended; competing again");
                    tokio::select! {
                        () = stop.cancelled() => return Ok(()),
                        () = tokio::time::sleep(pause) => {}
                    }
                }
            }
        }
    }
}

/// One schedule's state in a session.
struct Slot {
    queue: String,
    /// Token deliveries held (more than one only until they are merged).
    held: Vec<Incoming>,
    /// The last tick fired, from the newest token seen.
    last: Option<Timestamp>,
    /// When the held token was published (by us), for renewal.
    renewed_at: Option<tokio::time::Instant>,
}

/// One connection's worth of competing.
struct Session<'a> {
    scheduler: &'a Scheduler,
    clock: Clock,
    slots: Vec<Slot>,
}

impl Session<'_> {
    async fn run(&mut self, conn: &Connection, stop: &CancellationToken) -> Result<()> {
        let ch = conn.channel().await?;
        ch.confirm_select().await?;
        ch.qos(4).await?;
        let mut tokens = SelectAll::new();
        for (i, schedule) in self.scheduler.schedules.iter().enumerate() {
            let queue = Scheduler::token_queue(&self.scheduler.exchange, schedule.name());
            crate::topology::declare_lease_queue(&ch, &queue).await?;
            let (ready, consumers) = ch.queue_counts(&queue).await?;
            if ready == 0 && consumers == 0 {
                // A new schedule (or one whose token was purged): start from now, firing
                // nothing of the past. Two processes seeding at once leave two tokens,
                // which the leader merges.
                let now = self.clock.now();
                publish_token(&ch, &queue, schedule, now).await?;
            }
            let tag = format!("rabbitry-scheduler-{}", uuid::Uuid::now_v7().simple());
            let stream = ch.consume(&queue, &tag).await?;
            tokens.push(stream.map(move |d| (i, d)));
            self.slots.push(Slot {
                queue,
                held: Vec::new(),
                last: None,
                renewed_at: None,
            });
        }
        let lost = conn.lost();
        tokio::pin!(lost);
        loop {
            let wake = self.next_wake();
            tokio::select! {
                () = stop.cancelled() => {
                    // Closing the channel hands every held token to the next process.
                    ch.close().await;
                    return Ok(());
                }
                e = &mut lost => return Err(Error::Broker(e)),
                token = tokens.next() => match token {
                    Some((i, Ok(delivery))) => self.take(&ch, i, delivery).await?,
                    Some((_, Err(e))) => return Err(e.into()),
                    // The broker cancelled a consumer (its queue was deleted): start over.
                    None => return Err(Error::QueueNotFound { queue: "a schedule's token queue".into() }),
                },
                () = tokio::time::sleep(wake) => self.fire_due(&ch).await?,
            }
        }
    }

    /// How long until some held schedule has a tick due or a token to renew.
    fn next_wake(&self) -> Duration {
        let clock = &self.clock;
        let mut wake = RENEW_EVERY;
        for (slot, schedule) in self.slots.iter().zip(&self.scheduler.schedules) {
            let (Some(last), Some(renewed)) = (slot.last, slot.renewed_at) else {
                continue;
            };
            if slot.held.is_empty() {
                continue; // not leading it, or waiting for its renewed token
            }
            let now = clock.now();
            if !schedule.due(last, now, 1).0.is_empty() {
                return Duration::ZERO;
            }
            if let Some(next) = schedule.next_tick(last.max(now)) {
                wake = wake.min(clock.until(next));
            }
            let renew =
                (renewed + RENEW_EVERY).saturating_duration_since(tokio::time::Instant::now());
            wake = wake.min(renew);
        }
        wake
    }

    /// A token delivery for slot `i`: hold it, and merge when holding more than one.
    async fn take(&mut self, ch: &Channel, i: usize, delivery: Incoming) -> Result<()> {
        let slot = &mut self.slots[i];
        let name = self.scheduler.schedules[i].name();
        let fingerprint = self.scheduler.schedules[i].fingerprint();
        let last = match serde_json::from_slice::<Token>(&delivery.body) {
            // Another pattern, zone or revision: start afresh from now.
            Ok(token) if token.schedule != fingerprint => None,
            Ok(token) => Timestamp::from_millisecond(token.last_fired_ms).ok(),
            Err(e) => {
                warn!(schedule = name, error = %e, "an unreadable schedule token is replaced");
                None
            }
        };
        slot.last = match (slot.last, last) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        if slot.held.is_empty() && slot.renewed_at.is_none() {
            info!(schedule = name, queue = %slot.queue, "this process leads the schedule");
        }
        slot.held.push(delivery);
        if slot.held.len() > 1 || last.is_none() {
            let last = slot.last.unwrap_or_else(|| self.clock.now());
            self.renew(ch, i, last).await?;
        } else if slot.renewed_at.is_none() {
            slot.renewed_at = Some(tokio::time::Instant::now());
        }
        Ok(())
    }

    /// Fire every due tick of the schedules this process leads, then renew their tokens.
    async fn fire_due(&mut self, ch: &Channel) -> Result<()> {
        let now = self.clock.now();
        for i in 0..self.slots.len() {
            let slot = &self.slots[i];
            let (Some(last), false) = (slot.last, slot.held.is_empty()) else {
                continue;
            };
            let schedule = &self.scheduler.schedules[i];
            let (due, skipped) = schedule.due(last, now, self.scheduler.max_catch_up);
            if skipped > 0 {
                warn!(
                    schedule = schedule.name(),
                    skipped, "missed ticks beyond the catch-up limit are not fired"
                );
            }
            // One tick per token: a leader killed now fires this tick again, no more.
            // The next due tick fires as soon as the renewed token is back.
            if let Some(&at) = due.first() {
                self.fire(ch, schedule, at).await?;
                self.renew(ch, i, at).await?;
            } else if slot.renewed_at.is_none_or(|t| t.elapsed() >= RENEW_EVERY) {
                self.renew(ch, i, last).await?;
            }
        }
        Ok(())
    }

    /// Publish tick `at` of `schedule` on the token's channel and wait for the confirm.
    async fn fire(&self, ch: &Channel, schedule: &Schedule, at: Timestamp) -> Result<()> {
        let tick = Tick {
            schedule: schedule.name().to_owned(),
            at: at.into(),
        };
        let message = match schedule.message(&tick) {
            Ok(m) => m,
            Err(e) => {
                warn!(schedule = schedule.name(), error = %e, "a tick's event cannot be made; the tick is skipped");
                return Ok(());
            }
        };
        let exchange = &self.scheduler.exchange;
        let id = uuid::Uuid::new_v5(
            &uuid::Uuid::NAMESPACE_URL,
            format!(
                "rabbitry:{exchange}:schedule:{}:{}",
                schedule.name(),
                at.as_millisecond()
            )
            .as_bytes(),
        )
        .to_string();
        let mut table = FieldTable::default();
        headers::set(
            &mut table,
            headers::SCHEDULE,
            headers::string(schedule.name()),
        );
        let due = headers::timestamp(at.into());
        headers::set(&mut table, headers::SCHEDULED_AT, headers::string(&due));
        let seconds = at.as_second().max(0) as u64;
        let properties =
            event_properties(&id, &message.event_type, message.version, table, seconds)?;
        let confirm = confirmed(
            ch,
            exchange,
            &message.routing_key,
            &message.body,
            properties,
        );
        match confirm.await? {
            Confirm::Ack { returned: None } => {
                info!(schedule = schedule.name(), tick = %due, message_id = %id, "tick fired");
            }
            Confirm::Ack { returned: Some(_) } => warn!(
                schedule = schedule.name(),
                routing_key = %message.routing_key,
                "a tick's event reached no queue (nothing is bound for its routing key)"
            ),
            Confirm::Nack => {
                return Err(Error::Nacked {
                    exchange: exchange.clone(),
                    routing_key: message.routing_key,
                });
            }
        }
        Ok(())
    }

    /// Replace the held tokens of slot `i` by one saying `last`: publish it (confirmed),
    /// then acknowledge the old ones. The new one comes back to this consumer.
    async fn renew(&mut self, ch: &Channel, i: usize, last: Timestamp) -> Result<()> {
        let slot = &mut self.slots[i];
        publish_token(ch, &slot.queue, &self.scheduler.schedules[i], last).await?;
        for old in slot.held.drain(..) {
            ch.ack_one(old.tag).await?;
        }
        slot.last = Some(last);
        slot.renewed_at = Some(tokio::time::Instant::now());
        Ok(())
    }
}

async fn publish_token(
    ch: &Channel,
    queue: &str,
    schedule: &Schedule,
    last: Timestamp,
) -> Result<()> {
    let body = serde_json::to_vec(&Token {
        last_fired_ms: last.as_millisecond(),
        schedule: schedule.fingerprint(),
    })
    .map_err(Error::Serialize)?;
    let properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2);
    match confirmed(ch, "", queue, &body, properties).await? {
        Confirm::Ack { returned: None } => Ok(()),
        Confirm::Ack { returned: Some(_) } | Confirm::Nack => Err(Error::Nacked {
            exchange: String::new(),
            routing_key: queue.to_owned(),
        }),
    }
}

/// How long a scheduler waits for a confirm before it gives its session up (a blocked
/// connection — a broker alarm — must not hold the token and the shutdown forever).
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

/// Publish on `ch` and wait for the broker's confirm, at most [`CONFIRM_TIMEOUT`].
async fn confirmed(
    ch: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Result<Confirm> {
    let publish = async {
        ch.publish(exchange, routing_key, body, properties, true)
            .await?
            .await
    };
    match tokio::time::timeout(CONFIRM_TIMEOUT, publish).await {
        Ok(confirm) => Ok(confirm?),
        Err(_) => Err(Error::PublishTimeout {
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
            timeout: CONFIRM_TIMEOUT,
        }),
    }
}
