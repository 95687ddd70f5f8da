//! Webhooks as consumers, registered through the API, against RabbitMQ and a store (SQLite
//! and PostgreSQL) and a receiver on loopback (allowed for this test): every request is
//! signed per Standard Webhooks over the exact body, a 503 is retried through the broker
//! (same webhook-id, a fresh signature), a 400 ends in the dead-letter queue with the
//! status and the answer's start, and private addresses are refused at registration.

#[path = "../../tests/support/mod.rs"]
#[allow(unused_macros)]
mod support;
#[path = "../../store/tests/db/mod.rs"]
#[macro_use]
mod db;
mod client;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use client::*;
use db::Db;
use rabbitry::control::{Control, Controller};
use rabbitry::{Publisher, Runtime};
use rabbitry_server::{Api, Egress, WebhookHost, signature, webhook_queue};
use support::*;
use tokio::sync::mpsc;

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Received {
    headers: HeaderMap,
    body: Bytes,
}

impl Received {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }

    fn order(&self) -> u64 {
        let json: serde_json::Value = serde_json::from_slice(&self.body).unwrap();
        json["order_id"].as_u64().unwrap()
    }
}

type Seen = Arc<Mutex<HashMap<u64, usize>>>;

/// Answers by the body: `"fail":"once"` gets a 503 the first time, `"fail":"always"` a
/// 400; anything else 204.
async fn receive(
    State((seen, tx)): State<(Seen, mpsc::UnboundedSender<Received>)>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, [(&'static str, &'static str); 1], &'static str) {
    let received = Received { headers, body };
    let order = received.order();
    let text = String::from_utf8_lossy(&received.body).into_owned();
    let times = {
        let mut seen = seen.lock().unwrap();
        let n = seen.entry(order).or_default();
        *n += 1;
        *n
    };
    let _ = tx.send(received);
    if text.contains(r#""fail":"once""#) && times == 1 {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [("retry-after", "1")],
            "busy",
        );
    }
    if text.contains(r#""fail":"always""#) {
        return (
            StatusCode::BAD_REQUEST,
            [("x-why", "bad")],
            "bad payload: no sku",
        );
    }
    (StatusCode::NO_CONTENT, [("x-why", "ok")], "")
}

