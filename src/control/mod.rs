//! Control across processes: every runtime that opts in announces its workers on the
//! broker and obeys pause, resume, removal and binding changes sent to all of them.
//!
//! Protocol, on one durable topic exchange, [`CONTROL_EXCHANGE`]:
//!
//! - each controlled runtime has a queue `rabbitry.control.<process>` bound to `command.#`
//!   (the broker deletes it a minute after its process is gone); a command is a
//!   [`WorkerControl`] — the *desired state* of one worker, with a revision — sent with
//!   routing key `command.<worker>`. A runtime applies a revision newer than the one it
//!   holds and ignores the rest, so commands are idempotent and order-safe;
//! - each runtime publishes a [`ProcessStatus`] with routing key `status.<process>` at
//!   once, after every change it applies, every heartbeat, and (marked `gone`) when it
//!   stops. A [`Controller`] (what `rabbitry serve` runs) collects them.
//!
//! Desired states are kept by a [`ControlRegistry`] (the store implements it): a runtime
//! reads it before it starts a worker and again after every reconnection, so a process
//! that starts, restarts, or missed commands while disconnected comes up in the
//! registered state.

mod agent;
mod controller;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::observe::{Handling, Lifecycle, Observer, Received, Settled};

pub(crate) use agent::Agent;
pub use controller::{Applied, Controller, WorkerView};

/// The exchange that carries commands and statuses (topic, durable).
pub const CONTROL_EXCHANGE: &str = "rabbitry.control";

/// The error a [`ControlRegistry`] returns.
pub type RegistryError = Box<dyn std::error::Error + Send + Sync>;

/// What a worker should be doing, in every process that runs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DesiredState {
    /// Consuming (the default).
    Running,
    /// Not consuming; its topology is declared and messages wait in its queue.
    Paused,
    /// Not consuming and not declared: a process that starts does not recreate its queues.
    Removed,
}

impl DesiredState {
    /// `running`, `paused` or `removed`.
    pub fn as_str(self) -> &'static str {
        match self {
            DesiredState::Running => "running",
            DesiredState::Paused => "paused",
            DesiredState::Removed => "removed",
        }
    }
}

/// The registered state of one worker: what every process running it applies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerControl {
    /// The worker's name (its queue).
    pub worker: String,
    /// Running, paused or removed.
    pub state: DesiredState,
    /// Binding patterns added to the worker's own.
    #[serde(default)]
    pub bindings_added: Vec<String>,
    /// Binding patterns taken away, the worker's own included.
    #[serde(default)]
    pub bindings_removed: Vec<String>,
    /// Grows with every change; a process applies only a newer revision than it holds.
    pub revision: i64,
}

impl WorkerControl {
    /// A running worker with nothing changed, at revision 0.
    pub fn new(worker: impl Into<String>) -> WorkerControl {
        WorkerControl {
            worker: worker.into(),
            state: DesiredState::Running,
            bindings_added: Vec::new(),
            bindings_removed: Vec::new(),
            revision: 0,
        }
    }

    /// Add a binding pattern (and stop removing it).
    pub fn bind(&mut self, pattern: &str) {
        self.bindings_removed.retain(|p| p != pattern);
        if !self.bindings_added.iter().any(|p| p == pattern) {
            self.bindings_added.push(pattern.to_owned());
        }
    }

    /// Remove a binding pattern, whether the worker's code or an earlier
    /// [`bind`](WorkerControl::bind) added it.
    pub fn unbind(&mut self, pattern: &str) {
        self.bindings_added.retain(|p| p != pattern);
        if !self.bindings_removed.iter().any(|p| p == pattern) {
            self.bindings_removed.push(pattern.to_owned());
        }
    }

    /// The patterns a worker declaring `own` ends up bound with.
    pub fn effective_bindings(&self, own: &[String]) -> Vec<String> {
        let mut bindings: Vec<String> = own
            .iter()
            .chain(&self.bindings_added)
            .filter(|p| !self.bindings_removed.contains(p))
            .cloned()
            .collect();
        let mut seen = std::collections::HashSet::new();
        bindings.retain(|p| seen.insert(p.clone()));
        bindings
    }
}

/// Where the registered states are kept (implemented by `rabbitry_store::Store`).
pub trait ControlRegistry: Send + Sync + 'static {
    /// Every registered worker state.
    fn controls(&self) -> BoxFuture<'_, Result<Vec<WorkerControl>, RegistryError>>;
}

/// Turns on control across processes for a runtime: see the [module](self) and
/// [`RuntimeBuilder::control`](crate::RuntimeBuilder::control).
#[derive(Clone)]
pub struct Control {
    pub(crate) registry: Option<Arc<dyn ControlRegistry>>,
    pub(crate) heartbeat: Duration,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("registry", &self.registry.is_some())
            .field("heartbeat", &self.heartbeat)
            .finish()
    }
}

impl Default for Control {
    fn default() -> Self {
        Control::new()
    }
}

