//! Control across processes, on RabbitMQ and on the in-memory broker: two runtimes running
//! one worker obey pause, resume and binding changes sent by a `Controller`, announce what
//! they applied, and a runtime that starts later comes up in the registered state.

#[macro_use]
mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use lapin::BasicProperties;
use rabbitry::control::{
    Control, ControlRegistry, Controller, DesiredState, RegistryError, WorkerControl,
};
use rabbitry::prelude::*;
use support::*;

/// A registry in memory, as a store would hold it.
#[derive(Clone, Default)]
struct Registry(Arc<Mutex<Vec<WorkerControl>>>);

impl ControlRegistry for Registry {
    fn controls(&self) -> BoxFuture<'_, Result<Vec<WorkerControl>, RegistryError>> {
        let controls = self.0.lock().unwrap().clone();
        Box::pin(async move { Ok(controls) })
    }
}

impl Registry {
    /// Record a change, with the next revision, and return it to send.
    fn change(&self, worker: &str, edit: impl FnOnce(&mut WorkerControl)) -> WorkerControl {
        let mut all = self.0.lock().unwrap();
        let mut control = all
            .iter()
            .find(|c| c.worker == worker)
            .cloned()
            .unwrap_or_else(|| WorkerControl::new(worker));
        edit(&mut control);
        control.revision += 1;
        all.retain(|c| c.worker != worker);
        all.push(control.clone());
        control
    }
}

/// Send `control` and wait until both processes running its worker applied it.
async fn apply(controller: &Controller, control: &WorkerControl) {
    controller.send(control).await.unwrap();
    let applied = controller
        .wait_applied(&control.worker, control.revision, PATIENCE)
        .await;
    assert_eq!(applied.applied.len(), 2, "{applied:?}");
    assert!(applied.pending.is_empty(), "{applied:?}");
}

fn states(controller: &Controller, worker: &str) -> Vec<String> {
    controller
        .workers()
        .into_iter()
        .filter(|w| w.report.name == worker)
        .map(|w| w.report.state)
        .collect()
}

async fn commands_reach_every_process_running_the_worker(env: TestEnv) {
    let queue = env.queue("controlled");
    let subscription = Subscription::new(&queue).bind("order.placed");
    let registry = Registry::default();
    let (probe_a, mut seen_a) = env.probe(subscription.clone(), |_| Ok(()));
    let (probe_b, mut seen_b) = env.probe(subscription.clone(), |_| Ok(()));
    // A heartbeat longer than the test: every announcement it sees is one made at once,
    // after a change, and a stopped process is forgotten only because it said so.
    let control = || {
        Control::new()
            .registry(registry.clone())
            .heartbeat(Duration::from_secs(600))
    };
    let a = env
        .builder()
        .worker(probe_a)
        .control(control())
        .start()
        .await
        .unwrap();
    let b = env
        .builder()
        .worker(probe_b)
        .control(control())
        .start()
        .await
        .unwrap();
    let controller = Controller::start(env.url()).await.unwrap();
    until(|| async { states(&controller, &queue) == ["consuming", "consuming"] }).await;
    let view = &controller
        .workers()
        .into_iter()
        .find(|w| w.report.name == queue)
        .unwrap();
    assert_eq!(view.report.bindings, ["order.placed"]);
    assert!(
        view.report.queues.contains(&format!("{queue}.dlq")),
        "{view:?}"
    );
    assert_eq!(view.pid, std::process::id());

    // Paused everywhere: a message waits in the queue.
    let pause = registry.change(&queue, |c| c.state = DesiredState::Paused);
    apply(&controller, &pause).await;
    assert_eq!(states(&controller, &queue), ["paused", "paused"]);
    for rt in [&a, &b] {
        let status = rt.workers().await.unwrap();
        assert!(status[0].paused && !status[0].consuming, "{status:?}");
    }
    let publisher = env.publisher().await;
    publisher.publish(&order(1)).await.unwrap();
    assert_eq!(env.ready(&queue).await, 1, "nobody consumes while paused");
    // An old revision changes nothing: sent before a newer one that keeps it paused, it
    // was dealt with (commands are applied in order) by the time the newer one is applied.
    let mut stale = pause.clone();
    stale.state = DesiredState::Running;
    controller.send(&stale).await.unwrap();
    let still = registry.change(&queue, |c| c.state = DesiredState::Paused);
    apply(&controller, &still).await;
    assert_eq!(states(&controller, &queue), ["paused", "paused"]);
    assert_eq!(env.ready(&queue).await, 1, "still nobody consumes");

    // Resumed: one of them handles it.
    let resume = registry.change(&queue, |c| c.state = DesiredState::Running);
    apply(&controller, &resume).await;
    let first = tokio::select! {
        s = seen_a.next() => s,
        s = seen_b.next() => s,
    };
    assert_eq!(first.order_id(), 1);

    // A binding added routes a new event type to the running worker; one taken away
    // routes nothing more.
    let bind = registry.change(&queue, |c| {
        c.bind("invoice.#");
        c.unbind("order.placed");
    });
    apply(&controller, &bind).await;
    let routed = env
        .publish_raw(
            &env.exchange,
            "invoice.issued",
            br#"{"invoice": 7}"#,
            BasicProperties::default(),
        )
        .await;
    assert_eq!(routed, 1);
    let invoice = tokio::select! {
        s = seen_a.next() => s,
        s = seen_b.next() => s,
    };
    assert_eq!(invoice.routing_key, "invoice.issued");
    let unroutable = publisher.publish(&order(2)).await;
    assert!(
        matches!(unroutable, Err(rabbitry::Error::Unroutable { .. })),
        "{unroutable:?}"
    );
    let view = &controller
        .workers()
        .into_iter()
        .find(|w| w.report.name == queue)
        .unwrap();
    assert_eq!(view.report.bindings, ["invoice.#"]);
    assert_eq!(view.report.revision, bind.revision);

    // A process that starts later comes up in the registered state: paused, with the
    // registered bindings.
    let pause = registry.change(&queue, |c| c.state = DesiredState::Paused);
    apply(&controller, &pause).await;
    b.shutdown().await;
    let (probe_c, _seen_c) = env.probe(subscription.clone(), |_| Ok(()));
    let c = env
        .builder()
        .worker(probe_c)
        .control(control())
        .start()
        .await
        .unwrap();
    let status = c.workers().await.unwrap();
    assert!(status[0].paused && !status[0].consuming, "{status:?}");
    assert_eq!(status[0].bindings, ["invoice.#"]);
    until(|| async { states(&controller, &queue) == ["paused", "paused"] }).await;
    assert!(
        matches!(
            publisher.publish(&order(3)).await,
            Err(rabbitry::Error::Unroutable { .. })
        ),
        "the restarted process did not bind order.placed again"
    );

    // Removed: not consuming, and a process that starts later does not declare it.
    let remove = registry.change(&queue, |c| c.state = DesiredState::Removed);
    apply(&controller, &remove).await;
    assert_eq!(states(&controller, &queue), ["removed", "removed"]);
    let deleted = controller
        .delete_queues(&[queue.clone(), format!("{queue}.dlq")])
        .await
        .unwrap();
    assert_eq!(deleted.len(), 2);
    c.shutdown().await;
    let (probe_d, _seen_d) = env.probe(subscription, |_| Ok(()));
    let d = env
        .builder()
        .worker(probe_d)
        .control(control())
        .start()
        .await
        .unwrap();
    assert!(d.workers().await.unwrap()[0].paused);
    assert!(
        env.ready_or_none(&queue).await.is_none(),
        "a removed worker's queue is not declared again"
    );
    for rt in [a, d] {
        rt.shutdown().await;
    }
    // Stopped processes say so: the controller forgets them at once.
    until(|| async { states(&controller, &queue).is_empty() }).await;
    controller.close().await;
}

