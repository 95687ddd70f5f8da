//! An AsyncAPI 3.0 document of the topology the controlled runtimes announce: a channel for
//! the exchange and one per worker queue (AMQP channel bindings), a `receive` operation per
//! worker, a `send` operation for publishing, and a message per binding pattern, with the
//! registered JSON Schema of its event type as payload where there is one.

use std::collections::BTreeMap;

use rabbitry::Schemas;
use rabbitry::control::WorkerView;
use serde_json::{Map, Value, json};

/// An AsyncAPI identifier: letters, digits, `.`, `-`, `_`; anything else becomes `_`.
fn id(name: &str) -> String {
    name.chars()
        .map(
            |c| match c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                true => c,
                false => '_',
            },
        )
        .collect()
}

/// The document for the workers announced on `exchange`, with `schemas` as payloads.
pub fn document(exchange: &str, workers: &[WorkerView], schemas: &Schemas) -> Value {
    // One entry per worker name (several processes announce the same worker).
    let mut by_name: BTreeMap<&str, &WorkerView> = BTreeMap::new();
    for w in workers.iter().filter(|w| w.exchange == exchange) {
        by_name.entry(w.report.name.as_str()).or_insert(w);
    }
    let mut messages = Map::new();
    let mut channels = Map::new();
    let mut operations = Map::new();
    let message = |pattern: &str| {
        let payload = match pattern.contains(['*', '#']) {
            true => None,
            false => schemas.get(pattern).map(|s| s.as_json().clone()),
        };
        json!({
            "name": pattern,
            "title": pattern,
            "summary": format!("Events with routing key {pattern}"),
            "contentType": "application/json",
            "payload": payload.unwrap_or_else(|| json!({})),
        })
    };
    let exchange_id = format!("exchange.{}", id(exchange));
    let mut published = Map::new();
    for (name, w) in &by_name {
        let queue_id = format!("queue.{}", id(name));
        let mut queue_messages = Map::new();
        for pattern in &w.report.bindings {
            let message_id = id(pattern);
            messages.insert(message_id.clone(), message(pattern));
            let reference = json!({"$ref": format!("#/components/messages/{message_id}")});
            queue_messages.insert(message_id.clone(), reference.clone());
            published.insert(message_id, reference);
        }
        let refs: Vec<Value> = queue_messages
            .keys()
            .map(|m| json!({"$ref": format!("#/channels/{queue_id}/messages/{m}")}))
            .collect();
        channels.insert(
            queue_id.clone(),
            json!({
                "address": name,
                "title": format!("The queue of worker {name}"),
                "messages": queue_messages,
                "bindings": {"amqp": {
                    "is": "queue",
                    "queue": {"name": name, "durable": true, "exclusive": false, "autoDelete": false, "vhost": "/"},
                    "bindingVersion": "0.3.0"
                }}
            }),
        );
        operations.insert(
            format!("receive.{}", id(name)),
            json!({
                "action": "receive",
                "title": format!("Worker {name} handles these"),
                "summary": format!("Bound with {}", w.report.bindings.join(", ")),
                "channel": {"$ref": format!("#/channels/{queue_id}")},
                "messages": refs,
            }),
        );
    }
    let refs: Vec<Value> = published
        .keys()
        .map(|m| json!({"$ref": format!("#/channels/{exchange_id}/messages/{m}")}))
        .collect();
    channels.insert(
        exchange_id.clone(),
        json!({
            "address": exchange,
            "title": format!("The topic exchange {exchange}"),
            "messages": published,
            "bindings": {"amqp": {
                "is": "routingKey",
                "exchange": {"name": exchange, "type": "topic", "durable": true, "autoDelete": false, "vhost": "/"},
                "bindingVersion": "0.3.0"
            }}
        }),
    );
    operations.insert(
        "publish".into(),
        json!({
            "action": "send",
            "title": "Publish an event",
            "summary": "Publishers send events to the exchange with their type as routing key",
            "channel": {"$ref": format!("#/channels/{exchange_id}")},
            "messages": refs,
        }),
    );
    json!({
        "asyncapi": "3.0.0",
        "info": {
            "title": format!("rabbitry: {exchange}"),
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The topology the controlled runtimes announce: the exchange, each worker's queue and bindings, and the payload schemas registered for event types."
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages}
    })
}