impl Control {
    /// Obey commands and announce the workers every 5 seconds, without a registry: states
    /// sent while the process was not running are not applied.
    pub fn new() -> Control {
        Control {
            registry: None,
            heartbeat: Duration::from_secs(5),
        }
    }

    /// Read registered states from `registry` before starting workers and after every
    /// reconnection. The runtime does not start while the registry cannot be read (within
    /// the startup timeout): a paused worker must not run because a database was down.
    pub fn registry(mut self, registry: impl ControlRegistry) -> Control {
        self.registry = Some(Arc::new(registry));
        self
    }

    /// How often the runtime announces its workers (at least 100 ms).
    pub fn heartbeat(mut self, every: Duration) -> Control {
        self.heartbeat = every.max(Duration::from_millis(100));
        self
    }
}

/// One runtime process as it announces itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ProcessStatus {
    /// Unique per process start: `<host>:<pid>:<random>`.
    pub process: String,
    /// The host name.
    pub host: String,
    /// The operating system's process id.
    pub pid: u32,
    /// The runtime's exchange.
    pub exchange: String,
    /// When the process started, in Unix milliseconds.
    pub started_at_ms: i64,
    /// When this status was sent, in Unix milliseconds.
    pub sent_at_ms: i64,
    /// How often it announces itself, in milliseconds.
    pub heartbeat_ms: u64,
    /// The process is stopping: forget it.
    #[serde(default)]
    pub gone: bool,
    /// Its workers.
    pub workers: Vec<WorkerReport>,
}

/// One worker of one process, as announced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct WorkerReport {
    /// The worker's name (its queue).
    pub name: String,
    /// `consuming`, `paused`, `removed`, `failed` or `starting`.
    pub state: String,
    /// Its effective binding patterns.
    pub bindings: Vec<String>,
    /// Its queues (worker queue, retry tiers, dead-letter queue).
    pub queues: Vec<String>,
    /// The registered revision this process has applied (0 for none).
    pub revision: i64,
    /// Deliveries being handled now.
    pub in_flight: u64,
    /// Deliveries settled since the process started.
    pub settled: u64,
    /// Of those, retried, dead-lettered or requeued.
    pub failed: u64,
    /// Why it is not consuming, if something went wrong.
    pub last_error: Option<String>,
}

/// The desired states a runtime holds (the newest revision seen of each worker), and the
/// ones it has applied: a desired state newer than the applied one is applied (again, after
/// a failure) until it is.
#[derive(Default)]
pub(crate) struct Controls {
    desired: Mutex<HashMap<String, WorkerControl>>,
    applied: Mutex<HashMap<String, WorkerControl>>,
}

impl Controls {
    /// Keep `control` if it is newer than the desired state held; whether it was.
    pub(crate) fn offer(&self, control: WorkerControl) -> bool {
        let mut desired = crate::lock(&self.desired);
        if desired
            .get(&control.worker)
            .is_some_and(|held| control.revision <= held.revision)
        {
            return false;
        }
        desired.insert(control.worker.clone(), control);
        true
    }

    pub(crate) fn get(&self, worker: &str) -> Option<WorkerControl> {
        crate::lock(&self.desired).get(worker).cloned()
    }

    pub(crate) fn state(&self, worker: &str) -> DesiredState {
        self.get(worker)
            .map(|c| c.state)
            .unwrap_or(DesiredState::Running)
    }

    pub(crate) fn mark_applied(&self, control: WorkerControl) {
        crate::lock(&self.applied).insert(control.worker.clone(), control);
    }

    /// The state last applied to `worker` (a default one, revision 0, for none).
    pub(crate) fn applied(&self, worker: &str) -> WorkerControl {
        crate::lock(&self.applied)
            .get(worker)
            .cloned()
            .unwrap_or_else(|| WorkerControl::new(worker))
    }

    /// Desired states not applied yet.
    pub(crate) fn unapplied(&self) -> Vec<WorkerControl> {
        let applied = crate::lock(&self.applied);
        crate::lock(&self.desired)
            .values()
            .filter(|c| {
                applied
                    .get(&c.worker)
                    .is_none_or(|a| a.revision < c.revision)
            })
            .cloned()
            .collect()
    }

    /// The subscription a worker declares: its own bindings changed as registered.
    pub(crate) fn adjust(&self, subscription: &crate::Subscription) -> crate::Subscription {
        let mut adjusted = subscription.clone();
        if let Some(control) = self.get(&subscription.queue) {
            adjusted.bindings = control.effective_bindings(&subscription.bindings);
        }
        adjusted
    }
}

/// Per-worker counts for the announcements, and a signal when a worker's state changed
/// (started, stopped, failed), to announce it at once.
#[derive(Default)]
pub(crate) struct Counters {
    counts: Mutex<HashMap<String, Counts>>,
    pub(crate) changed: tokio::sync::Notify,
}