async fn webhooks_are_signed_retried_dead_lettered_and_guarded(db: Db) {
    let env = TestEnv::rabbitmq("webhooks");
    let store = db.store().await;
    let name = env.queue("hook").replace('.', "-");
    let queue = webhook_queue(&name);
    env.track_names([
        queue.as_str(),
        &format!("{queue}.dlq"),
        &format!("{queue}.topology"),
        &format!("{queue}.retry.100"),
        &format!("{queue}.retry.200"),
        &format!("{queue}.retry.1000"),
        &format!("{}.audit", env.exchange),
    ]);

    // The receiver, on loopback.
    let (tx, mut requests) = mpsc::unbounded_channel();
    let receiver = axum::Router::new()
        .route("/hook", axum::routing::post(receive))
        .with_state((Seen::default(), tx));
    let receiver_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_url = format!("http://{}/hook", receiver_listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(receiver_listener, receiver).await });

    // The server: webhooks hosted on a runtime of their own, loopback allowed.
    let hooks = Runtime::builder()
        .url(url())
        .exchange(&env.exchange)
        .control(Control::new().registry(store.clone()))
        .start()
        .await
        .unwrap();
    let egress = Egress::new().allow("127.0.0.0/8".parse().unwrap());
    let host = Arc::new(WebhookHost::new(hooks.clone(), store.clone(), egress));
    let publisher = Publisher::builder(url())
        .exchange(&env.exchange)
        .build()
        .unwrap();
    let controller = Controller::start(url()).await.unwrap();
    let api = Api::new(store.clone(), publisher)
        .controller(controller.clone())
        .webhooks(host);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(api.serve(listener, async move {
        let _ = stopped.await;
    }));
    let admin = token(&store, &["admin"], |_| {}).await;
    let reader = token(&store, &["read"], |_| {}).await;

    let register = |body: String| {
        let admin = admin.clone();
        async move {
            call(
                addr,
                "POST",
                "/api/v1/webhooks",
                Some(&admin),
                &[("content-type", "application/json")],
                body.as_bytes(),
            )
            .await
        }
    };
    // Who may: 401 without a token, 403 for a reader, for registration and control alike.
    let body = format!(r#"{{"name":"{name}","url":"{hook_url}","bindings":["order.*"]}}"#);
    for (who, status) in [(None, 401), (Some(reader.as_str()), 403)] {
        for (method, path) in [
            ("POST", "/api/v1/webhooks".to_owned()),
            ("DELETE", format!("/api/v1/webhooks/{name}")),
            ("POST", format!("/api/v1/workers/{queue}/pause")),
            ("DELETE", format!("/api/v1/workers/{queue}")),
        ] {
            let answer = call(
                addr,
                method,
                &path,
                who,
                &[("content-type", "application/json")],
                body.as_bytes(),
            )
            .await;
            assert_eq!(answer.status, status, "{method} {path}: {}", answer.body);
        }
    }
    assert_eq!(
        call(addr, "GET", "/api/v1/webhooks", None, &[], b"")
            .await
            .status,
        401
    );
    assert_eq!(
        call(addr, "GET", "/api/v1/workers", Some(&reader), &[], b"")
            .await
            .status,
        200
    );

    // Private addresses are refused without the allowance (no packet is sent to them),
    // and bad registrations say what is wrong.
    for (url, what) in [
        ("http://10.0.0.1/hook", "refused"),
        ("http://169.254.169.254/latest/meta-data", "refused"),
        ("http://[::ffff:192.168.0.1]/", "refused"),
        ("http://192.168.1.20:8080/", "refused"),
        ("ftp://example.com/", "scheme"),
        ("http://user:pw@127.0.0.1/", "credentials"),
    ] {
        let answer = register(format!(
            r#"{{"name":"{name}","url":"{url}","bindings":["order.*"]}}"#
        ))
        .await;
        assert_eq!(answer.status, 400, "{url}: {}", answer.body);
        assert!(
            answer.json()["message"].as_str().unwrap().contains(what),
            "{url}: {}",
            answer.body
        );
    }
    for (body, status) in [
        (
            format!(r#"{{"name":"a.b","url":"{hook_url}","bindings":["x"]}}"#),
            400,
        ),
        (
            format!(r#"{{"name":"{name}","url":"{hook_url}","bindings":[]}}"#),
            400,
        ),
        (
            format!(r#"{{"name":"{name}","url":"{hook_url}","bindings":["a..b"]}}"#),
            400,
        ),
        (
            format!(
                r#"{{"name":"{name}","url":"{hook_url}","bindings":["x"],"retry":{{"max_attempts":0}}}}"#
            ),
            400,
        ),
        (
            format!(r#"{{"name":"{name}","url":"{hook_url}","bindings":["x"],"extra":1}}"#),
            422,
        ),
        ("{".to_owned(), 400),
    ] {
        let answer = register(body.clone()).await;
        assert_eq!(answer.status, status, "{body}: {}", answer.body);
    }
    assert_eq!(
        call(addr, "GET", "/api/v1/webhooks", Some(&reader), &[], b"")
            .await
            .json(),
        serde_json::json!([])
    );

    // Registered: the secret comes back once.
    let made = register(format!(
        r#"{{"name":"{name}","url":"{hook_url}","bindings":["order.*"],"retry":{{"max_attempts":3,"initial_delay_ms":100,"max_delay_ms":1000}}}}"#
    ))
    .await;
    assert_eq!(made.status, 201, "{}", made.body);
    let made = made.json();
    let secret = made["secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("whsec_"), "{made}");
    assert_eq!(made["queue"], queue.as_str());
    assert_eq!(register(body.clone()).await.status, 409);
    let listed = call(addr, "GET", "/api/v1/webhooks", Some(&reader), &[], b"").await;
    assert_eq!(listed.json()[0]["name"], name.as_str());
    assert!(!listed.body.contains(&secret), "the secret is never listed");
    // The webhook is a worker like any other.
    until(|| async {
        let workers = call(addr, "GET", "/api/v1/workers", Some(&reader), &[], b"")
            .await
            .json();
        workers["workers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["name"] == queue.as_str() && w["state"] == "consuming")
    })
    .await;

    // Three events: one answered 503 once, one 400, one 204.
    let bodies = [
        r#"{"order_id":1,"fail":"once","note":"caf\u00e9 ☕"}"#,
        r#"{"order_id":2,"fail":"always"}"#,
        r#"{"order_id":3}"#,
    ];
    let mut ids = HashMap::new();
    let publish = |body: &'static str| {
        let admin = admin.clone();
        async move {
            let path = "/api/v1/events/order.placed";
            let answer = call(addr, "POST", path, Some(&admin), &[], body.as_bytes()).await;
            assert_eq!(answer.status, 202, "{}", answer.body);
            answer
        }
    };
    for body in bodies {
        let answer = publish(body).await;
        let order = serde_json::from_str::<serde_json::Value>(body).unwrap()["order_id"]
            .as_u64()
            .unwrap();
        ids.insert(
            order,
            answer.json()["message_id"].as_str().unwrap().to_owned(),
        );
    }
    let mut got: Vec<Received> = Vec::new();
    while got.len() < 4 {
        let next = tokio::time::timeout(PATIENCE, requests.recv()).await;
        got.push(next.expect("the receiver is called").unwrap());
    }
    for r in &got {
        let order = r.order();
        assert_eq!(
            r.header("webhook-id"),
            ids[&order],
            "the message id is the webhook id"
        );
        assert_eq!(
            r.body.as_ref(),
            bodies[order as usize - 1].as_bytes(),
            "the exact bytes published"
        );
        let timestamp: u64 = r.header("webhook-timestamp").parse().unwrap();
        assert_eq!(
            r.header("webhook-signature"),
            signature(&secret, r.header("webhook-id"), timestamp, &r.body).unwrap(),
            "a valid signature"
        );
        assert_eq!(r.header("x-event-type"), "order.placed");
        assert_eq!(r.header("content-type"), "application/json");
    }
    let attempts: Vec<&str> = got
        .iter()
        .filter(|r| r.order() == 1)
        .map(|r| r.header("x-attempt"))
        .collect();
    assert_eq!(attempts, ["1", "2"], "the 503 was retried once");
    assert_eq!(
        got.iter().filter(|r| r.order() == 2).count(),
        1,
        "a 400 is not retried"
    );

    // The 400 is dead-lettered with its status and the answer's start.
    let dead = env.take(&format!("{queue}.dlq"), 1).await;
    assert_eq!(dead[0].message_id().as_deref(), Some(ids[&2].as_str()));
    let why = dead[0]
        .header_str(rabbitry::headers::EXCEPTION_MESSAGE)
        .unwrap();
    assert!(
        why.contains("HTTP 400") && why.contains("bad payload: no sku"),
        "{why}"
    );
    assert_eq!(
        dead[0]
            .header_int(rabbitry::headers::RETRY_COUNT)
            .unwrap_or(0),
        0,
        "dead-lettered at its first attempt, never retried"
    );

    // Deleted: it stops; deleting again is 404.
    let path = format!("/api/v1/webhooks/{name}");
    assert_eq!(
        call(addr, "DELETE", &path, Some(&admin), &[], b"")
            .await
            .status,
        204
    );
    assert_eq!(
        call(addr, "DELETE", &path, Some(&admin), &[], b"")
            .await
            .status,
        404
    );
    assert!(hooks.workers().await.unwrap().is_empty());

    // Its worker deleted with its queues, then the webhook made again under the name: it
    // starts afresh (not removed) and delivers.
    let answer = call(
        addr,
        "DELETE",
        &format!("/api/v1/workers/{queue}?delete_queues=true"),
        Some(&admin),
        &[],
        b"",
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert!(
        env.ready_or_none(&queue).await.is_none(),
        "its queue is gone"
    );
    let again = register(body.clone()).await;
    assert_eq!(again.status, 201, "{}", again.body);
    let secret = again.json()["secret"].as_str().unwrap().to_owned();
    publish(r#"{"order_id":4}"#).await;
    let fourth = tokio::time::timeout(PATIENCE, requests.recv())
        .await
        .expect("the webhook made again delivers")
        .unwrap();
    assert_eq!(fourth.order(), 4);
    let timestamp: u64 = fourth.header("webhook-timestamp").parse().unwrap();
    assert_eq!(
        fourth.header("webhook-signature"),
        signature(
            &secret,
            fourth.header("webhook-id"),
            timestamp,
            &fourth.body
        )
        .unwrap(),
        "signed with the new secret"
    );
    // Gone with every queue it declared (its default policy's retry tiers included).
    let answer = call(
        addr,
        "DELETE",
        &format!("/api/v1/workers/{queue}?delete_queues=true"),
        Some(&admin),
        &[],
        b"",
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let deleted = answer.json()["deleted_queues"].as_array().unwrap().len();
    assert!(
        deleted > 3,
        "the worker queue, its tiers, its DLQ, its record: {}",
        answer.body
    );

    let _ = stop.send(());
    server.await.unwrap().unwrap();
    hooks.shutdown().await;
    controller.close().await;
    db.done(store).await;
}

on_both_databases!(webhooks_are_signed_retried_dead_lettered_and_guarded);
