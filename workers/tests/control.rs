//! Workers controlled across processes through the HTTP API of `rabbitry serve`, on
//! RabbitMQ with the registry in the store (SQLite and PostgreSQL): two `email-worker`
//! processes stop consuming when the worker is paused and start again when resumed; a
//! binding added routes a new event type to them; and the registration outlives a restart
//! of `serve` and of both workers.

#[path = "../../tests/support/mod.rs"]
#[allow(unused_macros)]
mod support;
#[path = "../../store/tests/db/mod.rs"]
#[macro_use]
mod db;

use std::path::PathBuf;
use std::process::Stdio;

use db::Db;
use rabbitry::prelude::*;
use rabbitry_workers::email;
use serde_json::Value;
use support::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The `rabbitry` binary, built beside this package's binaries by `cargo test --workspace`.
fn rabbitry_binary() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_BIN_EXE_email-worker")).with_file_name("rabbitry");
    assert!(
        path.exists(),
        "{} is missing: build it first (cargo build -p rabbitry-cli), or run the whole \
         workspace's tests (scripts/test)",
        path.display()
    );
    path
}

struct Setup {
    store: String,
    exchange: String,
    prefix: String,
    reports: String,
}

impl Setup {
    fn command(&self, program: impl Into<PathBuf>) -> Command {
        let mut command = Command::new(program.into());
        command
            .env("AMQP_URL", url())
            .env("RABBITRY_STORE", &self.store)
            .env("RABBITRY_EXCHANGE", &self.exchange)
            .env("RABBITRY_QUEUE_PREFIX", &self.prefix)
            .env("RABBITRY_REPORTS_QUEUE", &self.reports)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .kill_on_drop(true);
        command
    }

    /// Start `program` with `args`; returns once it printed `ready`.
    async fn start(&self, program: impl Into<PathBuf>, args: &[&str]) -> Child {
        let mut child = self.command(program).args(args).spawn().expect("it starts");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let ready = tokio::time::timeout(PATIENCE, lines.next_line()).await;
        assert!(
            matches!(ready, Ok(Ok(Some(ref l))) if l == "ready"),
            "{ready:?}"
        );
        child
    }

    async fn worker(&self) -> Child {
        self.start(env!("CARGO_BIN_EXE_email-worker"), &[]).await
    }

    async fn serve(&self, addr: &str) -> Child {
        self.start(rabbitry_binary(), &["serve", "--http", addr])
            .await
    }
}

/// Stop a process gracefully (SIGTERM) and wait for it.
async fn stop(mut child: Child) {
    let pid = child.id().expect("running").to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    let exited = tokio::time::timeout(PATIENCE, child.wait()).await;
    assert!(matches!(exited, Ok(Ok(s)) if s.success()), "{exited:?}");
}

