//! Publishing and routing, dead-lettering, and time-to-live.

use lapin::BasicProperties;
use lapin::protocol::AMQPSoftError;
use tokio::time::Instant;

use super::super::queue::{Message, with_death};
use super::{State, soft};
use crate::broker::Confirm;
use crate::topic;

impl State {
    pub(in crate::broker::memory) fn route(&self, exchange: &str, key: &str) -> Vec<String> {
        if exchange.is_empty() {
            return self
                .queues
                .contains_key(key)
                .then(|| key.to_owned())
                .into_iter()
                .collect();
        }
        let kind = self.exchanges.get(exchange).map(String::as_str);
        let mut queues: Vec<String> = self
            .bindings
            .iter()
            .filter(|(x, _, pattern)| {
                x == exchange
                    && match kind {
                        Some("topic") => topic::matches(pattern, key),
                        Some("fanout") => true,
                        _ => pattern == key,
                    }
            })
            .map(|(_, q, _)| q.clone())
            .collect();
        queues.dedup();
        queues
    }

    pub(in crate::broker::memory) fn enqueue(&mut self, queue: &str, mut message: Message) {
        self.next_seq += 1;
        message.seq = self.next_seq;
        message.enqueued_at = Instant::now();
        if let Some(q) = self.queues.get_mut(queue) {
            q.push_back(message);
            if q.ttl.is_some() && !q.expiry_scheduled {
                self.needs_expiry.push(queue.to_owned());
            }
        }
    }

    /// A client's publish. The confirm is immediate; an unroutable `mandatory` message comes
    /// back (its message id in the confirm), an unknown exchange closes the channel.
    pub(in crate::broker::memory) fn publish(
        &mut self,
        chan: u64,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
        mandatory: bool,
    ) -> lapin::Result<Confirm> {
        self.chan(chan, "basic.publish")?;
        if !self.has_exchange(exchange) {
            let text = format!("NOT_FOUND - no exchange '{exchange}' in vhost '/'");
            return Err(self.fail(chan, soft(AMQPSoftError::NOTFOUND, text)));
        }
        let routed = self.deliver(exchange, routing_key, body, properties.clone());
        if routed == 0 && mandatory {
            let id = properties.message_id().as_ref().map(|id| id.to_string());
            return Ok(Confirm::Ack { returned: Some(id) });
        }
        Ok(Confirm::Ack { returned: None })
    }

    /// Whether `exchange` exists (the default exchange always does).
    pub(in crate::broker::memory) fn has_exchange(&self, exchange: &str) -> bool {
        exchange.is_empty() || self.exchanges.contains_key(exchange)
    }

    /// Route a message to every matching queue (recording it when recording is on);
    /// how many queues took it.
    pub(in crate::broker::memory) fn deliver(
        &mut self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> usize {
        let message = Message {
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
            properties,
            body: body.to_vec(),
            redelivered: false,
            enqueued_at: Instant::now(),
            seq: 0,
        };
        let queues = self.route(exchange, routing_key);
        for queue in &queues {
            self.enqueue(queue, message.clone());
            self.dispatch(queue);
        }
        if let Some(journal) = &mut self.journal {
            journal.push(message);
        }
        queues.len()
    }

    /// Dead-letter a message leaving `queue` for `reason` (`rejected`, `expired`), per the
    /// queue's `x-dead-letter-exchange` and `x-dead-letter-routing-key`; dropped without them.
    pub(in crate::broker::memory) fn dead_letter(
        &mut self,
        queue: &str,
        message: Message,
        reason: &str,
    ) {
        let Some(q) = self.queues.get(queue) else {
            return;
        };
        let Some(exchange) = q.dead_letter_exchange.clone() else {
            return;
        };
        let routing_key = q
            .dead_letter_key
            .clone()
            .unwrap_or_else(|| message.routing_key.clone());
        let properties = with_death(&message.properties, queue, reason, &message);
        let moved = Message {
            exchange: exchange.clone(),
            routing_key: routing_key.clone(),
            properties,
            body: message.body,
            redelivered: false,
            enqueued_at: Instant::now(),
            seq: 0,
        };
        for target in self.route(&exchange, &routing_key) {
            self.enqueue(&target, moved.clone());
            self.dispatch(&target);
        }
    }

    // ------------------------------------------------------------ time to live

    /// Dead-letter whatever has expired in `queue`.
    pub(in crate::broker::memory) fn expire(&mut self, queue: &str) {
        let expired = match self.queues.get_mut(queue) {
            Some(q) => q.take_expired(Instant::now()),
            None => return,
        };
        for message in expired {
            self.dead_letter(queue, message, "expired");
        }
    }

    /// Expire what is due in `queue`; when its next message expires, or `None` (and the
    /// queue's timer stops) when it holds none.
    pub(in crate::broker::memory) fn expire_due(&mut self, queue: &str) -> Option<Instant> {
        self.expire(queue);
        self.dispatch(queue);
        let q = self.queues.get_mut(queue)?;
        let next = q.next_expiry();
        q.expiry_scheduled = next.is_some();
        next
    }

    /// Let a later enqueue start the expiry timer of `queue`.
    pub(in crate::broker::memory) fn release_expiry(&mut self, queue: &str) {
        if let Some(q) = self.queues.get_mut(queue) {
            q.expiry_scheduled = false;
        }
    }

    /// Claim the expiry timer of `queue`; false if one runs already or none is needed.
    pub(in crate::broker::memory) fn claim_expiry(&mut self, queue: &str) -> bool {
        match self.queues.get_mut(queue) {
            Some(q) if !q.expiry_scheduled && q.ttl.is_some() && !q.ready.is_empty() => {
                q.expiry_scheduled = true;
                true
            }
            _ => false,
        }
    }
}
