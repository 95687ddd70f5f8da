//! The testing harness users get: `rabbitry::testing::TestBroker`, with tokio's time paused
//! so that retry schedules run instantly and exactly.

use std::time::Duration;

use rabbitry::prelude::*;
use rabbitry::testing::{Handling, TestBroker};
use rabbitry::{FailureKind, headers};
use serde::{Deserialize, Serialize};

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
