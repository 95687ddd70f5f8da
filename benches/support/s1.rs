//! S1's event and consumer, shared by the benchmarks of the other crates
//! (`observe/benches/overhead.rs`, `store/benches/record.rs`): about 200 bytes of JSON, and
//! a worker as S1's consumer in `benches/throughput.rs` (prefetch 300, concurrency 32, a
//! handler that does nothing with the event) that says when it has handled `total`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use rabbitry::prelude::*;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

/// The S1 event.
#[derive(Serialize, Deserialize)]
pub struct Tick {
    pub id: u64,
    pub sent_at_ns: u64,
    pub pad: String,
}

impl Event for Tick {
    const TYPE: &'static str = "bench.tick";
}

impl Tick {
    /// Event `id`, stamped now, padded to S1's size.
    pub fn new(id: u64) -> Tick {
        let sent_at_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Tick {
            id,
            sent_at_ns,
            pad: "p".repeat(150),
        }
    }
}

/// S1's consumer: counts what it handles; `done.1` is notified at `total`.
pub struct Counter {
    pub queue: String,
    pub done: Arc<(AtomicUsize, Notify)>,
    pub total: usize,
}

impl Worker for Counter {
    type Event = Tick;

    fn subscription(&self) -> Subscription {
        Subscription::new(&self.queue)
            .bind("bench.tick")
            .prefetch(300)
            .concurrency(32)
    }

    async fn handle(&self, _: Delivery<Tick>, _: &Context) -> Outcome {
        if self.done.0.fetch_add(1, Ordering::Relaxed) + 1 == self.total {
            self.done.1.notify_one();
        }
        Ok(())
    }
}
