//! Readiness: connected, and every worker consuming — followed from the runtime's lifecycle.

use std::collections::BTreeMap;

use rabbitry::observe::{Lifecycle, StopReason};
use serde::Serialize;

/// Whether a runtime is ready, and if not, why: the body of `GET /ready`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Readiness {
    /// Running, connected, and every worker consuming.
    pub ready: bool,
    /// The runtime has started and not shut down.
    pub running: bool,
    /// The runtime's broker connection is up.
    pub connected: bool,
    /// Every worker, by name.
    pub workers: Vec<WorkerReadiness>,
}

/// One worker in a [`Readiness`] report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct WorkerReadiness {
    /// The worker (its queue).
    pub name: String,
    /// `consuming`, `paused`, `starting` (not consuming yet, or again after a lost
    /// connection) or `failed`.
    pub state: &'static str,
    /// Why it is not consuming, when it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl WorkerReadiness {
    /// Consuming. A paused worker ([`Runtime::pause`](rabbitry::Runtime::pause)) is not:
    /// its messages wait.
    pub fn is_ready(&self) -> bool {
        self.state == "consuming"
    }
}

/// What the lifecycle events have said so far.
#[derive(Debug, Default)]
pub(crate) struct State {
    running: bool,
    connected: bool,
    workers: BTreeMap<String, (&'static str, Option<String>)>,
}

impl State {
    pub(crate) fn apply(&mut self, event: &Lifecycle<'_>) {
        match event {
            Lifecycle::Started { .. } => {
                self.running = true;
                self.connected = true;
            }
            Lifecycle::ConnectionLost { .. } => {
                self.connected = false;
                for (state, _) in self.workers.values_mut() {
                    if *state == "consuming" {
                        *state = "starting";
                    }
                }
            }
            Lifecycle::Reconnected => self.connected = true,
            Lifecycle::Consuming { worker } => self.set(worker, "consuming", None),
            Lifecycle::Stopped { worker, reason } => match reason {
                StopReason::Paused => self.set(worker, "paused", None),
                _ => {
                    self.workers.remove(*worker);
                }
            },
            Lifecycle::Failed { worker, error, .. } => {
                self.set(worker, "failed", Some((*error).to_owned()))
            }
            Lifecycle::ShutDown => {
                self.running = false;
                self.connected = false;
            }
            _ => {}
        }
    }

    fn set(&mut self, worker: &str, state: &'static str, error: Option<String>) {
        match self.workers.get_mut(worker) {
            Some(entry) => *entry = (state, error),
            None => {
                self.workers.insert(worker.to_owned(), (state, error));
            }
        }
    }

    pub(crate) fn report(&self) -> Readiness {
        let workers: Vec<WorkerReadiness> = self
            .workers
            .iter()
            .map(|(name, (state, error))| WorkerReadiness {
                name: name.clone(),
                state,
                error: error.clone(),
            })
            .collect();
        Readiness {
            ready: self.running && self.connected && workers.iter().all(WorkerReadiness::is_ready),
            running: self.running,
            connected: self.connected,
            workers,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_the_lifecycle() {
        let mut state = State::default();
        assert!(
            !state.report().ready,
            "not ready before the runtime started"
        );
        state.apply(&Lifecycle::Consuming { worker: "a" });
        state.apply(&Lifecycle::Consuming { worker: "b" });
        state.apply(&Lifecycle::Started { exchange: "events" });
        assert!(state.report().ready);

        state.apply(&Lifecycle::ConnectionLost { error: "cut" });
        let report = state.report();
        assert!(!report.ready && !report.connected);
        assert!(report.workers.iter().all(|w| w.state == "starting"));

        state.apply(&Lifecycle::Reconnected);
        state.apply(&Lifecycle::Consuming { worker: "a" });
        assert!(!state.report().ready, "b is not consuming yet");
        state.apply(&Lifecycle::Failed {
            worker: "b",
            error: "no queue",
            restart_in: std::time::Duration::from_secs(1),
        });
        let report = state.report();
        assert_eq!(report.workers[1].state, "failed");
        assert_eq!(report.workers[1].error.as_deref(), Some("no queue"));

        state.apply(&Lifecycle::Stopped {
            worker: "b",
            reason: StopReason::Paused,
        });
        assert!(!state.report().ready, "a paused worker is not consuming");
        assert_eq!(state.report().workers[1].state, "paused");
        state.apply(&Lifecycle::Stopped {
            worker: "b",
            reason: StopReason::Removed,
        });
        assert_eq!(state.report().workers.len(), 1);
        assert!(state.report().ready, "a removed worker is forgotten");

        state.apply(&Lifecycle::ShutDown);
        assert!(!state.report().ready);
    }
}