async fn a_malformed_command_is_ignored(env: TestEnv) {
    let queue = env.queue("sturdy");
    let (probe, mut seen) = env.probe(Subscription::new(&queue).bind("order.placed"), |_| Ok(()));
    let rt = env
        .builder()
        .worker(probe)
        .control(Control::new().heartbeat(Duration::from_secs(600)))
        .start()
        .await
        .unwrap();
    let controller = Controller::start(env.url()).await.unwrap();
    until(|| async { states(&controller, &queue) == ["consuming"] }).await;
    let long = format!(
        r#"{{"worker":"{queue}","state":"running","bindings_added":["{}"],"revision":7}}"#,
        "a".repeat(300)
    );
    let removal_at_zero = format!(r#"{{"worker":"{queue}","state":"removed","revision":0}}"#);
    let forever = format!(r#"{{"worker":"{queue}","state":"paused","revision":"9"}}"#);
    for body in [
        &b"not json"[..],
        br#"{"worker": 5}"#,
        &[0xff; 70_000][..],
        long.as_bytes(),
        removal_at_zero.as_bytes(),
        forever.as_bytes(),
    ] {
        env.publish_raw(
            rabbitry::control::CONTROL_EXCHANGE,
            &format!("command.{queue}"),
            body,
            BasicProperties::default(),
        )
        .await;
    }
    // Sent after them, a valid command is applied: the bad ones took nothing down.
    let mut pause = WorkerControl::new(&queue);
    pause.state = DesiredState::Paused;
    pause.revision = 1;
    controller.send(&pause).await.unwrap();
    let applied = controller.wait_applied(&queue, 1, PATIENCE).await;
    assert_eq!(applied.applied.len(), 1, "{applied:?}");
    assert_eq!(states(&controller, &queue), ["paused"]);
    let mut resume = pause.clone();
    resume.state = DesiredState::Running;
    resume.revision = 2;
    controller.send(&resume).await.unwrap();
    controller.wait_applied(&queue, 2, PATIENCE).await;
    let publisher = env.publisher().await;
    publisher.publish(&order(5)).await.unwrap();
    assert_eq!(seen.next().await.order_id(), 5);
    assert_eq!(states(&controller, &queue), ["consuming"]);
    rt.shutdown().await;
    controller.close().await;
}

on_both_brokers!(
    commands_reach_every_process_running_the_worker,
    a_malformed_command_is_ignored,
);
