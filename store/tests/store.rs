//! The store on SQLite and on PostgreSQL: the same tests on both. PostgreSQL is the local
//! server (`RABBITRY_TEST_POSTGRES`, default `postgres://postgres@127.0.0.1:5432/postgres`);
//! each test creates its own database and drops it.

use std::sync::Arc;
use std::time::Duration;

use rabbitry::lapin::BasicProperties;
use rabbitry::lapin::types::{AMQPValue, FieldArray, FieldTable, LongString};
use rabbitry::middleware::{ClaimHeld, DedupStore};
use rabbitry_store::{
    DeadLetter, DeadLetterState, EventFilter, HandlingRecord, Inbox, SagaFilter, SagaStore, Store,
    StoreError, StoredEvent, StoredSchedule,
};

#[macro_use]
mod db;

use db::Db;

fn headers() -> FieldTable {
    let mut death = FieldTable::default();
    death.insert("count".into(), AMQPValue::LongLongInt(2));
    death.insert("reason".into(), AMQPValue::LongString("expired".into()));
    death.insert("time".into(), AMQPValue::Timestamp(1_764_547_200));
    let mut headers = FieldTable::default();
    headers.insert("x-retry-count".into(), AMQPValue::LongInt(3));
    headers.insert(
        "traceparent".into(),
        AMQPValue::LongString("00-ab-cd-01".into()),
    );
    headers.insert(
        "raw".into(),
        AMQPValue::LongString(LongString::from(vec![0xff_u8, 0, 1])),
    );
    headers.insert(
        "x-death".into(),
        AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
    );
    headers
}

