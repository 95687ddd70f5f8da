//! What a worker declared last, kept on the broker, so that the next declaration can remove
//! what the worker no longer declares.
//!
//! AMQP cannot list a queue's bindings, so a worker whose bindings narrowed would keep
//! receiving the old events forever (and a typed worker would dead-letter them as
//! undecodable); a changed retry policy would leave its old retry queues behind. Each
//! worker queue `q` therefore has a queue `q.topology` holding one small JSON message: the
//! bindings and retry tiers of the last declaration. Declaring reads it (holding the
//! message unacknowledged), deletes old retry tiers that are empty, unbinds (or reports)
//! bindings no longer wanted, and, when anything changed, publishes the new record with a
//! confirm — on the publisher's connection, never a consumer's — and only then
//! acknowledges the old one. An unchanged record costs no publish. Two processes declaring
//! at once may leave two records; the next declaration reads them all.

use std::collections::BTreeSet;
use std::time::Duration;

use lapin::BasicProperties;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::{Planned, Publishing, dlq_name, record_name, retry_queue_name};
use crate::broker::{Channel, Confirm, Connection, NOT_FOUND, PRECONDITION_FAILED};
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

/// Longest wait for the broker to take a new record.
const RECORD_TIMEOUT: Duration = Duration::from_secs(10);

/// Read the worker's previous records, delete its old empty retry tiers, unbind (when
/// pruning) or report the bindings it no longer declares, and record what is now there.
/// Returns the stale bindings left in place, as `exchange 'x', key 'k'` descriptions.
pub(super) async fn reconcile(
    conn: &Connection,
    publishing: Publishing<'_>,
    planned: &Planned,
) -> Result<Vec<String>> {
    let (queue, wanted) = (planned.queue.as_str(), &planned.record);
    let record_queue = record_name(queue);
    // Read on the declaring connection (no publish there), holding the records
    // unacknowledged: closing the channel puts them back unless they are replaced.
    conn.on_channel(async |ch| {
        let (previous, last_tag, records) = read(ch, &record_queue).await?;
        // Only the worker's own queues: a record never reaches beyond them.
        let ours = [queue.to_owned(), dlq_name(queue)];
        let mut next = wanted.clone();
        let mut stale = Vec::new();
        for binding in previous.bindings.difference(&wanted.bindings) {
            let (bound, exchange, key) = binding;
            if !ours.contains(bound) {
                continue;
            }
            if planned.prune && unbind(conn, bound, exchange, key).await {
                continue;
            }
            warn!(
                worker = %queue, %exchange, %key,
                "the worker no longer declares this binding, but it is still bound: these events \
                 keep arriving (Subscription::prune_bindings removes it)"
            );
            stale.push(format!("exchange '{exchange}', key '{key}'"));
            next.bindings.insert(binding.clone());
        }
        for tier in previous.tiers.difference(&wanted.tiers) {
            if !delete_if_empty(conn, &retry_queue_name(queue, *tier)).await {
                next.tiers.insert(*tier);
            }
        }
        if next != previous || records != 1 {
            let publishing = publishing.connection(conn).await?;
            tokio::time::timeout(RECORD_TIMEOUT, write(&publishing, &record_queue, &next))
                .await
                .map_err(|_| Error::PublishTimeout {
                    exchange: String::new(),
                    routing_key: record_queue.clone(),
                    timeout: RECORD_TIMEOUT,
                })??;
            if let Some(tag) = last_tag {
                ch.ack_up_to(tag).await?;
            }
        }
        Ok(stale)
    })
    .await
}

/// The union of the records in `record_queue` (at most [`MAX_RECORDS`]), the last delivery
/// tag, and how many there were.
async fn read(ch: &Channel, record_queue: &str) -> Result<(Record, Option<u64>, usize)> {
    let mut previous = Record::default();
    let (mut last_tag, mut records) = (None, 0);
    for _ in 0..MAX_RECORDS {
        let Some(message) = ch.get(record_queue).await? else {
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
    Ok((previous, last_tag, records))
}

/// Publish `record` into `record_queue` and wait for the broker's confirm.
async fn write(conn: &Connection, record_queue: &str, record: &Record) -> Result<()> {
    let body = serde_json::to_vec(record).map_err(Error::Serialize)?;
    let properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into());
    let confirmed = conn
        .on_channel(async |ch| {
            ch.confirm_select().await?;
            Ok::<_, Error>(
                ch.publish("", record_queue, &body, properties, true)
                    .await?
                    .await?,
            )
        })
        .await;
    match confirmed? {
        Confirm::Ack { returned: None } => Ok(()),
        _ => Err(Error::Nacked {
            exchange: String::new(),
            routing_key: record_queue.to_owned(),
        }),
    }
}

/// Remove a binding the worker no longer declares, on a channel of its own (a missing
/// exchange closes it). `true` when it is gone.
async fn unbind(conn: &Connection, queue: &str, exchange: &str, key: &str) -> bool {
    let outcome = conn
        .on_channel(async |ch| Ok::<_, Error>(ch.unbind(queue, exchange, key).await?))
        .await;
    match outcome {
        Ok(()) => {
            warn!(
                %queue, %exchange, %key,
                "removed a binding the worker no longer declares: these events stop arriving"
            );
            true
        }
        Err(e) if is_code(&e, NOT_FOUND) => true,
        Err(e) => {
            warn!(%queue, %exchange, %key, error = %e, "cannot remove a binding the worker no longer declares");
            false
        }
    }
}

/// Delete a retry tier the worker no longer uses, unless it still holds messages (they
/// go back to the worker when they expire). `true` when it is gone.
async fn delete_if_empty(conn: &Connection, tier: &str) -> bool {
    let outcome = conn
        .on_channel(async |ch| Ok::<_, Error>(ch.delete_queue_if_empty(tier).await?))
        .await;
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
