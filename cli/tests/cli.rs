//! The `rabbitry` binary against RabbitMQ and a store (SQLite and PostgreSQL): publish (with its exit codes),
//! serve (the keeper), events and event, and the dead-letter round trip — list, show,
//! redrive to the failing worker only with a fresh retry budget, purge.

#[path = "../../tests/support/mod.rs"]
#[allow(unused_macros)]
mod support;
#[path = "../../store/tests/db/mod.rs"]
#[macro_use]
mod db;

use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use db::Db;
use rabbitry::prelude::*;
use rabbitry::{Registration, RetryPolicy, Topology};
use rabbitry_store::{DeadLetterState, EventFilter, Store};
use support::*;

/// The binary with this test's broker, store, exchange and reports queue.
struct Cli {
    store: String,
    exchange: String,
    reports: String,
}

impl Cli {
    fn new(env: &TestEnv, db: &Db) -> Cli {
        // The queues `serve` declares, and the audit queue `publish` may leave.
        let (reports, audit) = (env.queue("reports"), format!("{}.audit", env.exchange));
        for queue in [&reports, &audit] {
            env.track_names([
                queue.as_str(),
                format!("{queue}.dlq").as_str(),
                format!("{queue}.topology").as_str(),
            ]);
        }
        Cli {
            store: db.url.clone(),
            exchange: env.exchange.clone(),
            reports,
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_rabbitry"));
        command
            .args(args)
            .env("AMQP_URL", support::url())
            .env("RABBITRY_STORE", &self.store)
            .env("RABBITRY_EXCHANGE", &self.exchange)
            .env("RABBITRY_REPORTS_QUEUE", &self.reports);
        command
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("rabbitry runs")
    }

    /// Run; assert it succeeded; its standard output.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "rabbitry {args:?}: {:?}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        serde_json::from_str(&self.ok(args)).expect("JSON output")
    }

    /// `rabbitry serve` in the background, once it says it is ready.
    fn serve(&self, args: &[&str]) -> Served {
        let mut all = vec!["serve"];
        all.extend_from_slice(args);
        let mut child = self
            .command(&all)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        use std::io::BufRead;
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready");
        Served(child)
    }
}

/// A `rabbitry serve` process, stopped with SIGTERM when dropped.
struct Served(Child);

