//! Consuming: prefetch, deliveries to consumers round-robin, acknowledgements and requeues.

use std::collections::BTreeSet;

use lapin::protocol::AMQPSoftError;
use tokio::sync::mpsc;

use super::{Consumer, Delivery, State, Unacked, no_queue, soft};
use crate::broker::Incoming;

impl State {
    pub(in crate::broker::memory) fn qos(&mut self, chan: u64, prefetch: u16) -> lapin::Result<()> {
        self.chan(chan, "basic.qos")?.prefetch = prefetch;
        Ok(())
    }

    pub(in crate::broker::memory) fn consume(
        &mut self,
        chan: u64,
        queue: &str,
        tag: &str,
    ) -> lapin::Result<mpsc::UnboundedReceiver<Delivery>> {
        self.chan(chan, "basic.consume")?;
        if !self.queues.contains_key(queue) {
            return Err(self.fail(chan, no_queue(queue)));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let c = self.chan(chan, "basic.consume")?;
        let consumer = Consumer {
            queue: queue.to_owned(),
            prefetch: c.prefetch,
            unacked: 0,
            tx,
        };
        c.consumers.insert(tag.to_owned(), consumer);
        if let Some(q) = self.queues.get_mut(queue) {
            q.consumers.push((chan, tag.to_owned()));
        }
        self.dispatch(queue);
        Ok(rx)
    }

    pub(in crate::broker::memory) fn cancel(&mut self, chan: u64, tag: &str) -> lapin::Result<()> {
        let c = self.chan(chan, "basic.cancel")?;
        // Dropping the sender ends the consumer's stream; its unacknowledged deliveries stay
        // on the channel, still to be acknowledged.
        if let Some(consumer) = c.consumers.remove(tag)
            && let Some(q) = self.queues.get_mut(&consumer.queue)
        {
            q.consumers.retain(|(ch, t)| !(*ch == chan && t == tag));
        }
        Ok(())
    }

    /// Acknowledge `tag` (and every earlier unacknowledged delivery when `multiple`).
    pub(in crate::broker::memory) fn ack(
        &mut self,
        chan: u64,
        tag: u64,
        multiple: bool,
    ) -> lapin::Result<()> {
        let c = self.chan(chan, "basic.ack")?;
        if !c.unacked.contains_key(&tag) {
            let text = format!("PRECONDITION_FAILED - unknown delivery tag {tag}");
            return Err(self.fail(chan, soft(AMQPSoftError::PRECONDITIONFAILED, text)));
        }
        let acked: Vec<Unacked> = if multiple {
            let later = c.unacked.split_off(&(tag + 1));
            std::mem::replace(&mut c.unacked, later)
                .into_values()
                .collect()
        } else {
            c.unacked.remove(&tag).into_iter().collect()
        };
        let mut touched = BTreeSet::new();
        for unacked in acked {
            if let Some(consumer) = unacked.consumer.and_then(|t| c.consumers.get_mut(&t)) {
                consumer.unacked = consumer.unacked.saturating_sub(1);
            }
            touched.insert(unacked.queue);
        }
        for queue in touched {
            self.dispatch(&queue);
        }
        Ok(())
    }

    /// Reject `tag`: back to the front of its queue, or dead-lettered.
    pub(in crate::broker::memory) fn nack(
        &mut self,
        chan: u64,
        tag: u64,
        requeue: bool,
    ) -> lapin::Result<()> {
        let c = self.chan(chan, "basic.nack")?;
        let Some(unacked) = c.unacked.remove(&tag) else {
            let text = format!("PRECONDITION_FAILED - unknown delivery tag {tag}");
            return Err(self.fail(chan, soft(AMQPSoftError::PRECONDITIONFAILED, text)));
        };
        if let Some(consumer) = unacked
            .consumer
            .as_ref()
            .and_then(|t| c.consumers.get_mut(t))
        {
            consumer.unacked = consumer.unacked.saturating_sub(1);
        }
        let mut message = unacked.message;
        if requeue {
            if let Some(q) = self.queues.get_mut(&unacked.queue) {
                message.redelivered = true;
                q.requeue(message);
            }
        } else {
            self.dead_letter(&unacked.queue, message, "rejected");
        }
        self.dispatch(&unacked.queue);
        Ok(())
    }

    /// Fetch one message to be acknowledged on this channel (requeued if it closes first).
    pub(in crate::broker::memory) fn get(
        &mut self,
        chan: u64,
        queue: &str,
    ) -> lapin::Result<Option<Incoming>> {
        self.chan(chan, "basic.get")?;
        self.expire(queue);
        let Some(q) = self.queues.get_mut(queue) else {
            return Err(self.fail(chan, no_queue(queue)));
        };
        let Some(message) = q.pop() else {
            return Ok(None);
        };
        let c = self.chan(chan, "basic.get")?;
        c.next_tag += 1;
        let incoming = Incoming {
            tag: c.next_tag,
            exchange: message.exchange.clone(),
            routing_key: message.routing_key.clone(),
            redelivered: message.redelivered,
            properties: message.properties.clone(),
            body: message.body.clone(),
        };
        c.unacked.insert(
            c.next_tag,
            Unacked {
                queue: queue.to_owned(),
                consumer: None,
                message,
            },
        );
        Ok(Some(incoming))
    }

    /// Fetch one message with auto-acknowledgement; its message id.
    pub(in crate::broker::memory) fn get_message_id(
        &mut self,
        chan: u64,
        queue: &str,
    ) -> lapin::Result<Option<String>> {
        self.chan(chan, "basic.get")?;
        self.expire(queue);
        let Some(q) = self.queues.get_mut(queue) else {
            return Err(self.fail(chan, no_queue(queue)));
        };
        Ok(q.pop()
            .and_then(|m| m.properties.message_id().as_ref().map(|id| id.to_string())))
    }

    /// Hand ready messages to consumers with room under their prefetch, round-robin.
    pub(in crate::broker::memory) fn dispatch(&mut self, queue: &str) {
        self.expire(queue);
        loop {
            let Some(q) = self.queues.get_mut(queue) else {
                return;
            };
            if q.ready.is_empty() || q.consumers.is_empty() {
                return;
            }
            // Single active consumer: the oldest consumer only; the others stand by.
            let n = match q.single_active {
                true => 1,
                false => q.consumers.len(),
            };
            if q.single_active {
                q.next_consumer = 0;
            }
            let has_room = |(ch, tag): &(u64, String)| {
                self.chans
                    .get(ch)
                    .and_then(|c| c.consumers.get(tag))
                    .is_some_and(|c| c.prefetch == 0 || c.unacked < usize::from(c.prefetch))
            };
            let Some(i) = (0..n)
                .map(|i| (q.next_consumer + i) % n)
                .find(|i| has_room(&q.consumers[*i]))
            else {
                return;
            };
            q.next_consumer = (i + 1) % n;
            let (ch, tag) = q.consumers[i].clone();
            let Some(message) = q.pop() else {
                return;
            };
            let Some(c) = self.chans.get_mut(&ch) else {
                return;
            };
            c.next_tag += 1;
            let delivery_tag = c.next_tag;
            let Some(consumer) = c.consumers.get_mut(&tag) else {
                return;
            };
            let incoming = Incoming {
                tag: delivery_tag,
                exchange: message.exchange.clone(),
                routing_key: message.routing_key.clone(),
                redelivered: message.redelivered,
                properties: message.properties.clone(),
                body: message.body.clone(),
            };
            if consumer.tx.send(Ok(incoming)).is_err() {
                // Its stream was dropped without a cancel: the consumer is gone.
                c.consumers.remove(&tag);
                if let Some(q) = self.queues.get_mut(queue) {
                    q.consumers.retain(|(c, t)| !(*c == ch && *t == tag));
                    q.requeue(message);
                }
                continue;
            }
            consumer.unacked += 1;
            c.unacked.insert(
                delivery_tag,
                Unacked {
                    queue: queue.to_owned(),
                    consumer: Some(tag),
                    message,
                },
            );
        }
    }
}
