//! Publishing and routing, dead-lettering, and time-to-live.

use lapin::BasicProperties;
use lapin::protocol::AMQPSoftError;
use lapin::types::{AMQPValue, FieldTable};
use tokio::time::Instant;

use super::super::queue::{Message, with_death};
use super::{State, soft};
use crate::broker::Confirm;
use crate::topic;

impl State {
    /// The queues a message published to `exchange` with `key` and `headers` reaches,
    /// following exchange-to-exchange bindings; each queue once.
    pub(in crate::broker::memory) fn route(
        &self,
        exchange: &str,
        key: &str,
        headers: Option<&FieldTable>,
    ) -> Vec<String> {
        if exchange.is_empty() {
            return self
                .queues
                .contains_key(key)
                .then(|| key.to_owned())
                .into_iter()
                .collect();
        }
        let mut queues: Vec<String> = Vec::new();
        let mut visited: Vec<&str> = Vec::new();
        let mut next: Vec<&str> = vec![exchange];
        while let Some(x) = next.pop() {
            if visited.contains(&x) {
                continue;
            }
            visited.push(x);
            let kind = self.exchanges.get(x).map(String::as_str);
            let keyed = self
                .bindings
                .iter()
                .filter(|(bx, _, pattern)| {
                    bx == x
                        && match kind {
                            Some("topic") => topic::matches(pattern, key),
                            Some("fanout") => true,
                            Some("headers") => false,
                            _ => pattern == key,
                        }
                })
                .map(|(_, q, _)| q.as_str());
            let matched = self
                .header_bindings
                .iter()
                .filter(|b| b.exchange == x && headers_match(&b.matching, headers));
            for q in keyed {
                if !queues.iter().any(|known| known == q) {
                    queues.push(q.to_owned());
                }
            }
            for b in matched {
                if b.to_exchange {
                    next.push(&b.destination);
                } else if !queues.contains(&b.destination) {
                    queues.push(b.destination.clone());
                }
            }
        }
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
        let queues = self.route(exchange, routing_key, message.properties.headers().as_ref());
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
        for target in self.route(&exchange, &routing_key, moved.properties.headers().as_ref()) {
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

/// Whether `headers` hold every `(key, value)` of a binding (`x-match = all`; values
/// compared as strings, as RabbitMQ compares a long string header with a string argument).
fn headers_match(matching: &[(String, String)], headers: Option<&FieldTable>) -> bool {
    let Some(headers) = headers else {
        return matching.is_empty();
    };
    matching
        .iter()
        .all(|(k, v)| match headers.inner().get(k.as_str()) {
            Some(AMQPValue::LongString(s)) => s.as_bytes() == v.as_bytes(),
            Some(AMQPValue::ShortString(s)) => s.as_str() == v,
            _ => false,
        })
}