#[derive(Default, Clone, Copy)]
pub(crate) struct Counts {
    pub(crate) received: u64,
    pub(crate) settled: u64,
    pub(crate) failed: u64,
}

impl Counters {
    pub(crate) fn get(&self, worker: &str) -> Counts {
        crate::lock(&self.counts)
            .get(worker)
            .copied()
            .unwrap_or_default()
    }
}

impl Observer for Counters {
    fn lifecycle(&self, event: &Lifecycle<'_>) {
        if matches!(
            event,
            Lifecycle::Consuming { .. } | Lifecycle::Stopped { .. } | Lifecycle::Failed { .. }
        ) {
            self.changed.notify_one();
        }
    }

    fn received(&self, received: &Received<'_>) {
        crate::lock(&self.counts)
            .entry(received.worker.to_owned())
            .or_default()
            .received += 1;
    }

    fn settled(&self, settled: &Settled<'_>) {
        let mut counts = crate::lock(&self.counts);
        let counts = counts.entry(settled.worker.to_owned()).or_default();
        counts.settled += 1;
        if !matches!(
            settled.handling,
            Handling::Handled | Handling::Skipped { .. }
        ) {
            counts.failed += 1;
        }
    }
}

/// Longest command accepted.
const MAX_COMMAND: usize = 64 * 1024;

/// A command as received: JSON of a [`WorkerControl`] with a positive revision, a worker
/// name and binding patterns a runtime could declare (anyone who may publish to the
/// control exchange can send one: nothing in it may reach the broker unchecked).
pub(crate) fn parse_command(body: &[u8]) -> Result<WorkerControl, String> {
    if body.len() > MAX_COMMAND {
        return Err(format!("{} bytes, over {MAX_COMMAND}", body.len()));
    }
    let control: WorkerControl = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    if control.revision < 1 {
        return Err(format!(
            "revision {}: revisions start at 1",
            control.revision
        ));
    }
    let patterns = control
        .bindings_added
        .iter()
        .chain(&control.bindings_removed);
    let subscription = patterns.fold(
        crate::Subscription::new(&control.worker).bind("x"),
        |s, p| s.bind(p),
    );
    subscription.validate().map_err(|e| e.to_string())?;
    Ok(control)
}

/// The name of the control queue of `process`.
pub(crate) fn control_queue(process: &str) -> String {
    format!("{CONTROL_EXCHANGE}.{process}")
}

/// Unix milliseconds now.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bindings_add_and_remove_in_any_order() {
        let own = vec!["order.*".to_owned(), "user.created".to_owned()];
        let mut c = WorkerControl::new("w");
        c.bind("invoice.#");
        c.unbind("user.created");
        assert_eq!(c.effective_bindings(&own), ["order.*", "invoice.#"]);
        c.bind("user.created");
        c.unbind("invoice.#");
        assert_eq!(c.effective_bindings(&own), ["order.*", "user.created"]);
        assert_eq!(c.bindings_removed, ["invoice.#"]);
        c.bind("order.*");
        assert_eq!(c.effective_bindings(&own), ["order.*", "user.created"]);
    }

    #[test]
    fn only_newer_revisions_are_taken_and_kept_until_applied() {
        let controls = Controls::default();
        let mut c = WorkerControl::new("w");
        c.revision = 2;
        c.state = DesiredState::Paused;
        assert!(controls.offer(c.clone()));
        assert!(!controls.offer(c.clone()));
        let mut old = c.clone();
        old.revision = 1;
        old.state = DesiredState::Running;
        assert!(!controls.offer(old));
        assert_eq!(controls.state("w"), DesiredState::Paused);
        assert_eq!(controls.state("other"), DesiredState::Running);
        assert_eq!(controls.unapplied(), [c.clone()]);
        controls.mark_applied(c.clone());
        assert!(controls.unapplied().is_empty());
        assert_eq!(controls.applied("w").revision, 2);
        assert_eq!(controls.applied("other").revision, 0);
    }

    #[test]
    fn commands_are_checked_before_they_are_taken() {
        let ok = br#"{"worker":"w","state":"paused","bindings_added":["a.#"],"revision":3}"#;
        assert_eq!(parse_command(ok).unwrap().revision, 3);
        let long = format!(
            r#"{{"worker":"w","state":"running","bindings_added":["{}"],"revision":1}}"#,
            "a".repeat(300)
        );
        for bad in [
            &b"not json"[..],
            br#"{"worker":5}"#,
            br#"{"worker":"w","state":"running","revision":0}"#,
            br#"{"worker":"","state":"running","revision":1}"#,
            br#"{"worker":"w","state":"running","bindings_removed":["a..b"],"revision":1}"#,
            long.as_bytes(),
            &[b' '; 70_000][..],
        ] {
            assert!(
                parse_command(bad).is_err(),
                "{}",
                String::from_utf8_lossy(&bad[..bad.len().min(80)])
            );
        }
    }
}
