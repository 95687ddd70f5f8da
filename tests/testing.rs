//! The testing harness users get: `rabbitry::testing::TestBroker`, with tokio's time paused
//! so that retry schedules run instantly and exactly.

use std::time::Duration;

use std::sync::{Arc, Mutex};

use rabbitry::observe::{Lifecycle, Observer};
use rabbitry::prelude::*;
use rabbitry::testing::{Handling, TestBroker};
use rabbitry::{FailureKind, Schedule, Topology, headers};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Charge {
    id: u64,
    cents: i64,
}
impl Event for Charge {
    const TYPE: &'static str = "payment.charge";
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Charged {
    id: u64,
}
impl Event for Charged {
    const TYPE: &'static str = "payment.charged";
}

/// Fails every charge with a transient error, succeeds for refunds (negative amounts), and
/// rejects zero amounts.
struct Gateway {
    policy: RetryPolicy,
}

impl Worker for Gateway {
    type Event = Charge;
    fn subscription(&self) -> Subscription {
        Subscription::new("payments.gateway")
            .bind(Charge::TYPE)
            .retry(self.policy.clone())
    }
    async fn handle(&self, charge: Delivery<Charge>, ctx: &Context) -> Outcome {
        match charge.cents {
            0 => Err(Failure::reject("nothing to charge")),
            c if c < 0 => {
                ctx.message(&Charged { id: charge.id })
                    .allow_unroutable()
                    .send()
                    .await?;
                Ok(())
            }
            _ => Err(Failure::retry("card network unavailable")),
        }
    }
}

async fn start(policy: RetryPolicy) -> (TestBroker, Runtime) {
    let broker = TestBroker::new();
    let rt = broker
        .runtime()
        .worker(Gateway { policy })
        .start()
        .await
        .unwrap();
    (broker, rt)
}

#[tokio::test(start_paused = true)]
async fn a_five_attempt_exponential_schedule_runs_instantly_and_exactly() {
    let (broker, rt) =
        start(RetryPolicy::exponential(Duration::from_secs(1)).max_attempts(5)).await;
    broker.publish(&Charge { id: 1, cents: 500 }).await.unwrap();
    broker.idle().await;

    let records = broker.records();
    let attempts: Vec<u32> = records.iter().map(|r| r.attempt).collect();
    assert_eq!(attempts, [1, 2, 3, 4, 5]);
    // On tokio's paused clock the schedule is exact: 1 s, 2 s, 4 s, 8 s.
    let gaps: Vec<Duration> = records.windows(2).map(|w| w[1].at - w[0].at).collect();
    assert_eq!(gaps, [1, 2, 4, 8].map(Duration::from_secs));
    let delays: Vec<Handling> = broker
        .retried("payments.gateway")
        .into_iter()
        .map(|r| r.handling)
        .collect();
    assert_eq!(
        delays,
        [1, 2, 4, 8].map(|s| Handling::Retried {
            delay: Duration::from_secs(s)
        })
    );
    assert!(matches!(
        &records[4].handling,
        Handling::DeadLettered { kind: FailureKind::Transient, reason } if reason == "card network unavailable"
    ));

    let dead = broker.dead_letters("payments.gateway");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].retry_count(), Some(4));
    assert_eq!(dead[0].kind(), Some("transient"));
    assert_eq!(
        dead[0].decode::<Charge>().unwrap(),
        Charge { id: 1, cents: 500 }
    );
    assert_eq!(
        dead[0].header(headers::ORIGINAL_ROUTING_KEY),
        Some("payment.charge")
    );
    rt.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn handled_rejected_and_published_messages_are_all_visible() {
    let (broker, rt) = start(RetryPolicy::none()).await;
    broker
        .publish(&Charge { id: 7, cents: -300 })
        .await
        .unwrap();
    broker.publish(&Charge { id: 8, cents: 0 }).await.unwrap();
    broker.idle().await;

    let handled = broker.handled("payments.gateway");
    assert_eq!(handled.len(), 1);
    assert_eq!(handled[0].event_type, "payment.charge");
    assert_eq!(
        broker.published::<Charged>("payment.charged"),
        [Charged { id: 7 }]
    );
    let dead = broker.dead_letters("payments.gateway");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].kind(), Some("rejected"));
    assert_eq!(dead[0].reason(), Some("nothing to charge"));
    assert_eq!(dead[0].retry_count(), Some(0));
    assert!(broker.retried("payments.gateway").is_empty());
    rt.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn idle_counts_a_paused_workers_queue_as_waiting_not_busy() {
    let (broker, rt) = start(RetryPolicy::none()).await;
    rt.pause("payments.gateway").await.unwrap();
    broker.publish(&Charge { id: 9, cents: -1 }).await.unwrap();
    broker.idle().await;
    assert_eq!(broker.broker().ready("payments.gateway"), Some(1));
    assert!(broker.records().is_empty());

    rt.resume("payments.gateway").await.unwrap();
    broker.idle().await;
    assert_eq!(broker.handled("payments.gateway").len(), 1);
    assert_eq!(broker.broker().ready("payments.gateway"), Some(0));
    rt.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn the_test_broker_follows_the_runtimes_exchange() {
    let broker = TestBroker::new();
    let rt = broker
        .runtime()
        .exchange("payments")
        .worker(Gateway {
            policy: RetryPolicy::none(),
        })
        .start()
        .await
        .unwrap();
    assert_eq!(broker.exchange(), "payments");
    broker.publish(&Charge { id: 3, cents: -5 }).await.unwrap();
    broker.idle().await;
    assert_eq!(broker.handled("payments.gateway").len(), 1);
    assert_eq!(
        broker.published::<Charged>("payment.charged"),
        [Charged { id: 3 }]
    );
    rt.shutdown().await;
}

/// The restart delays a runtime announced, with when it announced them.
#[derive(Default)]
struct Restarts(Mutex<Vec<(Instant, Duration)>>, tokio::sync::Notify);

impl Observer for Restarts {
    fn lifecycle(&self, event: &Lifecycle<'_>) {
        if let Lifecycle::Failed { restart_in, .. } = event {
            self.0.lock().unwrap().push((Instant::now(), *restart_in));
            self.1.notify_waiters();
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_worker_that_keeps_failing_to_start_backs_off_and_recovers() {
    let broker = TestBroker::new();
    let restarts = Arc::new(Restarts::default());
    let rt = broker
        .runtime()
        .observer(restarts.clone())
        .worker(Gateway {
            policy: RetryPolicy::none(),
        })
        .start()
        .await
        .unwrap();
    // An operator deletes the worker's queue and someone declares it again, differently:
    // the consumer is cancelled and every declaration now conflicts.
    assert_eq!(broker.broker().delete_queue("payments.gateway"), Some(0));
    let squatter = Subscription::new("payments.gateway")
        .bind("unrelated")
        .max_priority(5);
    Topology::new("events", [&squatter])
        .declare(&broker.broker().url())
        .await
        .unwrap();
    loop {
        let notified = restarts.1.notified();
        if restarts.0.lock().unwrap().len() >= 6 {
            break;
        }
        notified.await;
    }
    let seen = restarts.0.lock().unwrap().clone();
    let delays: Vec<u64> = seen.iter().map(|(_, d)| d.as_secs()).collect();
    assert_eq!(delays[..6], [1, 2, 4, 8, 16, 32]);
    // On tokio's paused clock each try came exactly when announced.
    for pair in seen.windows(2) {
        assert_eq!(pair[1].0 - pair[0].0, pair[0].1);
    }
    let status = &rt.workers().await.unwrap()[0];
    assert!(!status.consuming, "{status:?}");
    assert!(
        status
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("x-max-priority"),
        "{status:?}"
    );

    // The conflict goes away: the next try consumes again.
    assert!(broker.broker().delete_queue("payments.gateway").is_some());
    let status = loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let status = rt.workers().await.unwrap().remove(0);
        if status.consuming {
            break status;
        }
    };
    assert_eq!(status.restarts, 1, "{status:?}");
    broker.publish(&Charge { id: 4, cents: -1 }).await.unwrap();
    broker.idle().await;
    assert_eq!(broker.handled("payments.gateway").len(), 1);
    rt.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_resume_that_cannot_start_the_consumer_keeps_trying() {
    let broker = TestBroker::new();
    let rt = broker
        .runtime()
        .worker(Gateway {
            policy: RetryPolicy::none(),
        })
        .start()
        .await
        .unwrap();
    rt.pause("payments.gateway").await.unwrap();
    assert!(broker.broker().delete_queue("payments.gateway").is_some());
    let squatter = Subscription::new("payments.gateway")
        .bind("unrelated")
        .max_priority(5);
    Topology::new("events", [&squatter])
        .declare(&broker.broker().url())
        .await
        .unwrap();
    let err = rt.resume("payments.gateway").await.unwrap_err();
    assert!(err.to_string().contains("x-max-priority"), "{err}");
    let status = &rt.workers().await.unwrap()[0];
    assert!(!status.paused && !status.consuming, "{status:?}");

    // Once the conflict is gone, the worker comes back by itself.
    assert!(broker.broker().delete_queue("payments.gateway").is_some());
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if rt.workers().await.unwrap()[0].consuming {
            break;
        }
    }
    broker.publish(&Charge { id: 5, cents: -1 }).await.unwrap();
    broker.idle().await;
    assert_eq!(broker.handled("payments.gateway").len(), 1);
    rt.shutdown().await;
}

/// Accepts every charge, ten at a time per second at most.
struct Throttled;

impl Worker for Throttled {
    type Event = Charge;
    fn subscription(&self) -> Subscription {
        Subscription::new("payments.throttled").bind(Charge::TYPE)
    }
    async fn handle(&self, _: Delivery<Charge>, _: &Context) -> Outcome {
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn a_rate_limit_spaces_deliveries_exactly_and_instantly_in_paused_time() {
    use rabbitry::middleware::RateLimitLayer;
    use rabbitry::{Rate, Registration};

    let broker = TestBroker::new();
    let limited = Registration::new(Throttled)
        .layer(RateLimitLayer::new(Rate::per_second(10).unwrap().burst(2)));
    let rt = broker.runtime().worker(limited).start().await.unwrap();
    for id in 0..6 {
        broker.publish(&Charge { id, cents: -1 }).await.unwrap();
    }
    broker.idle().await;
    let handled = broker.handled("payments.throttled");
    assert_eq!(handled.len(), 6);
    // A burst of two at once, then one every 100 ms, to the millisecond.
    let gaps: Vec<u128> = handled
        .windows(2)
        .map(|w| (w[1].at - w[0].at).as_millis())
        .collect();
    assert_eq!(gaps, [0, 100, 100, 100, 100]);
    assert!(broker.retried("payments.throttled").is_empty());
    rt.shutdown().await;
}

/// Publishes a `payment.charged` follow-up with whatever id the charge had.
struct Confirmer;

impl Worker for Confirmer {
    type Event = Charge;
    fn subscription(&self) -> Subscription {
        Subscription::new("payments.confirmer")
            .bind(Charge::TYPE)
            .retry(RetryPolicy::none())
    }
    async fn handle(&self, charge: Delivery<Charge>, ctx: &Context) -> Outcome {
        let followed = ctx
            .message(&Charged { id: charge.id })
            .allow_unroutable()
            .send()
            .await;
        followed.map(drop).map_err(Failure::reject)
    }
}

#[tokio::test(start_paused = true)]
async fn an_invalid_follow_up_is_refused_to_the_handler_and_never_sent() {
    use rabbitry::{Schema, Schemas};

    // Charged ids must be below 100.
    let schema = Schema::from_json(&serde_json::json!({
        "type": "object",
        "properties": { "id": { "type": "integer", "maximum": 99 } }
    }))
    .unwrap();
    let broker = TestBroker::new();
    let rt = broker
        .runtime()
        .schemas(Schemas::new().insert(Charged::TYPE, schema))
        .worker(Confirmer)
        .start()
        .await
        .unwrap();
    broker.publish(&Charge { id: 7, cents: 1 }).await.unwrap();
    broker.publish(&Charge { id: 700, cents: 1 }).await.unwrap();
    broker.idle().await;
    assert_eq!(
        broker.published::<Charged>("payment.charged"),
        [Charged { id: 7 }]
    );
    let dead = broker.dead_letters("payments.confirmer");
    assert_eq!(dead.len(), 1);
    let reason = dead[0].reason().unwrap();
    assert!(reason.contains("does not match its schema"), "{reason}");
    assert!(
        reason.contains("/id: 700 is greater than the maximum of 99"),
        "{reason}"
    );
    rt.shutdown().await;
}

/// Books charges in order per customer (the correlation id); charge 1 fails once.
struct Books;

impl Worker for Books {
    type Event = Charge;
    fn subscription(&self) -> Subscription {
        Subscription::new("payments.books")
            .bind(Charge::TYPE)
            .retry(RetryPolicy::exponential(Duration::from_secs(2)))
    }
    async fn handle(&self, charge: Delivery<Charge>, _: &Context) -> Outcome {
        match (charge.id, charge.attempt()) {
            (1, 1) => Err(Failure::retry("ledger locked")),
            _ => Ok(()),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn an_ordered_key_waits_for_its_retry_in_paused_time_while_others_go_on() {
    use rabbitry::Registration;
    use rabbitry::middleware::{OrderKey, OrderedLayer};

    let broker = TestBroker::new();
    let books = Registration::new(Books).layer(OrderedLayer::new(OrderKey::CorrelationId));
    let rt = broker.runtime().worker(books).start().await.unwrap();
    let publisher = broker.publisher().await.unwrap();
    for (id, customer) in [(1, "ada"), (2, "ada"), (3, "bob")] {
        let charge = Charge { id, cents: 100 };
        publisher
            .message(&charge)
            .correlation_id(customer)
            .message_id(format!("charge-{id}"))
            .send()
            .await
            .unwrap();
    }
    broker.idle().await;
    let handled: Vec<String> = broker
        .handled("payments.books")
        .into_iter()
        .map(|r| format!("{}#{}", r.message_id, r.attempt))
        .collect();
    // Bob's charge did not wait; Ada's second charge waited for her first one's retry.
    assert_eq!(handled, ["charge-3#1", "charge-1#2", "charge-2#1"]);
    let deferred = broker.deferred("payments.books");
    assert!(!deferred.is_empty());
    assert!(
        deferred
            .iter()
            .all(|r| r.message_id == "charge-2" && r.attempt == 1)
    );
    rt.shutdown().await;
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Countdown {
    left: u32,
}
impl Event for Countdown {
    const TYPE: &'static str = "test.countdown";
}

/// Sends the next step of a countdown 2.5 s later, from its handler.
struct Ticker;

impl Worker for Ticker {
    type Event = Countdown;
    fn subscription(&self) -> Subscription {
        Subscription::new("test.ticker").bind(Countdown::TYPE)
    }
    async fn handle(&self, c: Delivery<Countdown>, ctx: &Context) -> Outcome {
        if c.left > 0 {
            let next = Countdown { left: c.left - 1 };
            ctx.message(&next)
                .delay(Duration::from_millis(2500))
                .send()
                .await?;
        }
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn delays_from_publishers_and_handlers_run_instantly_and_exactly_in_paused_time() {
    let broker = TestBroker::new();
    let rt = broker.runtime().worker(Ticker).start().await.unwrap();
    let publisher = broker.publisher().await.unwrap();
    let start = Instant::now();
    publisher
        .message(&Countdown { left: 3 })
        .delay(Duration::from_secs(90 * 60))
        .send()
        .await
        .unwrap();
    broker.idle().await;
    let at: Vec<Duration> = broker
        .handled("test.ticker")
        .iter()
        .map(|r| r.at - start)
        .collect();
    let expected = [5_400_000, 5_402_500, 5_405_000, 5_407_500].map(Duration::from_millis);
    assert_eq!(at, expected);
    rt.shutdown().await;
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Beat {
    tick_ms: i64,
}
impl Event for Beat {
    const TYPE: &'static str = "test.beat";
}

/// Every beat received: (tick, arrival, message id).
type Beats = Arc<Mutex<Vec<(i64, Instant, String)>>>;

struct BeatLog(Beats);

impl Worker for BeatLog {
    type Event = Beat;
    fn subscription(&self) -> Subscription {
        Subscription::new("test.beats").bind(Beat::TYPE)
    }
    async fn handle(&self, beat: Delivery<Beat>, _ctx: &Context) -> Outcome {
        let at = Instant::now();
        let id = beat.message_id().to_owned();
        self.0.lock().unwrap().push((beat.tick_ms, at, id));
        Ok(())
    }
}

fn every_ten_seconds() -> Schedule {
    Schedule::new("beat", "*/10 * * * * *", |tick| Beat {
        tick_ms: tick.unix_ms(),
    })
    .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_schedule_ticks_exactly_in_paused_time_and_a_restart_neither_skips_nor_repeats() {
    let broker = TestBroker::new();
    let beats = Beats::default();
    let start = |beats: &Beats| {
        broker
            .runtime()
            .worker(BeatLog(beats.clone()))
            .schedule(every_ten_seconds())
    };
    let first = start(&beats).start().await.unwrap();
    tokio::time::sleep(Duration::from_secs(45)).await;
    first.shutdown().await;
    let before_outage = beats.lock().unwrap().len();
    // Nobody runs the schedule for 30 s: three ticks are missed.
    tokio::time::sleep(Duration::from_secs(30)).await;
    let restarted_at = Instant::now();
    let second = start(&beats).start().await.unwrap();
    tokio::time::sleep(Duration::from_secs(30)).await;
    second.shutdown().await;

    let beats = beats.lock().unwrap().clone();
    let ticks: Vec<i64> = beats.iter().map(|b| b.0).collect();
    assert!(before_outage >= 4, "{ticks:?}");
    assert!(ticks.len() >= 10, "{ticks:?}");
    // Every tick on the ten seconds, each once, none left out.
    assert!(ticks.iter().all(|t| t % 10_000 == 0), "{ticks:?}");
    assert!(ticks.windows(2).all(|w| w[1] - w[0] == 10_000), "{ticks:?}");
    let ids: std::collections::HashSet<&String> = beats.iter().map(|b| &b.2).collect();
    assert_eq!(ids.len(), beats.len());
    // Live ticks arrive exactly ten seconds apart; the missed ones all at the restart.
    let live = &beats[..before_outage];
    assert!(
        live.windows(2)
            .all(|w| w[1].1 - w[0].1 == Duration::from_secs(10))
    );
    let missed: Vec<_> = beats[before_outage..]
        .iter()
        .filter(|b| b.1 == restarted_at)
        .collect();
    assert_eq!(missed.len(), 3, "{beats:?}");
}

#[tokio::test(start_paused = true)]
async fn two_runtimes_with_one_schedule_fire_each_tick_once_and_the_survivor_takes_over() {
    let broker = TestBroker::new();
    let beats = Beats::default();
    let a = broker
        .runtime()
        .worker(BeatLog(beats.clone()))
        .schedule(every_ten_seconds())
        .start()
        .await
        .unwrap();
    let b = broker
        .runtime()
        .schedule(every_ten_seconds())
        .start()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(60)).await;
    let with_both = beats.lock().unwrap().len();
    // The first runtime led (it started first); it stops, the second takes over.
    a.shutdown().await;
    let c = broker
        .runtime()
        .worker(BeatLog(beats.clone()))
        .start()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(60)).await;
    // A held schedule token is not work in progress: idle returns.
    broker.idle().await;
    b.shutdown().await;
    c.shutdown().await;
    let ticks: Vec<i64> = beats.lock().unwrap().iter().map(|b| b.0).collect();
    assert!((5..=7).contains(&with_both), "{ticks:?}");
    assert!(ticks.len() >= with_both + 5, "{ticks:?}");
    assert!(ticks.windows(2).all(|w| w[1] - w[0] == 10_000), "{ticks:?}");
}
