//! rabbitry's reliability harness.
//!
//! Every message carries a unique id. The [`ChaosWorker`] appends each id it handles to a
//! ledger file *before* its handler returns (so before the acknowledgement); the producer
//! keeps the ids the broker confirmed. After a scenario, [`verify`] checks the oracle:
//! every confirmed id was handled at least once, no id was handled that was never
//! published, and duplicates are counted.

use std::collections::{BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rabbitry::prelude::*;
use serde::{Deserialize, Serialize};

/// The event of every scenario: an id and some padding (about 200 bytes of JSON in all).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChaosMessage {
    /// Unique per message of a scenario.
    pub id: u64,
    /// Filler, so that messages have a realistic size.
    pub pad: String,
}

impl Event for ChaosMessage {
    const TYPE: &'static str = "chaos.message";
}

impl ChaosMessage {
    /// A message with id `id`, about 200 bytes as JSON.
    pub fn new(id: u64) -> ChaosMessage {
        ChaosMessage {
            id,
            pad: "x".repeat(170),
        }
    }
}

/// How a [`ChaosWorker`] behaves.
#[derive(Debug, Clone)]
pub struct ChaosConfig {
    /// The queue (and worker name).
    pub queue: String,
    /// The ledger file, appended to.
    pub ledger: PathBuf,
    /// How long each handler run takes.
    pub delay: Duration,
    /// Handlers at once.
    pub concurrency: usize,
    /// Prefetch.
    pub prefetch: u16,
    /// Panic on every message whose id is a multiple of this.
    pub panic_every: Option<u64>,
    /// The retry policy.
    pub retry: RetryPolicy,
    /// Print `inflight <n>` on each new maximum and `handled <n>` every 1000 to stdout.
    pub report: bool,
}

impl ChaosConfig {
    /// Defaults: no delay, concurrency 16, prefetch 100, no panics, retries after 10 ms,
    /// 20 ms (3 attempts), no reports.
    pub fn new(queue: impl Into<String>, ledger: impl Into<PathBuf>) -> ChaosConfig {
        ChaosConfig {
            queue: queue.into(),
            ledger: ledger.into(),
            delay: Duration::ZERO,
            concurrency: 16,
            prefetch: 100,
            panic_every: None,
            retry: RetryPolicy::exponential(Duration::from_millis(10)).max_attempts(3),
            report: false,
        }
    }

    /// The subscription of a worker with this configuration.
    pub fn subscription(&self) -> Subscription {
        Subscription::new(&self.queue)
            .bind(ChaosMessage::TYPE)
            .prefetch(self.prefetch)
            .concurrency(self.concurrency)
            .retry(self.retry.clone())
    }
}

/// Handles [`ChaosMessage`]s and records each handled id in the ledger.
pub struct ChaosWorker {
    config: ChaosConfig,
    ledger: File,
    inflight: AtomicU64,
    max_inflight: AtomicU64,
    handled: AtomicU64,
}

impl ChaosWorker {
    /// A worker appending to `config.ledger` (created if missing).
    pub fn new(config: ChaosConfig) -> io::Result<ChaosWorker> {
        let ledger = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&config.ledger)?;
        Ok(ChaosWorker {
            config,
            ledger,
            inflight: AtomicU64::new(0),
            max_inflight: AtomicU64::new(0),
            handled: AtomicU64::new(0),
        })
    }

    fn enter(&self) {
        let now = self.inflight.fetch_add(1, Ordering::SeqCst) + 1;
        if self.max_inflight.fetch_max(now, Ordering::SeqCst) < now && self.config.report {
            println!("inflight {now}");
        }
    }

    fn leave(&self) {
        self.inflight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Worker for ChaosWorker {
    type Event = ChaosMessage;

    fn subscription(&self) -> Subscription {
        self.config.subscription()
    }

    async fn handle(&self, message: Delivery<ChaosMessage>, _ctx: &Context) -> Outcome {
        self.enter();
        if self.config.panic_every.is_some_and(|k| message.id % k == 0) {
            self.leave();
            panic!("chaos: message {} panics", message.id);
        }
        if !self.config.delay.is_zero() {
            tokio::time::sleep(self.config.delay).await;
        }
        // One write(2) of a short line on an O_APPEND file: atomic, and in the kernel's
        // hands before the acknowledgement, so it survives SIGKILL.
        let recorded = (&self.ledger).write_all(format!("{}\n", message.id).as_bytes());
        self.leave();
        recorded?;
        let handled = self.handled.fetch_add(1, Ordering::SeqCst) + 1;
        if self.config.report && handled % 1000 == 0 {
            println!("handled {handled}");
        }
        Ok(())
    }
}

/// How often each id appears in the ledger at `path` (empty if it does not exist).
pub fn read_ledger(path: &Path) -> io::Result<HashMap<u64, u32>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(HashMap::new()),
        Err(e) => return Err(e),
    };
    let mut counts = HashMap::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        let id = line.parse().map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("ledger line {line:?}: {e}"),
            )
        })?;
        *counts.entry(id).or_insert(0) += 1;
    }
    Ok(counts)
}

/// The result of checking a ledger against what the producer saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Ids the broker confirmed to the producer.
    pub confirmed: usize,
    /// Distinct ids handled.
    pub handled: usize,
    /// Extra handler runs beyond the first, summed over all ids.
    pub duplicates: u64,
    /// Confirmed ids never handled: lost messages.
    pub lost: Vec<u64>,
    /// Handled ids that were never published.
    pub unknown: Vec<u64>,
}

impl Verdict {
    /// Nothing lost and nothing invented.
    pub fn holds(&self) -> bool {
        self.lost.is_empty() && self.unknown.is_empty()
    }
}

/// Check `ledger` against the `confirmed` ids, out of everything the producer `attempted`.
pub fn verify(
    confirmed: &BTreeSet<u64>,
    attempted: &BTreeSet<u64>,
    ledger: &HashMap<u64, u32>,
) -> Verdict {
    let mut lost: Vec<u64> = confirmed
        .iter()
        .filter(|id| !ledger.contains_key(id))
        .copied()
        .collect();
    lost.sort_unstable();
    let mut unknown: Vec<u64> = ledger
        .keys()
        .filter(|id| !attempted.contains(id))
        .copied()
        .collect();
    unknown.sort_unstable();
    Verdict {
        confirmed: confirmed.len(),
        handled: ledger.len(),
        duplicates: ledger.values().map(|n| u64::from(n - 1)).sum(),
        lost,
        unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oracle_finds_losses_inventions_and_duplicates() {
        let confirmed: BTreeSet<u64> = [1, 2, 3].into();
        let attempted: BTreeSet<u64> = [1, 2, 3, 4].into();
        let ledger: HashMap<u64, u32> = [(1, 1), (2, 3), (4, 1), (9, 1)].into();
        let v = verify(&confirmed, &attempted, &ledger);
        assert_eq!(v.lost, [3]);
        assert_eq!(v.unknown, [9]);
        assert_eq!(v.duplicates, 2);
        assert!(!v.holds());
        let ledger: HashMap<u64, u32> = [(1, 1), (2, 1), (3, 2)].into();
        assert!(verify(&confirmed, &attempted, &ledger).holds());
    }

    #[test]
    fn the_ledger_is_read_back_with_counts() {
        let path = std::env::temp_dir().join(format!("ledger-{}", std::process::id()));
        std::fs::write(&path, "1\n2\n1\n").unwrap();
        let counts = read_ledger(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(counts, [(1, 2), (2, 1)].into());
        assert!(
            read_ledger(Path::new("/nonexistent/ledger"))
                .unwrap()
                .is_empty()
        );
    }
}