impl Drop for Served {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_answers_with_exit_codes() {
    let env = TestEnv::rabbitmq("cli_publish");
    let db = Db::sqlite("cli_publish").await;
    let cli = Cli::new(&env, &db);
    Topology::new(&env.exchange, std::iter::empty::<&Subscription>())
        .declare(&support::url())
        .await
        .unwrap();
    let bad = cli.run(&["publish", "order.placed", "{not json"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not JSON"));
    let unroutable = cli.run(&["publish", "nobody.listens", r#"{"id":1}"#]);
    assert_eq!(unroutable.status.code(), Some(3), "{unroutable:?}");
    let down = cli
        .command(&["publish", "x", "{}"])
        .env("AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f")
        .output()
        .unwrap();
    assert_eq!(down.status.code(), Some(4), "{down:?}");
    let missing = cli.run(&["event", "nope"]);
    assert_eq!(missing.status.code(), Some(6));
    let usage = cli.run(&["dlq", "redrive", "w"]);
    assert_eq!(usage.status.code(), Some(2), "--id or --all is required");
}

async fn dead_letters_are_listed_redriven_to_the_failing_worker_and_purged(db: Db) {
    let env = TestEnv::rabbitmq("cli_dlq");
    let cli = Cli::new(&env, &db);
    let (inventory, email) = (env.queue("inventory"), env.queue("email"));
    let fixed = Arc::new(AtomicBool::new(false));
    let fix = fixed.clone();
    let (inventory_probe, mut inventory_seen) = env.probe(
        Subscription::new(&inventory).bind("order.placed"),
        move |seen| match fix.load(Ordering::SeqCst) || seen.body["id"] == 99 {
            true if seen.body["id"] != 99 => Ok(()),
            _ => Err(Failure::reject("stock record missing")),
        },
    );
    let (email_probe, mut email_seen) =
        env.probe(Subscription::new(&email).bind("order.placed"), |_| Ok(()));
    let workers = env
        .builder()
        .worker(Registration::new(inventory_probe))
        .worker(email_probe)
        .start()
        .await
        .unwrap();
    env.track_names([format!("{inventory}.dlq.dlq").as_str()]);
    let _serve = cli.serve(&["--dlq", &inventory]);

    let mut ids = Vec::new();
    for id in [1, 2, 3, 99] {
        let out = cli.ok(&[
            "publish",
            "order.placed",
            &format!(r#"{{"id":{id}}}"#),
            "--correlation-id",
            "batch-7",
        ]);
        ids.push(out.trim().to_owned());
    }
    let store = Store::connect(&cli.store).await.unwrap();
    until(|| async { store.dead_letters(None, None, None).await.unwrap().len() == 4 }).await;
    assert_eq!(email_seen.take(4).await.len(), 4);

    let listed = cli.json(&["dlq", "list", &inventory, "--json"]);
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 4);
    assert_eq!(listed[0]["reason"], "stock record missing");
    assert_eq!(listed[0]["kind"], "rejected");
    let first = listed[0]["seq"].as_i64().unwrap();
    let shown = cli.ok(&["dlq", "show", &first.to_string()]);
    assert!(
        shown.contains("stock record missing") && shown.contains("x-retry-count"),
        "{shown}"
    );
    // The audit is kept by its own worker, in its own batches: wait for it too.
    let audited = EventFilter::new().correlation_id("batch-7");
    until(|| async { store.count_events(&audited).await.unwrap() == 4 }).await;
    let events = cli.json(&["events", "--correlation-id", "batch-7", "--json"]);
    assert_eq!(events.as_array().unwrap().len(), 4, "audited");

    // The stock records are back: redrive orders 1..3, purge 99.
    fixed.store(true, Ordering::SeqCst);
    let last = listed[3]["seq"].as_i64().unwrap();
    let dry = cli.ok(&[
        "dlq",
        "redrive",
        &inventory,
        "--id",
        &first.to_string(),
        "--dry-run",
    ]);
    assert!(dry.contains("1 dead letter(s) would be redriven"), "{dry}");
    let purged = cli.ok(&["dlq", "purge", &inventory, "--id", &last.to_string()]);
    assert!(purged.contains("1 dead letter(s)"), "{purged}");
    let redriven = cli.ok(&["dlq", "redrive", &inventory, "--all"]);
    assert!(redriven.contains("3 dead letter(s) redriven"), "{redriven}");

    // Seen again by the failing worker only, with its whole retry budget.
    let mut again = Vec::new();
    while again.len() < 3 {
        let seen = inventory_seen.next().await;
        if seen.body["id"] != 99 && ids.contains(&seen.message_id) && fixed.load(Ordering::SeqCst) {
            again.push(seen);
        }
    }
    let redelivered: Vec<&Seen> = again.iter().filter(|s| s.attempt == 1).collect();
    assert_eq!(redelivered.len(), 3, "a fresh retry budget: attempt 1");
    let states = store
        .dead_letters(Some(&inventory), None, None)
        .await
        .unwrap();
    let count = |s: DeadLetterState| states.iter().filter(|d| d.state == s).count();
    assert_eq!(
        (
            count(DeadLetterState::Redriven),
            count(DeadLetterState::Purged)
        ),
        (3, 1)
    );
    let again = cli.run(&["dlq", "redrive", &inventory, "--id", &first.to_string()]);
    assert_eq!(
        again.status.code(),
        Some(2),
        "a redriven dead letter is not redriven twice"
    );
    assert!(
        email_seen.try_next().is_none(),
        "the other worker did not see the redriven copies"
    );
    store.close().await;
    workers.shutdown().await;
}

async fn replay_goes_to_one_worker_or_to_every_subscriber_and_is_not_audited_twice(db: Db) {
    let env = TestEnv::rabbitmq("cli_replay");
    let cli = Cli::new(&env, &db);
    let (billing, shipping) = (env.queue("billing"), env.queue("shipping"));
    let (billing_probe, mut billing_seen) =
        env.probe(Subscription::new(&billing).bind("order.*"), |_| Ok(()));
    let (shipping_probe, mut shipping_seen) =
        env.probe(Subscription::new(&shipping).bind("order.*"), |_| Ok(()));
    let workers = env
        .builder()
        .worker(billing_probe)
        .worker(shipping_probe)
        .start()
        .await
        .unwrap();
    let _serve = cli.serve(&[]);
    let first = cli.ok(&["publish", "order.placed", r#"{"id":1}"#]);
    cli.ok(&["publish", "order.paid", r#"{"id":1}"#]);
    let store = Store::connect(&cli.store).await.unwrap();
    let all = rabbitry_store::EventFilter::new();
    until(|| async { store.events(&all).await.unwrap().len() == 2 }).await;
    assert_eq!(billing_seen.take(2).await.len(), 2);
    assert_eq!(shipping_seen.take(2).await.len(), 2);

    let dry = cli.ok(&[
        "replay",
        "--type",
        "order.placed",
        "--to-worker",
        &billing,
        "--dry-run",
    ]);
    assert!(dry.contains("1 event(s) would be replayed"), "{dry}");
    let limited = cli.run(&[
        "replay",
        "--to-worker",
        &billing,
        "--limit",
        "1",
        "--dry-run",
    ]);
    assert!(limited.status.success());
    let note = String::from_utf8_lossy(&limited.stderr);
    assert!(
        note.contains("2 events match; only the latest 1 are replayed"),
        "a truncated replay says so: {note}"
    );
    let out = cli.ok(&["replay", "--type", "order.placed", "--to-worker", &billing]);
    assert!(out.contains("1 event(s) replayed"), "{out}");
    let replayed = billing_seen.next().await;
    assert_eq!(replayed.body["id"], 1);
    assert_ne!(replayed.message_id, first.trim(), "a new message id");

    let out = cli.ok(&["replay", "--type", "order.paid", "--to-exchange"]);
    assert!(out.contains("1 event(s) replayed"), "{out}");
    assert_eq!(billing_seen.next().await.routing_key, "order.paid");
    assert_eq!(shipping_seen.next().await.routing_key, "order.paid");
    assert!(
        shipping_seen.try_next().is_none(),
        "the worker replay reached billing only"
    );
    let missing = cli.run(&["replay", "--to-worker", "no.such.queue"]);
    assert_eq!(missing.status.code(), Some(3), "unroutable: {missing:?}");
    let usage = cli.run(&["replay", "--type", "x"]);
    assert_eq!(
        usage.status.code(),
        Some(2),
        "--to-worker or --to-exchange is required"
    );
    // A later event, audited after the replayed copy went past the keeper (one queue, batches
    // committed in order): the copy would be in the store by then if it were audited.
    cli.ok(&["publish", "order.shipped", r#"{"id":1}"#]);
    until(|| async { store.events(&all).await.unwrap().len() >= 3 }).await;
    let types: Vec<String> = store
        .events(&all)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.event_type)
        .collect();
    assert_eq!(
        types,
        ["order.placed", "order.paid", "order.shipped"],
        "replays are not audited"
    );
    store.close().await;
    workers.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_store_dlq_counts_and_redrives_broker_side() {
    let env = TestEnv::rabbitmq("cli_broker_dlq");
    let db = Db::sqlite("cli_broker_dlq").await;
    let mut cli = Cli::new(&env, &db);
    // No store is opened on this path: an unreachable one proves it.
    cli.store = "postgres://nobody@127.0.0.1:1/none".into();
    let queue = env.queue("inventory");
    let fixed = Arc::new(AtomicBool::new(false));
    let fix = fixed.clone();
    let (probe, mut seen) =
        env.probe(
            Subscription::new(&queue).bind("order.placed"),
            move |_| match fix.load(Ordering::SeqCst) {
                true => Ok(()),
                false => Err(Failure::reject("stock record missing")),
            },
        );
    let rt = env.builder().worker(probe).start().await.unwrap();
    for id in [1, 2] {
        cli.ok(&["publish", "order.placed", &format!(r#"{{"id":{id}}}"#)]);
    }
    let dlq = format!("{queue}.dlq");
    until(|| async { env.ready(&dlq).await == 2 }).await;
    assert_eq!(seen.take(2).await.len(), 2);

    let counted = cli.ok(&["dlq", "list", "--broker", &queue]);
    assert!(counted.contains("2 message(s)"), "{counted}");
    let counted = cli.json(&["dlq", "list", "--broker", &queue, "--json"]);
    assert_eq!(counted[0]["ready"], 2);
    let dry = cli.ok(&["dlq", "redrive", &queue, "--all", "--broker", "--dry-run"]);
    assert!(dry.contains("2 message(s)"), "{dry}");
    assert_eq!(env.ready(&dlq).await, 2, "a dry run moves nothing");

    fixed.store(true, Ordering::SeqCst);
    let moved = cli.ok(&["dlq", "redrive", &queue, "--all", "--broker"]);
    assert!(moved.contains("2 message(s) redriven"), "{moved}");
    let again = seen.take(2).await;
    assert!(again.iter().all(|s| s.attempt == 1), "a fresh retry budget");
    assert_eq!(env.ready(&dlq).await, 0, "moved, not copied");

    let missing = cli.run(&["dlq", "redrive", "no.such.worker", "--all", "--broker"]);
    assert_eq!(missing.status.code(), Some(6), "{missing:?}");
    let by_id = cli.run(&["dlq", "redrive", &queue, "--id", "1", "--broker"]);
    assert_eq!(
        by_id.status.code(),
        Some(2),
        "broker-side redrive is --all only"
    );
    rt.shutdown().await;
}

/// "What happened to order 42?": `rabbitry event` shows the event and every handling of it —
/// a fan-out to three workers, one of which retried it once.
async fn event_tells_what_every_worker_did_with_a_message(db: Db) {
    let env = TestEnv::rabbitmq("cli_event");
    let cli = Cli::new(&env, &db);
    let (email, inventory, shipping) = (
        env.queue("email"),
        env.queue("inventory"),
        env.queue("shipping"),
    );
    let (email_probe, _e) = env.probe(Subscription::new(&email).bind("order.placed"), |_| Ok(()));
    let retry = RetryPolicy::exponential(Duration::from_millis(50)).max_attempts(3);
    let inventory_sub = Subscription::new(&inventory)
        .bind("order.placed")
        .retry(retry);
    let (inventory_probe, _i) = env.probe(inventory_sub, |seen| match seen.attempt {
        1 => Err(Failure::retry("stock service away")),
        _ => Ok(()),
    });
    let (shipping_probe, _s) =
        env.probe(
            Subscription::new(&shipping).bind("order.placed"),
            |_| Ok(()),
        );
    let reports = rabbitry_observe::HandlingReports::start(&support::url()).unwrap();
    let workers = env
        .builder()
        .observer(reports.clone())
        .worker(email_probe)
        .worker(inventory_probe)
        .worker(shipping_probe)
        .start()
        .await
        .unwrap();
    let _serve = cli.serve(&[]);
    let published = cli.ok(&[
        "publish",
        "order.placed",
        r#"{"id":42}"#,
        "--correlation-id",
        "order-42",
    ]);
    let id = published.trim();

    let told = || {
        let out = cli.run(&["event", id, "--json"]);
        match out.status.success() {
            true => serde_json::from_slice::<serde_json::Value>(&out.stdout).ok(),
            false => None,
        }
    };
    until(|| async {
        told().is_some_and(|t| t["handlings"].as_array().is_some_and(|h| h.len() >= 4))
    })
    .await;
    let told = told().unwrap();
    assert_eq!(told["event"]["message_id"], id);
    let mut story: Vec<(String, u64, String)> = told["handlings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["worker"].as_str().unwrap().to_owned(),
                h["attempt"].as_u64().unwrap(),
                h["outcome"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    story.sort();
    let step = |w: &str, a: u64, o: &str| (w.to_owned(), a, o.to_owned());
    assert_eq!(
        story,
        [
            step(&email, 1, "handled"),
            step(&inventory, 1, "retried"),
            step(&inventory, 2, "handled"),
            step(&shipping, 1, "handled"),
        ]
    );
    let text = cli.ok(&["event", id]);
    assert!(
        text.contains("order-42") && text.contains(r#"{"id":42}"#),
        "{text}"
    );
    assert!(
        text.contains("stock service away"),
        "the retry's reason: {text}"
    );
    reports.close().await;
    workers.shutdown().await;
}

async fn schedules_are_kept_fired_by_serve_and_removed(db: Db) {
    let env = TestEnv::rabbitmq("cli_schedules");
    let cli = Cli::new(&env, &db);
    let name = "clock";
    env.track_names([rabbitry::Scheduler::token_queue(&env.exchange, name).as_str()]);
    let added = cli.ok(&[
        "schedules",
        "add",
        name,
        "* * * * * *",
        "clock.tick",
        r#"{"from":"cli"}"#,
    ]);
    assert!(
        added.contains("schedule clock added; next tick 20"),
        "{added}"
    );
    for (args, code) in [
        (
            vec!["schedules", "add", name, "* * * * * *", "clock.tick", "{}"],
            2,
        ),
        (
            vec![
                "schedules",
                "add",
                "other",
                "61 * * * *",
                "clock.tick",
                "{}",
            ],
            2,
        ),
        (
            vec![
                "schedules",
                "add",
                "other",
                "* * * * *",
                "clock.tick",
                "{oops",
            ],
            2,
        ),
        (
            vec![
                "schedules",
                "add",
                "other",
                "* * * * *",
                "clock.tick",
                "{}",
                "--time-zone",
                "Moon/Base",
            ],
            2,
        ),
        (vec!["schedules", "remove", "nothing"], 6),
    ] {
        let out = cli.run(&args);
        assert_eq!(
            out.status.code(),
            Some(code),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let listed = cli.json(&["schedules", "list", "--json"]);
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["pattern"], "* * * * * *");
    assert_eq!(listed[0]["body"]["from"], "cli");

    let (probe, mut seen) = env.probe(
        Subscription::new(env.queue("clock")).bind("clock.tick"),
        |_| Ok(()),
    );
    let workers = env.builder().worker(probe).start().await.unwrap();
    let served = cli.serve(&[]);
    let ticks = seen.take(2).await;
    assert!(
        ticks
            .iter()
            .all(|t| t.body["from"] == "cli" && t.event_type == "clock.tick")
    );
    assert_ne!(ticks[0].message_id, ticks[1].message_id);
    assert_eq!(
        cli.ok(&["schedules", "remove", name]).trim(),
        "schedule clock removed"
    );
    assert!(
        cli.json(&["schedules", "list", "--json"])
            .as_array()
            .unwrap()
            .is_empty()
    );
    // serve notices (it reloads every 5 s) and stops competing for the schedule: nobody
    // can fire it any more.
    let publisher = env.publisher().await;
    let token = rabbitry::Scheduler::token_queue(&env.exchange, name);
    until(|| async {
        let depth = publisher.queue_depth(&token).await.unwrap();
        depth.is_some_and(|d| d.consumers == 0)
    })
    .await;
    drop(served);
    workers.shutdown().await;
}

async fn sagas_are_listed_by_state_and_shown(db: Db) {
    use rabbitry::{SagaRecord, SagaRepository};
    let env = TestEnv::rabbitmq("cli_sagas");
    let cli = Cli::new(&env, &db);
    let store = Store::connect(&cli.store).await.unwrap();
    let repo = rabbitry_store::SagaStore::new(store.clone());
    for (key, status, done) in [("1001", "confirmed", true), ("1002", "compensating", false)] {
        let mut r = SagaRecord::new(key);
        r.version = 1;
        r.status = status.into();
        r.completed = done;
        r.state = serde_json::json!({"order_id": key.parse::<u64>().unwrap()});
        assert!(repo.save("orders.fulfilment", &r).await.unwrap());
    }
    let all = cli.json(&["sagas", "list", "--json"]);
    assert_eq!(all.as_array().unwrap().len(), 2);
    let compensating = cli.json(&["sagas", "list", "--state", "compensating", "--json"]);
    assert_eq!(compensating.as_array().unwrap().len(), 1);
    assert_eq!(compensating[0]["key"], "1002");
    let table = cli.ok(&["sagas", "list", "--saga", "orders.fulfilment"]);
    assert!(
        table.contains("1001") && table.contains("confirmed"),
        "{table}"
    );
    let shown = cli.json(&["sagas", "show", "1001", "--json"]);
    assert_eq!(shown[0]["state"]["order_id"], 1001);
    assert_eq!(shown[0]["completed"], true);
    let text = cli.ok(&["sagas", "show", "1002"]);
    assert!(text.contains("status compensating; version 1"), "{text}");
    assert_eq!(cli.run(&["sagas", "show", "9999"]).status.code(), Some(6));
    store.close().await;
}

async fn tokens_are_made_used_over_http_and_revoked(db: Db) {
    let env = TestEnv::rabbitmq("cli_tokens");
    let cli = Cli::new(&env, &db);
    let orders = Subscription::new(env.queue("orders")).bind("order.*");
    env.track(&orders);
    Topology::new(&env.exchange, [&orders])
        .declare(&support::url())
        .await
        .unwrap();
    for (args, code) in [
        (vec!["tokens", "create", "--scope", "root"], 2),
        (
            vec!["tokens", "create", "--scope", "read", "--rate", "0/s"],
            2,
        ),
        (
            vec!["tokens", "create", "--scope", "read", "--expires", "soon"],
            2,
        ),
        (vec!["tokens", "revoke", "nope"], 6),
    ] {
        let out = cli.run(&args);
        assert_eq!(
            out.status.code(),
            Some(code),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let secret = cli.ok(&[
        "tokens",
        "create",
        "--scope",
        "publish:order.*",
        "--rate",
        "100/s",
        "--expires",
        "1h",
        "--name",
        "shop",
    ]);
    let secret = secret.trim().to_owned();
    assert!(secret.starts_with("rbt_"), "{secret}");
    let listed = cli.json(&["tokens", "list", "--json"]);
    assert_eq!(listed[0]["name"], "shop");
    assert_eq!(listed[0]["scopes"][0], "publish:order.*");
    assert_eq!(listed[0]["rate_per_second"], 100);
    assert!(
        !listed.to_string().contains(&secret),
        "the secret is never listed"
    );
    let id = listed[0]["id"].as_str().unwrap().to_owned();

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = busy.local_addr().unwrap().to_string();
    assert_eq!(
        cli.run(&["serve", "--http", &taken]).status.code(),
        Some(2),
        "a busy port"
    );
    let _served = cli.serve(&["--http", &addr]);
    let publish = |token: &str| {
        let body = r#"{"order_id":5}"#;
        format!(
            "POST /api/v1/events/order.placed HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
             Authorization: Bearer {token}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let (status, body) = support::http::request(addr.as_str(), &publish(&secret));
    assert_eq!(status, 202, "{body}");
    assert_eq!(env.take(&env.queue("orders"), 1).await.len(), 1);
    // The keeper's metrics, unauthenticated as scrape targets are: its audit worker took
    // the event.
    until(|| {
        let addr = addr.clone();
        async move {
            let (status, body) = support::http::get(addr.as_str(), "/metrics");
            status == 200 && body.contains("rabbitry_deliveries_total")
        }
    })
    .await;
    assert_eq!(
        cli.ok(&["tokens", "revoke", &id]).trim(),
        format!("token {id} revoked")
    );
    // Revoked by another process: refused within the API's one second of trust.
    until(|| {
        let request = publish(&secret);
        let addr = addr.clone();
        async move { support::http::request(addr.as_str(), &request).0 == 401 }
    })
    .await;
}

on_both_databases!(
    tokens_are_made_used_over_http_and_revoked,
    schedules_are_kept_fired_by_serve_and_removed,
    sagas_are_listed_by_state_and_shown,
    event_tells_what_every_worker_did_with_a_message,
    dead_letters_are_listed_redriven_to_the_failing_worker_and_purged,
    replay_goes_to_one_worker_or_to_every_subscriber_and_is_not_audited_twice,
);