fn event(id: &str, event_type: &str, correlation: Option<&str>) -> StoredEvent {
    let mut e = StoredEvent::new(
        id,
        event_type,
        "events",
        event_type,
        format!(r#"{{"id":"{id}"}}"#),
    );
    let mut properties = BasicProperties::default()
        .with_app_id("shop".into())
        .with_timestamp(1_764_547_200)
        .with_priority(7)
        .with_content_type("application/json".into());
    if let Some(c) = correlation {
        properties = properties.with_correlation_id(c.into());
    }
    e.properties = properties;
    e
}

async fn events_are_recorded_once_and_listed_by_filter(db: Db) {
    let store = db.store().await;
    let mut first = event("m1", "order.placed", Some("c1"));
    first.properties = first.properties.clone().with_headers(headers());
    first.body = vec![0xde, 0xad, 0xbe, 0xef];
    let batch = [
        first.clone(),
        event("m2", "order.paid", Some("c1")),
        event("m3", "order.placed", Some("c2")),
    ];
    assert_eq!(store.record_events(&batch).await.unwrap(), 3);
    // The same batch again (a keeper restarted before its acknowledgement): nothing new.
    assert_eq!(store.record_events(&batch).await.unwrap(), 0);
    assert_eq!(
        store
            .record_events(&[event("m4", "order.placed", None)])
            .await
            .unwrap(),
        1
    );

    let stored = store.event("m1").await.unwrap().expect("m1 is stored");
    assert_eq!(
        stored.properties, first.properties,
        "properties come back exactly"
    );
    assert_eq!(stored.headers(), Some(&headers()));
    assert_eq!(stored.body, first.body);
    assert_eq!(stored.correlation_id(), Some("c1"));
    assert_eq!(stored.source(), Some("shop"));
    assert_eq!(stored.published_at(), Some(1_764_547_200_000));
    assert!(stored.recorded_at > 0 && stored.seq > 0);
    assert!(store.event("nope").await.unwrap().is_none());

    let ids = |events: Vec<StoredEvent>| -> Vec<String> {
        events.into_iter().map(|e| e.message_id).collect()
    };
    let all = store.events(&EventFilter::new()).await.unwrap();
    assert_eq!(ids(all), ["m1", "m2", "m3", "m4"]);
    let placed = store
        .events(&EventFilter::new().event_type("order.placed"))
        .await
        .unwrap();
    assert_eq!(ids(placed), ["m1", "m3", "m4"]);
    let c1 = store
        .events(&EventFilter::new().correlation_id("c1"))
        .await
        .unwrap();
    assert_eq!(ids(c1), ["m1", "m2"]);
    let latest = store.events(&EventFilter::new().limit(2)).await.unwrap();
    assert_eq!(ids(latest), ["m3", "m4"], "the latest two, oldest first");
    let later = EventFilter::new().since(rabbitry_store::now_ms() + 60_000);
    assert!(store.events(&later).await.unwrap().is_empty());
    // A batch larger than one INSERT statement carries, with a duplicate inside it and
    // rows already stored: each new row once.
    let many: Vec<StoredEvent> = (0..250)
        .map(|i| event(&format!("bulk-{}", i % 240), "order.bulk", None))
        .chain([event("bulk-239", "order.bulk", None)]) // twice in one statement
        .chain(batch.iter().cloned())
        .collect();
    assert_eq!(store.record_events(&many).await.unwrap(), 240);
    let bulk = store
        .events(&EventFilter::new().event_type("order.bulk").limit(1_000))
        .await
        .unwrap();
    assert_eq!(bulk.len(), 240);
    let bulk_filter = EventFilter::new().event_type("order.bulk").limit(1);
    assert_eq!(
        store.count_events(&bulk_filter).await.unwrap(),
        240,
        "the limit aside"
    );
    assert_eq!(store.count_events(&EventFilter::new()).await.unwrap(), 244);
    assert!(bulk.windows(2).all(|w| w[0].seq < w[1].seq));
    assert_eq!(bulk[0].message_id, "bulk-0", "stored in the batch's order");
    db.done(store).await;
}

fn handling(id: &str, worker: &str, attempt: u32, outcome: &str, at: i64) -> HandlingRecord {
    let mut h = HandlingRecord::new(id, worker, "m1", attempt, outcome, at, "host-a");
    h.duration_us = 1_500;
    if outcome != "handled" {
        h.reason = Some("stock service away".into());
    }
    h
}

async fn handlings_tell_what_happened_to_a_message(db: Db) {
    let store = db.store().await;
    let reports = [
        handling("h1", "orders.email", 1, "handled", 10),
        handling("h2", "orders.inventory", 1, "retried", 11),
        handling("h3", "orders.inventory", 2, "handled", 20),
        handling("h4", "orders.analytics", 1, "handled", 12),
    ];
    assert_eq!(store.record_handlings(&reports).await.unwrap(), 4);
    assert_eq!(
        store.record_handlings(&reports[1..2]).await.unwrap(),
        0,
        "a report is recorded once"
    );
    let story = store.handlings("m1").await.unwrap();
    let told: Vec<(&str, u32, &str)> = story
        .iter()
        .map(|h| (h.worker.as_str(), h.attempt, h.outcome.as_str()))
        .collect();
    assert_eq!(
        told,
        [
            ("orders.email", 1, "handled"),
            ("orders.inventory", 1, "retried"),
            ("orders.analytics", 1, "handled"),
            ("orders.inventory", 2, "handled"),
        ]
    );
    assert_eq!(story[1].reason.as_deref(), Some("stock service away"));
    assert_eq!(story[0].duration_us, 1_500);
    assert!(store.handlings("other").await.unwrap().is_empty());
    db.done(store).await;
}

fn dead(worker: &str, id: &str, failed_at: &str) -> DeadLetter {
    let mut d = DeadLetter::new(worker, id, failed_at, "order.placed", b"{}".to_vec());
    d.exchange = "events".into();
    d.routing_key = "order.placed".into();
    d.kind = Some("rejected".into());
    d.reason = Some("quantity must be positive".into());
    d.properties = BasicProperties::default()
        .with_message_id(id.into())
        .with_headers(headers());
    d
}

async fn dead_letters_are_kept_once_and_change_state_once(db: Db) {
    let store = db.store().await;
    let letters = [
        dead("orders.inventory", "m1", "2026-12-01T10:00:00Z"),
        dead("orders.inventory", "m2", "2026-12-01T10:00:01Z"),
        dead("orders.email", "m1", "2026-12-01T10:00:02Z"),
    ];
    assert_eq!(store.record_dead_letters(&letters).await.unwrap(), 3);
    assert_eq!(
        store.record_dead_letters(&letters).await.unwrap(),
        0,
        "kept once"
    );
    // Redriven, failing again later: a second dead letter of the same message.
    let again = dead("orders.inventory", "m1", "2026-12-01T11:00:00Z");
    assert_eq!(store.record_dead_letters(&[again]).await.unwrap(), 1);

    let inventory = store
        .dead_letters(Some("orders.inventory"), None, None)
        .await
        .unwrap();
    assert_eq!(inventory.len(), 3);
    assert!(
        inventory
            .iter()
            .all(|d| d.state == DeadLetterState::Waiting)
    );
    assert_eq!(inventory[0].properties.headers().as_ref(), Some(&headers()));
    assert_eq!(
        inventory[0].reason.as_deref(),
        Some("quantity must be positive")
    );

    let first = inventory[0].seq;
    assert_eq!(
        store
            .set_dead_letter_state(&[first], DeadLetterState::Redriven)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        store
            .set_dead_letter_state(&[first], DeadLetterState::Purged)
            .await
            .unwrap(),
        0,
        "a redriven dead letter is not purged after"
    );
    let shown = store.dead_letter(first).await.unwrap().unwrap();
    assert_eq!(shown.state, DeadLetterState::Redriven);
    assert!(shown.state_changed_at.is_some());
    let waiting = store
        .dead_letters(
            Some("orders.inventory"),
            Some(DeadLetterState::Waiting),
            None,
        )
        .await
        .unwrap();
    assert_eq!(waiting.len(), 2);
    let count = |worker, state| store.count_dead_letters(worker, state);
    assert_eq!(
        count(Some("orders.inventory"), Some(DeadLetterState::Waiting))
            .await
            .unwrap(),
        2
    );
    assert_eq!(
        count(None, Some(DeadLetterState::Redriven)).await.unwrap(),
        1
    );
    let all = count(None, None).await.unwrap();
    assert_eq!(
        store.dead_letters(None, None, Some(2)).await.unwrap().len(),
        2
    );
    assert!(all > 2, "the count is not limited");
    assert!(store.dead_letter(999_999).await.unwrap().is_none());
    db.done(store).await;
}

async fn the_inbox_is_shared_by_processes(db: Db) {
    let store = db.store().await;
    let other = db.store().await; // another process on the same database
    let (a, b) = (Inbox::new(store.clone()), Inbox::new(other.clone()));
    let held = |claimed: Result<bool, _>| -> Duration {
        let e: Box<dyn std::error::Error + Send + Sync> = claimed.expect_err("held elsewhere");
        e.downcast_ref::<ClaimHeld>()
            .expect("ClaimHeld")
            .retry_after
    };
    // While A handles m1, B's copy is held off (its message is deferred), not skipped.
    assert!(a.claim("q:m1").await.unwrap());
    let after = held(b.claim("q:m1").await);
    assert!(
        after >= Duration::from_secs(1) && after <= Duration::from_secs(30),
        "{after:?}"
    );
    b.release("q:m1").await.unwrap(); // not B's claim: nothing happens
    held(b.claim("q:m1").await);
    // A's handler failed: released, and B's copy claims it.
    a.release("q:m1").await.unwrap();
    assert!(b.claim("q:m1").await.unwrap(), "free again after a release");
    // B handled it: from now on a copy is a duplicate.
    b.complete("q:m1").expect("B holds m1").await.unwrap();
    assert!(
        !a.claim("q:m1").await.unwrap(),
        "a duplicate once completed"
    );
    assert!(a.complete("q:m1").is_none(), "A holds nothing to complete");

    // A holder dies mid-handling: once its lease is over, the redelivered copy takes the
    // claim over, and a late completion or release by the (only slow) old holder does not
    // touch the new claim.
    for (key, late) in [("q:m2", "complete"), ("q:m3", "release")] {
        let dying = Inbox::new(store.clone()).lease(Duration::from_millis(1));
        assert!(dying.claim(key).await.unwrap());
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let taken_over = loop {
            match b.claim(key).await {
                Ok(claimed) => break claimed,
                Err(e) if e.is::<ClaimHeld>() && std::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(2)).await // the 1 ms lease
                }
                Err(e) => panic!("{e}"),
            }
        };
        assert!(taken_over, "the redelivery is handled, not skipped");
        match late {
            "complete" => dying
                .complete(key)
                .expect("it thinks it holds the key")
                .await
                .unwrap(),
            _ => dying.release(key).await.unwrap(),
        }
        held(a.claim(key).await);
        b.complete(key).unwrap().await.unwrap();
        assert!(!a.claim(key).await.unwrap());
    }

    // Within one process a copy waits for the process's own handler, lease or not.
    let slow = Inbox::new(store.clone()).lease(Duration::from_millis(1));
    assert!(slow.claim("q:m4").await.unwrap());
    tokio::time::sleep(Duration::from_millis(5)).await; // past the 1 ms lease
    held(slow.claim("q:m4").await);
    slow.complete("q:m4").unwrap().await.unwrap();
    assert!(!slow.claim("q:m4").await.unwrap());

    // Pruning forgets completed claims, never one in progress.
    assert!(a.claim("q:m5").await.unwrap());
    assert_eq!(a.prune(-1).await.unwrap(), 4);
    held(b.claim("q:m5").await);
    assert!(
        a.claim("q:m1").await.unwrap(),
        "pruned claims are forgotten"
    );

    // Many claims of one key at once: exactly one wins.
    let inbox = Arc::new(a);
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let inbox = inbox.clone();
            tokio::spawn(async move {
                match inbox.claim("q:race").await {
                    Ok(claimed) => claimed,
                    Err(e) => {
                        assert!(e.is::<ClaimHeld>(), "held by the winner: {e}");
                        false
                    }
                }
            })
        })
        .collect();
    let mut won = 0;
    for t in tasks {
        won += usize::from(t.await.unwrap());
    }
    assert_eq!(won, 1);
    other.close().await;
    db.done(store).await;
}