fn call(addr: &str, method: &str, path: &str, token: &str, body: &str) -> (u16, Value) {
    let raw = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer \
         {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let (status, body) = support::http::request(addr, &raw);
    (
        status,
        serde_json::from_str(&body).unwrap_or(Value::String(body)),
    )
}

/// The states `GET /api/v1/workers` shows for `worker`, one per process.
fn states(addr: &str, token: &str, worker: &str) -> Vec<String> {
    let (status, body) = call(addr, "GET", "/api/v1/workers", token, "");
    assert_eq!(status, 200, "{body}");
    body["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["name"] == worker)
        .map(|w| w["state"].as_str().unwrap().to_owned())
        .collect()
}

/// `POST /api/v1/workers/{worker}/{action}` with `body`: answered 200, and applied by both
/// processes. The change as answered.
async fn control(addr: &str, token: &str, worker: &str, action: &str, body: &str) -> Value {
    let path = format!("/api/v1/workers/{worker}/{action}");
    let (status, change) = call(addr, "POST", &path, token, body);
    assert_eq!(status, 200, "{change}");
    applied_by_both(addr, token, worker, &change).await;
    change
}

/// Wait until both processes announce the revision of `change` (the API's answer lists
/// who had within its few seconds; a loaded machine may take longer).
async fn applied_by_both(addr: &str, token: &str, worker: &str, change: &Value) {
    let revision = change["control"]["revision"].as_i64().unwrap();
    until(|| async {
        let (_, list) = call(addr, "GET", "/api/v1/workers", token, "");
        let revisions: Vec<i64> = list["workers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|w| w["name"] == worker)
            .map(|w| w["revision"].as_i64().unwrap())
            .collect();
        revisions.len() == 2 && revisions.iter().all(|r| *r >= revision)
    })
    .await;
}

async fn consumers(queue: &str) -> u32 {
    let publisher = Publisher::builder(url()).connect().await.unwrap();
    let depth = publisher
        .queue_depth(queue)
        .await
        .unwrap()
        .expect("the queue exists");
    publisher.close().await;
    depth.consumers
}

async fn paused_workers_stop_everywhere_and_the_registration_outlives_restarts(db: Db) {
    let env = TestEnv::rabbitmq("control_api");
    let prefix = format!("{}.", env.queue("c"));
    let queue = format!("{prefix}{}", email::QUEUE);
    let reports = env.queue("reports");
    let audit = format!("{}.audit", env.exchange);
    for q in [&queue, &reports, &audit] {
        env.track_names([
            q.as_str(),
            format!("{q}.dlq").as_str(),
            format!("{q}.topology").as_str(),
        ]);
    }
    let setup = Setup {
        store: db.url.clone(),
        exchange: env.exchange.clone(),
        prefix,
        reports,
    };
    let token = setup
        .command(rabbitry_binary())
        .args(["tokens", "create", "--scope", "admin"])
        .output()
        .await
        .unwrap();
    assert!(token.status.success(), "{token:?}");
    let token = String::from_utf8(token.stdout).unwrap().trim().to_owned();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let serve = setup.serve(&addr).await;
    let workers = [setup.worker().await, setup.worker().await];
    until(|| async { states(&addr, &token, &queue) == ["consuming", "consuming"] }).await;

    // Hostile and wrong requests change nothing.
    let (status, _) = call(
        &addr,
        "POST",
        &format!("/api/v1/workers/{queue}/pause"),
        "bad",
        "",
    );
    assert_eq!(status, 401);
    let bindings = format!("/api/v1/workers/{queue}/bindings");
    for (path, body, expected) in [
        ("/api/v1/workers/amq.x/pause", "", 400),
        (&*bindings, r#"{"pattern":"a..b"}"#, 400),
        (&*bindings, "{", 400),
        (&*bindings, r#"{"pattern":5}"#, 422),
        (&*bindings, r#"{"pattern":"a","extra":1}"#, 422),
    ] {
        let (status, answer) = call(&addr, "POST", path, &token, body);
        assert_eq!(status, expected, "{path} {body}: {answer}");
    }

    // Paused through the API: both processes stop consuming.
    let paused = control(&addr, &token, &queue, "pause", "").await;
    assert_eq!(paused["control"]["state"], "paused");
    assert_eq!(consumers(&queue).await, 0);
    assert_eq!(states(&addr, &token, &queue), ["paused", "paused"]);

    // Resumed: both consume again.
    control(&addr, &token, &queue, "resume", "").await;
    assert_eq!(consumers(&queue).await, 2);

    // A binding added routes a new event type to the running worker.
    let invoice = r#"{"order_id":9,"user_id":1,"total":3.5,"items":[]}"#;
    // Published before the binding: the audit takes it, the worker never sees it.
    let (status, early) = call(
        &addr,
        "POST",
        "/api/v1/events/invoice.issued",
        &token,
        invoice,
    );
    assert_eq!(status, 202, "{early}");
    control(
        &addr,
        &token,
        &queue,
        "bindings",
        r#"{"pattern":"invoice.#"}"#,
    )
    .await;
    let (status, answer) = call(
        &addr,
        "POST",
        "/api/v1/events/invoice.issued",
        &token,
        invoice,
    );
    assert_eq!(status, 202, "{answer}");
    let id = answer["message_id"].as_str().unwrap().to_owned();
    until(|| async {
        let (status, story) = call(&addr, "GET", &format!("/api/v1/events/{id}"), &token, "");
        status == 200
            && story["handlings"]
                .as_array()
                .is_some_and(|h| h.iter().any(|h| h["worker"] == queue.as_str()))
    })
    .await;
    let early = early["message_id"].as_str().unwrap();
    let path = format!("/api/v1/events/{early}");
    until(|| async { call(&addr, "GET", &path, &token, "").0 == 200 }).await;
    let (_, story) = call(&addr, "GET", &path, &token, "");
    assert_eq!(story["handlings"], serde_json::json!([]), "{story}");

    // Paused again, then everything restarts: the workers come up paused, and bound.
    control(&addr, &token, &queue, "pause", "").await;
    stop(serve).await;
    for worker in workers {
        stop(worker).await;
    }
    let workers = [setup.worker().await, setup.worker().await];
    let serve = setup.serve(&addr).await;
    until(|| async { states(&addr, &token, &queue) == ["paused", "paused"] }).await;
    assert_eq!(consumers(&queue).await, 0);
    let (status, answer) = call(
        &addr,
        "POST",
        "/api/v1/events/invoice.issued",
        &token,
        invoice,
    );
    assert_eq!(status, 202, "the binding outlived the restarts: {answer}");
    let (status, list) = call(&addr, "GET", "/api/v1/workers", &token, "");
    assert_eq!(status, 200);
    let registered = &list["registered"][0];
    assert_eq!(registered["worker"], queue.as_str());
    assert_eq!(registered["state"], "paused");
    assert_eq!(registered["bindings_added"][0], "invoice.#");

    // Removed with its queues: nobody consumes, the queues and their messages are gone.
    // 409 while a process has not stopped it yet (queues kept): asked again until done.
    let remove = async {
        loop {
            let path = format!("/api/v1/workers/{queue}?delete_queues=true");
            let (status, change) = call(&addr, "DELETE", &path, &token, "");
            match status {
                200 => break change,
                409 => tokio::task::yield_now().await,
                _ => panic!("{status}: {change}"),
            }
        }
    };
    let change = tokio::time::timeout(PATIENCE, remove)
        .await
        .expect("removed in time");
    let deleted: Vec<&str> = change["deleted_queues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["queue"].as_str().unwrap())
        .collect();
    assert!(deleted.contains(&queue.as_str()), "{change}");
    let main = change["deleted_queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["queue"] == queue.as_str())
        .unwrap();
    assert_eq!(
        main["messages"], 1,
        "the invoice published while paused: {change}"
    );
    assert_eq!(states(&addr, &token, &queue), ["removed", "removed"]);
    for worker in workers {
        stop(worker).await;
    }
    stop(serve).await;
}

on_both_databases!(paused_workers_stop_everywhere_and_the_registration_outlives_restarts);
