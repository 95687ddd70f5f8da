//! What a worker declared last, kept on the broker, so that the next declaration can remove
//! what the worker no longer declares.
//!
//! AMQP cannot list a queue's bindings, so a worker whose bindings narrowed would keep
//! receiving the old events forever (and a typed worker would dead-letter them as
//! undecodable); a changed retry policy would leave its old retry queues behind. Each
//! worker queue `q` therefore has a queue `q.topology` holding one small JSON message: the
//! bindings and retry tiers of the last declaration. Declaring reads it (holding the
//! message unacknowledged), unbinds what is no longer wanted, deletes old retry tiers that
//! are empty, publishes the new record with a confirm, and only then acknowledges the old
//! one. Two processes declaring at once may leave two records; the next declaration reads
//! them all, so nothing wanted is ever removed and nothing stale is kept for long.

use std::collections::BTreeSet;

use lapin::BasicProperties;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::{record_name, retry_queue_name};
use crate::broker::{Confirm, Connection, NOT_FOUND, PRECONDITION_FAILED};
use crate::error::{Error, Result};

/// Records read at most from one record queue (a guard against a queue someone flooded).
const MAX_RECORDS: usize = 64;

/// The bindings (queue, exchange, key) and retry tiers (ms) of one worker.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Record {
    bindings: BTreeSet<(String, String, String)>,
    tiers: BTreeSet<u64>,
}

impl Record {
    pub(crate) fn new(
        bindings: impl IntoIterator<Item = (String, String, String)>,
        tiers: impl IntoIterator<Item = u64>,
    ) -> Record {
        Record {
            bindings: bindings.into_iter().collect(),
            tiers: tiers.into_iter().collect(),
        }
    }
}

/// Read `queue`'s previous records, remove what `wanted` no longer has, and record `wanted`.
pub(crate) async fn reconcile(conn: &Connection, queue: &str, wanted: &Record) -> Result<()> {
    let record_queue = record_name(queue);
    let ch = conn.channel().await?;
    let result = async {
        ch.confirm_select().await?;
        let mut previous = Record::default();
        let (mut last_tag, mut records) = (None, 0);
        for _ in 0..MAX_RECORDS {
            let Some(message) = ch.get(&record_queue).await? else {
                break;
            };
            last_tag = Some(message.tag);
            records += 1;
            // A record this version cannot read is dropped: it only loses a clean-up.
            if let Ok(record) = serde_json::from_slice::<Record>(&message.body) {
                previous.bindings.extend(record.bindings);
                previous.tiers.extend(record.tiers);
            }
        }
        if previous == *wanted && records == 1 {
            // Unchanged: keep the record as it is (it goes back to the queue).
            return Ok::<_, Error>(None);
        }
        for (bound, exchange, key) in previous.bindings.difference(&wanted.bindings) {
            unbind(conn, bound, exchange, key).await;
        }
        let mut kept = wanted.clone();
        for tier in previous.tiers.difference(&wanted.tiers) {
            if !delete_if_empty(conn, &retry_queue_name(queue, *tier)).await {
                kept.tiers.insert(*tier);
            }
        }
        let body = serde_json::to_vec(&kept).map_err(Error::Serialize)?;
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into());
        let confirm = ch
            .publish("", &record_queue, &body, properties, true)
            .await?
            .await?;
        if !matches!(confirm, Confirm::Ack { returned: None }) {
            return Err(Error::Nacked {
                exchange: String::new(),
                routing_key: record_queue.clone(),
            });
        }
        Ok(last_tag)
    }
    .await;
    let acked = match &result {
        Ok(Some(tag)) => ch.ack_up_to(*tag).await.map_err(Error::from),
        _ => Ok(()),
    };
    // Closing returns unacknowledged records to the queue: an unchanged one, or the old
    // ones when anything above failed.
    ch.close().await;
    result.and(acked)
}

/// Remove a binding the worker no longer declares, on a channel of its own (a missing
/// exchange closes it).
async fn unbind(conn: &Connection, queue: &str, exchange: &str, key: &str) {
    let outcome = match conn.channel().await {
        Ok(ch) => {
            let r = ch.unbind(queue, exchange, key).await;
            ch.close().await;
            r.map_err(Error::from)
        }
        Err(e) => Err(e),
    };
    match outcome {
        Ok(()) => warn!(
            %queue, %exchange, %key,
            "removed a binding the worker no longer declares: these events stop arriving"
        ),
        Err(e) if is_code(&e, NOT_FOUND) => {}
        Err(e) => {
            warn!(%queue, %exchange, %key, error = %e, "cannot remove a binding the worker no longer declares")
        }
    }
}

/// Delete a retry tier the worker no longer uses, unless it still holds messages (they
/// go back to the worker when they expire). `true` when it is gone.
async fn delete_if_empty(conn: &Connection, tier: &str) -> bool {
    let outcome = match conn.channel().await {
        Ok(ch) => {
            let r = ch.delete_queue_if_empty(tier).await;
            ch.close().await;
            r.map_err(Error::from)
        }
        Err(e) => Err(e),
    };
    match outcome {
        Ok(_) => {
            info!(queue = %tier, "deleted a retry queue the worker's policy no longer uses");
            true
        }
        Err(e) if is_code(&e, NOT_FOUND) => true,
        Err(e) if is_code(&e, PRECONDITION_FAILED) => {
            warn!(queue = %tier, "a retry queue the worker's policy no longer uses still holds messages; kept until it is empty");
            false
        }
        Err(e) => {
            warn!(queue = %tier, error = %e, "cannot delete a retry queue the worker's policy no longer uses");
            false
        }
    }
}

fn is_code(error: &Error, code: u16) -> bool {
    matches!(error, Error::Broker(e) if e.reply_code() == Some(code))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_read_back() {
        let r = Record::new(
            [("q".into(), "events".into(), "order.*".into())],
            [100, 200],
        );
        let json = serde_json::to_vec(&r).unwrap();
        assert_eq!(serde_json::from_slice::<Record>(&json).unwrap(), r);
    }
}