async fn concurrent_writers_do_not_lock_each_other_out(db: Db) {
    let store = db.store().await;
    let tasks: Vec<_> = (0..8)
        .map(|t| {
            let store = store.clone();
            tokio::spawn(async move {
                for batch in 0..10 {
                    let events: Vec<StoredEvent> = (0..25)
                        .map(|i| event(&format!("w{t}-{batch}-{i}"), "load", None))
                        .collect();
                    store.record_events(&events).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let all = store
        .events(&EventFilter::new().limit(10_000))
        .await
        .unwrap();
    assert_eq!(all.len(), 8 * 10 * 25);
    db.done(store).await;
}

/// What a hostile producer can put in a message must not make the store refuse a batch
/// (the keeper would retry it forever): NUL bytes, which PostgreSQL's `TEXT` refuses, and
/// values too long for an index entry.
async fn hostile_values_are_kept_not_refused(db: Db) {
    let store = db.store().await;
    let long_a = format!("{}a", "x".repeat(600));
    let long_b = format!("{}b", "x".repeat(600));
    let batch = [
        event("nul\0id", "order\0placed", Some("c\0rr")),
        event(&long_a, "order.placed", Some("long")),
        event(&long_b, "order.placed", None),
    ];
    assert_eq!(store.record_events(&batch).await.unwrap(), 3);
    assert_eq!(
        store.record_events(&batch).await.unwrap(),
        0,
        "still idempotent"
    );
    let kept = store
        .event("nul\0id")
        .await
        .unwrap()
        .expect("found by its id");
    assert_eq!(kept.message_id, "nul\u{fffd}id");
    assert!(store.event(&long_a).await.unwrap().is_some());
    assert!(
        store.event(&long_b).await.unwrap().is_some(),
        "two long ids stay two"
    );

    let mut letter = DeadLetter::new("w\0", "m\0", "f".repeat(10_000), "t", "{}");
    letter.reason = Some("bad\0reason".into());
    assert_eq!(
        store.record_dead_letters(&[letter.clone()]).await.unwrap(),
        1
    );
    assert_eq!(store.record_dead_letters(&[letter]).await.unwrap(), 0);
    let mut handling = HandlingRecord::new("h\0", "w", "m\0", 1, "handled", 1, "host\0");
    handling.reason = Some("\0".into());
    assert_eq!(store.record_handlings(&[handling]).await.unwrap(), 1);
    assert_eq!(store.handlings("m\0").await.unwrap().len(), 1);

    // A float header JSON cannot hold: kept as text, and the listing still reads.
    let mut odd = event("nan", "order.placed", None);
    let mut headers = FieldTable::default();
    headers.insert("x-score".into(), AMQPValue::Double(f64::NAN));
    let inner = FieldArray::from(vec![AMQPValue::Float(f32::NEG_INFINITY)]);
    headers.insert("x-list".into(), AMQPValue::FieldArray(inner));
    odd.properties = odd.properties.clone().with_headers(headers);
    assert_eq!(store.record_events(&[odd]).await.unwrap(), 1);
    let kept = store.event("nan").await.unwrap().expect("readable");
    let kept = kept.headers().unwrap().inner();
    assert_eq!(
        kept.get("x-score"),
        Some(&AMQPValue::LongString("NaN".into()))
    );
    assert!(store.events(&EventFilter::new().limit(10)).await.is_ok());
    db.done(store).await;
}

/// The saga repository: a new key inserts once, an update succeeds only over the version
/// it read, and listings filter by saga and status.
async fn saga_instances_are_saved_only_over_the_version_they_read(db: Db) {
    use rabbitry::{SagaRecord, SagaRepository};
    let store = db.store().await;
    let repo = SagaStore::new(store.clone());
    assert!(repo.load("orders", "42").await.unwrap().is_none());
    let mut first = SagaRecord::new("42");
    first.version = 1;
    first.state = serde_json::json!({"stock": "pending"});
    first.status = "reserving".into();
    assert!(repo.save("orders", &first).await.unwrap());
    // A second process creating the same instance loses.
    assert!(!repo.save("orders", &first).await.unwrap());
    let mut a = repo.load("orders", "42").await.unwrap().unwrap();
    assert_eq!(a, first);
    let mut b = a.clone();
    a.version = 2;
    a.state = serde_json::json!({"stock": "done"});
    b.version = 2;
    b.state = serde_json::json!({"payment": "done"});
    assert!(repo.save("orders", &a).await.unwrap());
    assert!(
        !repo.save("orders", &b).await.unwrap(),
        "b read version 1, now 2"
    );
    let now = repo.load("orders", "42").await.unwrap().unwrap();
    assert_eq!(now.state, serde_json::json!({"stock": "done"}));

    let mut other = SagaRecord::new("42");
    other.version = 1;
    other.status = "done".into();
    other.completed = true;
    assert!(
        repo.save("refunds", &other).await.unwrap(),
        "one key, two sagas"
    );
    let all = store.sagas(&SagaFilter::new()).await.unwrap();
    assert_eq!(all.len(), 2);
    let reserving = store
        .sagas(&SagaFilter::new().status("reserving"))
        .await
        .unwrap();
    assert_eq!(reserving.len(), 1);
    assert_eq!(reserving[0].saga, "orders");
    assert_eq!(store.saga_instances("42", None).await.unwrap().len(), 2);
    let refunds = store.saga_instances("42", Some("refunds")).await.unwrap();
    assert!(refunds[0].record.completed);
    db.done(store).await;
}

/// Stored schedules: checked before they are kept, listed, removed.
async fn schedules_are_checked_kept_and_removed(db: Db) {
    let store = db.store().await;
    let nightly = StoredSchedule::new(
        "nightly",
        "0 30 2 * * *",
        "report.due",
        r#"{"kind":"daily"}"#,
    )
    .time_zone("Europe/Paris");
    assert!(store.add_schedule(&nightly).await.unwrap());
    assert!(
        !store.add_schedule(&nightly).await.unwrap(),
        "names are unique"
    );
    for (bad, why) in [
        (
            StoredSchedule::new("x", "61 * * * *", "a.b", "{}"),
            "invalid cron pattern",
        ),
        (
            StoredSchedule::new("x", "* * * * *", "a.b", "{not json"),
            "not JSON",
        ),
        (
            StoredSchedule::new("x y", "* * * * *", "a.b", "{}"),
            "schedule name",
        ),
        (
            StoredSchedule::new("x", "* * * * *", "a.b", "{}").time_zone("Nowhere/Else"),
            "unknown time zone",
        ),
    ] {
        let err = store.add_schedule(&bad).await.unwrap_err();
        assert!(matches!(err, StoreError::Invalid(_)), "{err:?}");
        assert!(err.to_string().contains(why), "{err}");
    }
    let kept = store.schedules().await.unwrap();
    assert_eq!(kept.len(), 1);
    assert_eq!(
        (kept[0].name.as_str(), kept[0].time_zone.as_str()),
        ("nightly", "Europe/Paris")
    );
    assert!(kept[0].created_ms > 0);
    assert_eq!(kept[0].to_schedule().unwrap().pattern(), "0 30 2 * * *");
    assert!(store.remove_schedule("nightly").await.unwrap());
    assert!(!store.remove_schedule("nightly").await.unwrap());
    assert!(store.schedules().await.unwrap().is_empty());
    db.done(store).await;
}

/// Tokens: the secret authenticates until it is revoked or expires; only its hash is kept.
async fn tokens_authenticate_until_revoked_or_expired(db: Db) {
    use rabbitry_store::{NewToken, Scope};
    let store = db.store().await;
    let (made, secret) = store
        .create_token(&NewToken::new(
            "ci",
            vec![Scope::parse("publish:order.*").unwrap(), Scope::Read],
        ))
        .await
        .unwrap();
    let found = store
        .authenticate(&secret)
        .await
        .unwrap()
        .expect("a live token");
    assert_eq!(found, made);
    assert!(found.may_publish("order.placed") && !found.may_publish("payment.made"));
    assert!(found.may_read() && !found.is_admin());
    assert!(store.authenticate("rbt_nope").await.unwrap().is_none());
    assert!(
        store
            .authenticate(&"x".repeat(10_000))
            .await
            .unwrap()
            .is_none()
    );
    let mut old = NewToken::new("old", vec![Scope::Admin]);
    old.expires_ms = Some(1);
    let (_, expired) = store.create_token(&old).await.unwrap();
    assert!(
        store.authenticate(&expired).await.unwrap().is_none(),
        "expired"
    );
    assert!(store.revoke_token(&made.id).await.unwrap());
    assert!(!store.revoke_token(&made.id).await.unwrap(), "once");
    assert!(
        store.authenticate(&secret).await.unwrap().is_none(),
        "revoked"
    );
    let listed = store.tokens().await.unwrap();
    assert_eq!(listed.len(), 2);
    assert!(
        listed
            .iter()
            .any(|t| t.id == made.id && t.revoked_ms.is_some())
    );
    for bad in [
        NewToken::new("x", vec![]),
        NewToken::new("", vec![Scope::Read]),
    ] {
        assert!(matches!(
            store.create_token(&bad).await,
            Err(StoreError::Invalid(_))
        ));
    }
    db.done(store).await;
}

on_both_databases!(
    tokens_authenticate_until_revoked_or_expired,
    saga_instances_are_saved_only_over_the_version_they_read,
    schedules_are_checked_kept_and_removed,
    hostile_values_are_kept_not_refused,
    events_are_recorded_once_and_listed_by_filter,
    handlings_tell_what_happened_to_a_message,
    dead_letters_are_kept_once_and_change_state_once,
    the_inbox_is_shared_by_processes,
    concurrent_writers_do_not_lock_each_other_out,
);

#[tokio::test]
async fn bad_urls_and_unreachable_databases_are_clear_errors() {
    let err = Store::connect("mysql://root@localhost/x")
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Url(_)), "{err:?}");
    assert!(err.to_string().contains("sqlite://"), "{err}");

    let err = Store::connect("postgres://postgres:secret@127.0.0.1:1/x")
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Connect { .. }), "{err:?}");
    assert!(
        !err.to_string().contains("secret"),
        "the password is not shown: {err}"
    );

    let err = Store::connect("sqlite:///nonexistent-dir/x/store.db")
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Connect { .. }), "{err:?}");
}
