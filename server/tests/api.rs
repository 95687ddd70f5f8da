//! The HTTP API against RabbitMQ and a store (SQLite and PostgreSQL): the auth matrix on
//! every endpoint class (no token, a bad, expired or revoked one, the wrong scope, the
//! right one), and publishing's answers — 202 with the message id (the Idempotency-Key
//! when sent), 400, 413, 422 and 429 with Retry-After.

#[path = "../../tests/support/mod.rs"]
#[allow(unused_macros)]
mod support;
#[path = "../../store/tests/db/mod.rs"]
#[macro_use]
mod db;

mod client;

use std::net::SocketAddr;

use client::*;
use db::Db;
use rabbitry::prelude::*;
use rabbitry::{Publisher, Topology};
use rabbitry_server::Api;
use rabbitry_store::Store;
use support::*;

/// The API over `store` on a free port, publishing to `env`'s exchange where a queue
/// bound with `binding` (tracked for cleanup) takes the events; stopped by [`Running::stop`].
struct Running {
    addr: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Running {
    async fn start(
        env: &TestEnv,
        store: &Store,
        queue: &str,
        binding: &str,
        max_body: usize,
    ) -> Running {
        let subscription = Subscription::new(env.queue(queue)).bind(binding);
        env.track(&subscription);
        Topology::new(&env.exchange, [&subscription])
            .declare(&url())
            .await
            .unwrap();
        let publisher = Publisher::builder(url())
            .exchange(&env.exchange)
            .build()
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        // One event type with a registered schema.
        let invoice = serde_json::json!({
            "type": "object",
            "required": ["invoice"],
            "properties": {"invoice": {"type": "integer"}}
        });
        let schemas = rabbitry::Schemas::new().insert(
            "invoice.due",
            rabbitry::Schema::from_json(&invoice).unwrap(),
        );
        let api = Api::new(store.clone(), publisher)
            .max_body(max_body)
            .schemas(schemas);
        let server = tokio::spawn(api.serve(listener, async {
            stopped.await.ok();
        }));
        Running { addr, stop, server }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        self.server.await.unwrap().unwrap();
    }
}

async fn every_endpoint_answers_by_token_and_scope(db: Db) {
    let env = TestEnv::rabbitmq("api_auth");
    let store = db.store().await;
    let running = Running::start(&env, &store, "orders", "order.*", 1024).await;
    let addr = running.addr;

    let admin = token(&store, &["admin"], |_| {}).await;
    let reader = token(&store, &["read"], |_| {}).await;
    let orders_only = token(&store, &["publish:order.*"], |_| {}).await;
    let expired = token(&store, &["admin"], |t| t.expires_ms = Some(1)).await;
    let revoked = token(&store, &["admin"], |_| {}).await;
    let revoked_id = store.tokens().await.unwrap()[0].id.clone();
    assert!(store.revoke_token(&revoked_id).await.unwrap());

    // The matrix: (token, publish order.placed, read events, admin tokens).
    let bad = "rbt_0000000000000000000000000000000000000000000000000000000000000000";
    let cases: [(Option<&str>, u16, u16, u16); 7] = [
        (None, 401, 401, 401),
        (Some(bad), 401, 401, 401),
        (Some(&expired), 401, 401, 401),
        (Some(&revoked), 401, 401, 401),
        (Some(&reader), 403, 200, 403),
        (Some(&orders_only), 202, 403, 403),
        (Some(&admin), 202, 200, 200),
    ];
    for (i, (who, publish, read, manage)) in cases.into_iter().enumerate() {
        let p = call(
            addr,
            "POST",
            "/api/v1/events/order.placed",
            who,
            &[],
            br#"{"order_id":1}"#,
        )
        .await;
        let r = call(addr, "GET", "/api/v1/events", who, &[], b"").await;
        let m = call(addr, "GET", "/api/v1/tokens", who, &[], b"").await;
        assert_eq!(
            (p.status, r.status, m.status),
            (publish, read, manage),
            "case {i}: {} {} {}",
            p.body,
            r.body,
            m.body
        );
        for a in [&p, &r, &m] {
            if a.status == 401 {
                assert!(a.head.contains("www-authenticate: bearer"), "{}", a.head);
            }
            if a.status >= 400 {
                assert!(
                    a.json()["message"].is_string(),
                    "errors are JSON: {}",
                    a.body
                );
            }
        }
    }
    // Probes need no token; a publish scope covers only its pattern.
    assert_eq!(
        call(addr, "GET", "/health", None, &[], b"").await.status,
        200
    );
    assert_eq!(
        call(addr, "GET", "/ready", None, &[], b"").await.status,
        200
    );
    let other = call(
        addr,
        "POST",
        "/api/v1/events/payment.made",
        Some(&orders_only),
        &[],
        b"{}",
    )
    .await;
    assert_eq!(other.status, 403);
    for path in [
        "/api/v1/dead-letters",
        "/api/v1/dead-letters/1",
        "/api/v1/schedules",
        "/api/v1/sagas",
        "/api/v1/sagas/1",
        "/api/v1/events/x",
    ] {
        assert_eq!(
            call(addr, "GET", path, None, &[], b"").await.status,
            401,
            "{path}"
        );
        assert_eq!(
            call(addr, "GET", path, Some(&orders_only), &[], b"")
                .await
                .status,
            403,
            "{path}"
        );
        assert!(
            [200, 404].contains(
                &call(addr, "GET", path, Some(&reader), &[], b"")
                    .await
                    .status
            ),
            "{path}"
        );
    }

    // Publishing's answers.
    let sent = call(
        addr,
        "POST",
        "/api/v1/events/order.placed",
        Some(&admin),
        &[("Idempotency-Key", "order-7-v1")],
        br#"{"order_id":7}"#,
    )
    .await;
    assert_eq!(
        (sent.status, sent.json()["message_id"].as_str()),
        (202, Some("order-7-v1"))
    );
    let not_json = call(
        addr,
        "POST",
        "/api/v1/events/order.placed",
        Some(&admin),
        &[],
        b"{oops",
    )
    .await;
    assert_eq!(not_json.status, 400, "{}", not_json.body);
    let big = format!(r#"{{"pad":"{}"}}"#, "x".repeat(2000));
    assert_eq!(
        call(
            addr,
            "POST",
            "/api/v1/events/order.placed",
            Some(&admin),
            &[],
            big.as_bytes()
        )
        .await
        .status,
        413
    );
    let unroutable = call(
        addr,
        "POST",
        "/api/v1/events/nobody.listens",
        Some(&admin),
        &[],
        b"{}",
    )
    .await;
    assert_eq!(
        (unroutable.status, unroutable.json()["error"].as_str()),
        (422, Some("unroutable"))
    );
    for key in ["order.%2A", "a%20b", &"k".repeat(300)] {
        let path = format!("/api/v1/events/{key}");
        assert_eq!(
            call(addr, "POST", &path, Some(&admin), &[], b"{}")
                .await
                .status,
            400,
            "{key}"
        );
    }
    let limited = token(&store, &["publish:order.*"], |t| {
        t.rate_per_second = Some(2)
    })
    .await;
    let mut answers = Vec::new();
    for n in 0..3 {
        let body = format!(r#"{{"order_id":{n}}}"#);
        answers.push(
            call(
                addr,
                "POST",
                "/api/v1/events/order.placed",
                Some(&limited),
                &[],
                body.as_bytes(),
            )
            .await,
        );
    }
    assert_eq!(
        answers.iter().map(|a| a.status).collect::<Vec<_>>(),
        [202, 202, 429]
    );
    assert!(
        answers[2].head.contains("retry-after: 1"),
        "{}",
        answers[2].head
    );
    // Hostile requests: clear 4xx, never a 5xx.
    let odd = [
        call(
            addr,
            "GET",
            "/api/v1/events?limit=abc",
            Some(&admin),
            &[],
            b"",
        )
        .await,
        call(addr, "GET", "/api/v1/events?nope=1", Some(&admin), &[], b"").await,
        call(
            addr,
            "GET",
            "/api/v1/dead-letters/abc",
            Some(&admin),
            &[],
            b"",
        )
        .await,
        call(
            addr,
            "GET",
            "/api/v1/dead-letters?state=lost",
            Some(&admin),
            &[],
            b"",
        )
        .await,
        call(addr, "POST", "/api/v1/tokens", Some(&admin), &[], b"[1,2]").await,
        call(
            addr,
            "POST",
            "/api/v1/tokens",
            Some(&admin),
            &[("Content-Type", "application/json")],
            br#"{"name":"x","scopes":["root"]}"#,
        )
        .await,
        call(addr, "GET", "/api/v1/nothing", Some(&admin), &[], b"").await,
    ];
    for a in &odd {
        assert!((400..500).contains(&a.status), "{} {}", a.status, a.body);
        assert!(a.json()["error"].is_string(), "{}", a.body);
    }
    // NUL bytes (PostgreSQL's text refuses them) are values like any other: no 5xx.
    for (method, path, expected) in [
        ("GET", "/api/v1/events?type=%00&correlation_id=a%00b", 200),
        ("GET", "/api/v1/dead-letters?worker=%00", 200),
        ("GET", "/api/v1/sagas?saga=%00&state=%00", 200),
        ("GET", "/api/v1/sagas/%00", 404),
        ("GET", "/api/v1/events/%00", 404),
        ("DELETE", "/api/v1/schedules/%00", 404),
        ("DELETE", "/api/v1/tokens/%00", 404),
        ("GET", "/api/v1/sagas/%FF", 400),
    ] {
        let a = call(addr, method, path, Some(&admin), &[], b"").await;
        assert_eq!(a.status, expected, "{method} {path}: {}", a.body);
        assert!(
            a.body.is_empty() || a.json().is_object() || a.json().is_array(),
            "{}",
            a.body
        );
    }
    // A method an endpoint does not take: 405, as JSON too; the scheme's case is free.
    let wrong = call(addr, "PUT", "/api/v1/events", Some(&admin), &[], b"").await;
    assert_eq!(
        (wrong.status, wrong.json()["error"].as_str()),
        (405, Some("method_not_allowed"))
    );
    let lower = call(
        addr,
        "GET",
        "/api/v1/schedules",
        None,
        &[("Authorization", &format!("bearer {admin}"))],
        b"",
    )
    .await;
    assert_eq!(lower.status, 200);
    let auth = call(
        addr,
        "GET",
        "/api/v1/events",
        None,
        &[("Authorization", "Basic Zm9vOmJhcg==")],
        b"",
    )
    .await;
    assert_eq!(auth.status, 401);

    // Tokens through the API: made (shown once), used, revoked.
    let json = [("Content-Type", "application/json")];
    let made = call(
        addr,
        "POST",
        "/api/v1/tokens",
        Some(&admin),
        &json,
        br#"{"name":"ci","scopes":["read"]}"#,
    )
    .await;
    assert_eq!(made.status, 201, "{}", made.body);
    let secret = made.json()["secret"].as_str().unwrap().to_owned();
    let id = made.json()["token"]["id"].as_str().unwrap().to_owned();
    assert_eq!(
        call(addr, "GET", "/api/v1/schedules", Some(&secret), &[], b"")
            .await
            .status,
        200
    );
    let listed = call(addr, "GET", "/api/v1/tokens", Some(&admin), &[], b"").await;
    assert!(!listed.body.contains(&secret), "secrets are never listed");
    assert_eq!(
        call(
            addr,
            "DELETE",
            &format!("/api/v1/tokens/{id}"),
            Some(&admin),
            &[],
            b""
        )
        .await
        .status,
        204
    );
    assert_eq!(
        call(addr, "GET", "/api/v1/schedules", Some(&secret), &[], b"")
            .await
            .status,
        401
    );

    // What reached the queue: the admin's and the orders token's publishes, with their ids.
    let taken = env.take(&env.queue("orders"), 5).await;
    assert!(
        taken
            .iter()
            .any(|t| t.message_id().as_deref() == Some("order-7-v1"))
    );
    running.stop().await;
    db.done(store).await;
}

async fn dead_letters_are_redriven_and_purged_and_schedules_kept_over_http(db: Db) {
    use rabbitry_store::DeadLetter;
    let env = TestEnv::rabbitmq("api_actions");
    let store = db.store().await;
    let running = Running::start(&env, &store, "billing", "invoice.due", 1024 * 1024).await;
    let addr = running.addr;
    let admin = token(&store, &["admin"], |_| {}).await;
    let reader = token(&store, &["read"], |_| {}).await;

    let queue = env.queue("billing");
    let letters: Vec<DeadLetter> = ["m-1", "m-2"]
        .iter()
        .map(|id| {
            let mut d = DeadLetter::new(
                &queue,
                *id,
                "2026-12-01T10:00:00.000Z",
                "invoice.due",
                r#"{"invoice":1}"#,
            );
            let mut table = rabbitry::lapin::types::FieldTable::default();
            table.insert(
                "x-retry-count".into(),
                rabbitry::lapin::types::AMQPValue::LongLongInt(4),
            );
            d.properties = d
                .properties
                .clone()
                .with_message_id((*id).into())
                .with_headers(table);
            d
        })
        .collect();
    assert_eq!(store.record_dead_letters(&letters).await.unwrap(), 2);
    let seqs: Vec<i64> = store
        .dead_letters(Some(&queue), None, None)
        .await
        .unwrap()
        .iter()
        .map(|d| d.seq)
        .collect();
    let (first, second) = (seqs[0], seqs[1]);

    let path = |seq: i64, action: &str| format!("/api/v1/dead-letters/{seq}/{action}");
    assert_eq!(
        call(
            addr,
            "POST",
            &path(first, "redrive"),
            Some(&reader),
            &[],
            b""
        )
        .await
        .status,
        403
    );
    let redriven = call(
        addr,
        "POST",
        &path(first, "redrive"),
        Some(&admin),
        &[],
        b"",
    )
    .await;
    assert_eq!(
        (redriven.status, redriven.json()["state"].as_str()),
        (200, Some("redriven")),
        "{}",
        redriven.body
    );
    assert_eq!(
        call(
            addr,
            "POST",
            &path(first, "redrive"),
            Some(&admin),
            &[],
            b""
        )
        .await
        .status,
        409,
        "only once"
    );
    let purged = call(addr, "POST", &path(second, "purge"), Some(&admin), &[], b"").await;
    assert_eq!(
        (purged.status, purged.json()["state"].as_str()),
        (200, Some("purged"))
    );
    assert_eq!(
        call(
            addr,
            "POST",
            &path(999_999, "purge"),
            Some(&admin),
            &[],
            b""
        )
        .await
        .status,
        404
    );
    // Back in the worker's queue, with a fresh retry budget.
    let back = env.take(&queue, 1).await;
    assert_eq!(back[0].message_id().as_deref(), Some("m-1"));
    assert_eq!(back[0].header_int("x-retry-count"), None);
    assert!(back[0].header_str("x-redriven-at").is_some());

    let json = [("Content-Type", "application/json")];
    let nightly = br#"{"name":"nightly","pattern":"0 30 2 * * *","routing_key":"report.due","body":{"kind":"daily"},"time_zone":"Europe/Paris"}"#;
    assert_eq!(
        call(
            addr,
            "POST",
            "/api/v1/schedules",
            Some(&reader),
            &json,
            nightly
        )
        .await
        .status,
        403
    );
    let added = call(
        addr,
        "POST",
        "/api/v1/schedules",
        Some(&admin),
        &json,
        nightly,
    )
    .await;
    assert_eq!(added.status, 201, "{}", added.body);
    assert_eq!(added.json()["time_zone"], "Europe/Paris");
    assert_eq!(
        call(
            addr,
            "POST",
            "/api/v1/schedules",
            Some(&admin),
            &json,
            nightly
        )
        .await
        .status,
        409
    );
    let bad = br#"{"name":"x","pattern":"61 * * * *","routing_key":"a.b","body":{}}"#;
    let refused = call(addr, "POST", "/api/v1/schedules", Some(&admin), &json, bad).await;
    assert_eq!(refused.status, 400);
    assert!(
        refused.json()["message"]
            .as_str()
            .unwrap()
            .contains("invalid cron pattern")
    );
    let listed = call(addr, "GET", "/api/v1/schedules", Some(&reader), &[], b"").await;
    assert_eq!(listed.json().as_array().unwrap().len(), 1);
    assert_eq!(
        call(
            addr,
            "DELETE",
            "/api/v1/schedules/nightly",
            Some(&admin),
            &[],
            b""
        )
        .await
        .status,
        204
    );
    assert_eq!(
        call(
            addr,
            "DELETE",
            "/api/v1/schedules/nightly",
            Some(&admin),
            &[],
            b""
        )
        .await
        .status,
        404
    );

    // The OpenAPI document (no token needed) names every operation, and every operation
    // answers only what the document says it may.
    let doc = call(addr, "GET", "/api/v1/openapi.json", None, &[], b"").await;
    assert_eq!(doc.status, 200);
    let doc = doc.json();
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().unwrap();
    assert_eq!(paths.len(), 26, "{:?}", paths.keys().collect::<Vec<_>>());
    let mut operations = 0;
    for (template, item) in paths {
        let path = template
            .replace("{key}", "x.y")
            .replace("{seq}", "1")
            .replace("{name}", "x")
            .replace("{id}", "x")
            .replace("{pattern}", "x");
        for method in ["get", "post", "delete"] {
            let Some(op) = item.get(method) else { continue };
            operations += 1;
            let answer = call(
                addr,
                &method.to_uppercase(),
                &path,
                Some(&admin),
                &json,
                b"{}",
            )
            .await;
            let documented = op["responses"].as_object().unwrap();
            assert!(
                documented.contains_key(&answer.status.to_string()),
                "{method} {path} answered {} ({}), not in the document",
                answer.status,
                answer.body
            );
        }
    }
    assert_eq!(operations, 30);
    running.stop().await;
    db.done(store).await;
}

async fn recorded_events_are_replayed_over_http(db: Db) {
    use rabbitry_store::{REPLAYED_FROM, StoredEvent};
    let env = TestEnv::rabbitmq("api_replay");
    let store = db.store().await;
    let running = Running::start(&env, &store, "ledger", "invoice.due", 1024 * 1024).await;
    let addr = running.addr;
    let queue = env.queue("ledger");
    let admin = token(&store, &["admin"], |_| {}).await;
    let reader = token(&store, &["read"], |_| {}).await;
    let events: Vec<StoredEvent> = (1..=3)
        .map(|i| {
            StoredEvent::new(
                format!("e-{i}"),
                "invoice.due",
                &env.exchange,
                "invoice.due",
                format!(r#"{{"invoice":{i}}}"#),
            )
        })
        .collect();
    assert_eq!(store.record_events(&events).await.unwrap(), 3);
    let replay = |token: &str, body: &str| {
        let (token, body) = (token.to_owned(), body.to_owned());
        async move {
            call(
                addr,
                "POST",
                "/api/v1/replay",
                Some(&token),
                &[("content-type", "application/json")],
                body.as_bytes(),
            )
            .await
        }
    };
    for (who, body, status) in [
        (&reader, r#"{"type":"invoice.due"}"#, 403),
        (&admin, r#"{"message_id":"nope"}"#, 404),
        (&admin, r#"{"limit":0}"#, 400),
        (&admin, r#"{"to_worker":"amq.x"}"#, 400),
        (
            &admin,
            r#"{"message_id":"e-1","to_worker":"no-such-queue-anywhere"}"#,
            422,
        ),
        (&admin, r#"{"limit":"x"}"#, 422),
    ] {
        let answer = replay(who, body).await;
        assert_eq!(answer.status, status, "{body}: {}", answer.body);
    }

    // Published through the API, an event of a type with a schema must match it.
    let publish = |body: &'static str| {
        let admin = admin.clone();
        async move {
            call(
                addr,
                "POST",
                "/api/v1/events/invoice.due",
                Some(&admin),
                &[],
                body.as_bytes(),
            )
            .await
        }
    };
    let refused = publish(r#"{"invoice":"seven"}"#).await;
    assert_eq!(refused.status, 400, "{}", refused.body);
    let message = refused.json()["message"].as_str().unwrap().to_owned();
    assert!(
        message.contains("schema of 'invoice.due'") && message.contains("/invoice"),
        "{message}"
    );
    assert_eq!(publish(r#"{"other":1}"#).await.status, 400);
    assert_eq!(publish(r#"{"invoice":7}"#).await.status, 202);
    assert_eq!(env.take(&queue, 1).await[0].body, br#"{"invoice":7}"#);

    // The latest two to the exchange, oldest first, as new messages naming the originals.
    let answer = replay(&admin, r#"{"type":"invoice.due","limit":2}"#).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let answer = answer.json();
    assert_eq!(answer["matching"], 3);
    let from: Vec<&str> = answer["replayed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["from"].as_str().unwrap())
        .collect();
    assert_eq!(from, ["e-2", "e-3"]);
    let taken = env.take(&queue, 2).await;
    for (t, r) in taken.iter().zip(answer["replayed"].as_array().unwrap()) {
        assert_eq!(t.message_id().as_deref(), r["message_id"].as_str());
        assert_eq!(t.header_str(REPLAYED_FROM).as_deref(), r["from"].as_str());
    }

    // One, to one worker's queue.
    let answer = replay(
        &admin,
        &format!(r#"{{"message_id":"e-1","to_worker":"{queue}"}}"#),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let taken = env.take(&queue, 1).await;
    assert_eq!(taken[0].header_str(REPLAYED_FROM).as_deref(), Some("e-1"));
    assert_eq!(taken[0].body, br#"{"invoice":1}"#);
    running.stop().await;
    db.done(store).await;
}

on_both_databases!(
    every_endpoint_answers_by_token_and_scope,
    dead_letters_are_redriven_and_purged_and_schedules_kept_over_http,
    recorded_events_are_replayed_over_http,
);
