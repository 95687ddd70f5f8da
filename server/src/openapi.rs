//! The OpenAPI 3.1 document of the API, served at `/api/v1/openapi.json`.

use serde_json::{Value, json};

/// A routing key as the API takes it: visible ASCII without wildcards.
const ROUTING_KEY: &str = "^[!-\"$-)+-~]{1,255}$";
/// A header value as the API takes it: visible ASCII.
const VISIBLE: &str = "^[!-~]{1,255}$";

/// A response that answers with the API's error body.
fn error(description: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    })
}

/// A JSON response of `schema`.
fn ok(description: &str, schema: Value) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": schema}}})
}

fn path_param(name: &str, schema: Value, description: &str) -> Value {
    json!({"name": name, "in": "path", "required": true, "schema": schema, "description": description})
}

fn query(name: &str, schema: Value, description: &str) -> Value {
    json!({"name": name, "in": "query", "required": false, "schema": schema, "description": description})
}

/// The responses every authenticated operation can give besides its own.
fn guarded(mut responses: Value) -> Value {
    let map = responses.as_object_mut().expect("responses are an object");
    map.insert(
        "401".into(),
        error("No token, or an unknown, expired or revoked one"),
    );
    map.insert("403".into(), error("The token lacks the scope"));
    map.insert("503".into(), error("The store or the broker is away"));
    responses
}

/// The document.
pub(crate) fn document() -> Value {
    let mut document = records_and_publishing();
    let (paths, schemas) = control_plane();
    for (part, more) in [("paths", paths), ("schemas", schemas)] {
        let target = match part {
            "paths" => &mut document["paths"],
            _ => &mut document["components"]["schemas"],
        };
        if let (Some(target), Value::Object(more)) = (target.as_object_mut(), more) {
            target.extend(more);
        }
    }
    document
}

/// Publishing, the record, tokens.
fn records_and_publishing() -> Value {
    let object = json!({"type": "object"});
    let list = |items: &str| json!({"type": "array", "items": {"$ref": format!("#/components/schemas/{items}")}});
    let limit = query(
        "limit",
        json!({"type": "integer", "minimum": 1, "maximum": 1000}),
        "At most this many (default 100)",
    );
    let seq = path_param(
        "seq",
        json!({"type": "integer", "format": "int64"}),
        "The dead letter's id",
    );
    let bearer = json!([{"bearer": []}]);
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "rabbitry",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Publish events, read and replay the record, redrive dead letters, control workers across processes, register webhooks and manage tokens. Bearer tokens with scopes: publish:<pattern>, read, admin."
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error", "message"],
                    "properties": {"error": {"type": "string"}, "message": {"type": "string"}}
                },
                "Published": {
                    "type": "object",
                    "required": ["message_id"],
                    "properties": {"message_id": {"type": "string"}}
                },
                "Event": {"type": "object", "required": ["seq", "message_id", "event_type", "routing_key"]},
                "EventStory": {
                    "type": "object",
                    "required": ["event", "handlings"],
                    "properties": {"event": {"oneOf": [{"$ref": "#/components/schemas/Event"}, {"type": "null"}]}, "handlings": {"type": "array", "items": object}}
                },
                "DeadLetter": {"type": "object", "required": ["seq", "worker", "message_id", "state"]},
                "Schedule": {"type": "object", "required": ["name", "pattern", "time_zone", "routing_key", "body"]},
                "Saga": {"type": "object", "required": ["saga", "key", "status", "completed", "version"]},
                "Token": {"type": "object", "required": ["id", "name", "scopes"]},
                "TokenMade": {
                    "type": "object",
                    "required": ["token", "secret"],
                    "properties": {"token": {"$ref": "#/components/schemas/Token"}, "secret": {"type": "string"}}
                },
                "NewToken": {
                    "type": "object",
                    "required": ["name", "scopes"],
                    "additionalProperties": false,
                    "properties": {
                        "name": {"type": "string", "minLength": 1, "maxLength": 100},
                        "scopes": {"type": "array", "minItems": 1, "items": {"type": "string", "pattern": "^(read|admin|publish:[^ ]+)$"}},
                        "rate_per_second": {"type": ["integer", "null"], "minimum": 1, "maximum": 4294967295_u64},
                        "expires_at": {"type": ["integer", "null"], "description": "Unix milliseconds"}
                    }
                },
                "NewSchedule": {
                    "type": "object",
                    "required": ["name", "pattern", "routing_key", "body"],
                    "additionalProperties": false,
                    "properties": {
                        "name": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,100}$"},
                        "pattern": {"type": "string", "minLength": 9},
                        "routing_key": {"type": "string", "pattern": ROUTING_KEY},
                        "body": {},
                        "time_zone": {"type": ["string", "null"]}
                    }
                }
            }
        },
        "paths": {
            "/health": {"get": {"summary": "Alive", "responses": {"200": {"description": "ok", "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
            "/ready": {"get": {"summary": "Ready: the store answers and the broker takes a connection", "responses": {
                "200": {"description": "ready", "content": {"text/plain": {"schema": {"type": "string"}}}},
                "503": error("Not ready")
            }}},
            "/metrics": {"get": {"summary": "Prometheus metrics of the process", "responses": {
                "200": {"description": "Metrics", "content": {"text/plain": {"schema": {"type": "string"}}}},
                "404": error("This process keeps no metrics")
            }}},
            "/api/v1/openapi.json": {"get": {"summary": "This document", "responses": {"200": ok("The OpenAPI document", object.clone())}}},
            "/api/v1/events": {"get": {
                "summary": "Recorded events, oldest first (the latest `limit`)",
                "security": bearer,
                "parameters": [
                    query("type", json!({"type": "string"}), "Only this event type"),
                    query("correlation_id", json!({"type": "string"}), "Only this correlation id"),
                    query("since", json!({"type": "integer", "format": "int64"}), "Recorded since (Unix ms)"),
                    limit.clone()
                ],
                "responses": guarded(json!({"200": ok("Events", list("Event")), "400": error("A malformed query")}))
            }},
            "/api/v1/events/{key}": {
                "parameters": [path_param("key", json!({"type": "string", "pattern": ROUTING_KEY}), "A message id (GET) or a routing key (POST): visible ASCII, no wildcards")],
                "get": {
                    "summary": "One event and every handling of it",
                    "security": bearer,
                    "responses": guarded(json!({"200": ok("The event and its handlings", json!({"$ref": "#/components/schemas/EventStory"})), "400": error("A malformed path"), "404": error("Nothing recorded for that message id")}))
                },
                "post": {
                    "summary": "Publish the JSON body with this routing key, confirmed",
                    "security": bearer,
                    "parameters": [
                        {"name": "Idempotency-Key", "in": "header", "required": false, "schema": {"type": "string", "pattern": VISIBLE}, "description": "Becomes the message id"},
                        {"name": "X-Correlation-Id", "in": "header", "required": false, "schema": {"type": "string", "pattern": VISIBLE}}
                    ],
                    "requestBody": {"required": true, "content": {"application/json": {"schema": {}}}},
                    "responses": guarded(json!({
                        "202": ok("Published", json!({"$ref": "#/components/schemas/Published"})),
                        "400": error("Not JSON, or a bad routing key or header"),
                        "413": error("Over the body limit"),
                        "422": error("No queue is bound for the routing key"),
                        "429": error("Over the token's rate (see Retry-After)")
                    }))
                }
            },
            "/api/v1/dead-letters": {"get": {
                "summary": "Dead letters kept in the store",
                "security": bearer,
                "parameters": [
                    query("worker", json!({"type": "string"}), "Only this worker's"),
                    query("state", json!({"type": "string", "enum": ["waiting", "redriven", "purged", "all"]}), "Default: waiting"),
                    limit.clone()
                ],
                "responses": guarded(json!({"200": ok("Dead letters", list("DeadLetter")), "400": error("A malformed query")}))
            }},
            "/api/v1/dead-letters/{seq}": {"get": {
                "summary": "One dead letter",
                "security": bearer,
                "parameters": [seq.clone()],
                "responses": guarded(json!({"200": ok("The dead letter", json!({"$ref": "#/components/schemas/DeadLetter"})), "400": error("A malformed id"), "404": error("No such dead letter")}))
            }},
            "/api/v1/dead-letters/{seq}/redrive": {"post": {
                "summary": "Send it back to its worker's queue with a fresh retry budget (admin)",
                "security": bearer,
                "parameters": [seq.clone()],
                "responses": guarded(json!({"200": ok("Redriven", json!({"$ref": "#/components/schemas/DeadLetter"})), "400": error("A malformed id"), "404": error("No such dead letter"), "409": error("Not waiting"), "422": error("Its worker's queue is gone")}))
            }},
            "/api/v1/dead-letters/{seq}/purge": {"post": {
                "summary": "Mark it purged (admin)",
                "security": bearer,
                "parameters": [seq],
                "responses": guarded(json!({"200": ok("Purged", json!({"$ref": "#/components/schemas/DeadLetter"})), "400": error("A malformed id"), "404": error("No such dead letter"), "409": error("Not waiting")}))
            }},
            "/api/v1/schedules": {
                "get": {"summary": "Stored cron schedules", "security": bearer, "responses": guarded(json!({"200": ok("Schedules", list("Schedule"))}))},
                "post": {
                    "summary": "Keep a schedule (admin)",
                    "security": bearer,
                    "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/NewSchedule"}}}},
                    "responses": guarded(json!({"201": ok("Kept", json!({"$ref": "#/components/schemas/Schedule"})), "400": error("Invalid"), "409": error("The name exists"), "413": error("Over the body limit"), "415": error("Not JSON"), "422": error("A body of the wrong shape")}))
                }
            },
            "/api/v1/schedules/{name}": {"delete": {
                "summary": "Remove a stored schedule (admin)",
                "security": bearer,
                "parameters": [path_param("name", json!({"type": "string"}), "The schedule")],
                "responses": guarded(json!({"204": {"description": "Removed"}, "400": error("A malformed path"), "404": error("No such schedule")}))
            }},
            "/api/v1/sagas": {"get": {
                "summary": "Saga instances, the latest changed first",
                "security": bearer,
                "parameters": [
                    query("saga", json!({"type": "string"}), "Only this saga's"),
                    query("state", json!({"type": "string"}), "Only this status label"),
                    limit
                ],
                "responses": guarded(json!({"200": ok("Instances", list("Saga")), "400": error("A malformed query")}))
            }},
            "/api/v1/sagas/{key}": {"get": {
                "summary": "The instances with one correlation key",
                "security": bearer,
                "parameters": [path_param("key", json!({"type": "string"}), "The correlation key")],
                "responses": guarded(json!({"200": ok("Instances", list("Saga")), "400": error("A malformed path"), "404": error("None")}))
            }},
            "/api/v1/tokens": {
                "get": {"summary": "Every token, never its secret (admin)", "security": bearer, "responses": guarded(json!({"200": ok("Tokens", list("Token"))}))},
                "post": {
                    "summary": "Make a token; the secret is in this answer only (admin)",
                    "security": bearer,
                    "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/NewToken"}}}},
                    "responses": guarded(json!({"201": ok("Made", json!({"$ref": "#/components/schemas/TokenMade"})), "400": error("Invalid"), "413": error("Over the body limit"), "415": error("Not JSON"), "422": error("A body of the wrong shape")}))
                }
            },
            "/api/v1/tokens/{id}": {"delete": {
                "summary": "Revoke a token (admin)",
                "security": bearer,
                "parameters": [path_param("id", json!({"type": "string"}), "The token's id")],
                "responses": guarded(json!({"204": {"description": "Revoked"}, "400": error("A malformed path"), "404": error("No live token with that id")}))
            }}
        }
    })
}

/// Workers across processes, webhooks and replay: their paths and schemas.
fn control_plane() -> (Value, Value) {
    let bearer = json!([{"bearer": []}]);
    let name = path_param("name", json!({"type": "string"}), "The worker (its queue)");
    let body = |schema: &str| json!({"required": true, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}});
    let change = ok(
        "Registered and sent; who applied it",
        json!({"$ref": "#/components/schemas/WorkerChange"}),
    );
    let no_controller = error("A malformed name, or this server does not control workers");
    let shaped = |mut responses: Value| {
        let map = responses.as_object_mut().expect("responses are an object");
        for (status, what) in [
            ("413", "Over the body limit"),
            ("415", "Not JSON"),
            ("422", "A body of the wrong shape"),
        ] {
            map.entry(status).or_insert_with(|| error(what));
        }
        guarded(responses)
    };
    let paths = json!({
        "/api/v1/workers": {"get": {
            "summary": "Every worker of every controlled process, and the registered states",
            "security": bearer,
            "responses": guarded(json!({"200": ok("Workers", json!({"$ref": "#/components/schemas/WorkerList"})), "404": error("This server does not control workers")}))
        }},
        "/api/v1/workers/{name}": {"delete": {
            "summary": "Stop it in every process and register it removed; with delete_queues, delete its queues once all stopped (admin)",
            "security": bearer,
            "parameters": [name.clone(), query("delete_queues", json!({"type": "boolean"}), "Also delete its queues and their messages")],
            "responses": guarded(json!({"200": change.clone(), "400": error("A malformed name or query"), "404": no_controller.clone(), "409": error("Some process has not stopped it yet: queues kept")}))
        }},
        "/api/v1/workers/{name}/pause": {"post": {
            "summary": "Stop consuming in every process, and in processes that start later (admin)",
            "security": bearer,
            "parameters": [name.clone()],
            "responses": guarded(json!({"200": change.clone(), "400": error("A malformed name"), "404": no_controller.clone()}))
        }},
        "/api/v1/workers/{name}/resume": {"post": {
            "summary": "Consume again in every process (admin)",
            "security": bearer,
            "parameters": [name.clone()],
            "responses": guarded(json!({"200": change.clone(), "400": error("A malformed name"), "404": no_controller.clone()}))
        }},
        "/api/v1/workers/{name}/bindings": {"post": {
            "summary": "Bind its queue with one more pattern (admin)",
            "security": bearer,
            "parameters": [name.clone()],
            "requestBody": body("Binding"),
            "responses": shaped(json!({"200": change.clone(), "400": error("A malformed name or pattern"), "404": no_controller.clone()}))
        }},
        "/api/v1/workers/{name}/bindings/{pattern}": {"delete": {
            "summary": "Unbind a pattern, its own or an added one (admin; # is written %23)",
            "security": bearer,
            "parameters": [name, path_param("pattern", json!({"type": "string"}), "The topic pattern")],
            "responses": guarded(json!({"200": change, "400": error("A malformed name or pattern"), "404": no_controller}))
        }},
        "/api/v1/webhooks": {
            "get": {"summary": "Registered webhooks, never their secrets", "security": bearer, "responses": guarded(json!({"200": ok("Webhooks", json!({"type": "array", "items": {"$ref": "#/components/schemas/Webhook"}}))}))},
            "post": {
                "summary": "Register a webhook and start it; the signing secret is in this answer only (admin)",
                "security": bearer,
                "requestBody": body("NewWebhook"),
                "responses": shaped(json!({"201": ok("Registered", json!({"$ref": "#/components/schemas/WebhookMade"})), "400": error("Invalid, or its URL resolves to an address it may not reach"), "404": error("This server does not host webhooks"), "409": error("The name exists")}))
            }
        },
        "/api/v1/webhooks/{name}": {"delete": {
            "summary": "Stop and forget a webhook; its queue stays (admin)",
            "security": bearer,
            "parameters": [path_param("name", json!({"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"}), "The webhook")],
            "responses": guarded(json!({"204": {"description": "Deleted"}, "400": error("A malformed name"), "404": error("No such webhook, or this server hosts none")}))
        }},
        "/api/v1/asyncapi.json": {"get": {
            "summary": "The AsyncAPI 3.0 document of the topology the controlled runtimes announce",
            "security": bearer,
            "responses": guarded(json!({"200": ok("The AsyncAPI document", json!({"type": "object"})), "404": error("This server does not control workers")}))
        }},
        "/api/v1/replay": {"post": {
            "summary": "Publish recorded events again as new messages marked x-replayed-from, oldest first, to one worker's queue or to the exchange (admin)",
            "security": bearer,
            "requestBody": body("ReplayRequest"),
            "responses": shaped(json!({"200": ok("Replayed", json!({"$ref": "#/components/schemas/ReplayAnswer"})), "400": error("Invalid"), "404": error("No recorded event matches"), "422": error("A body of the wrong shape, or no queue named to_worker")}))
        }}
    });
    let patterns = json!({"type": "array", "items": {"type": "string"}});
    let schemas = json!({
        "WorkerList": {
            "type": "object",
            "required": ["workers", "registered"],
            "properties": {
                "workers": {"type": "array", "items": {"type": "object", "required": ["name", "state", "process", "host", "pid", "bindings", "in_flight", "settled_per_second"]}},
                "registered": {"type": "array", "items": {"$ref": "#/components/schemas/WorkerControl"}}
            }
        },
        "WorkerControl": {
            "type": "object",
            "required": ["worker", "state", "bindings_added", "bindings_removed", "revision"],
            "properties": {
                "worker": {"type": "string"},
                "state": {"enum": ["running", "paused", "removed"]},
                "bindings_added": patterns.clone(),
                "bindings_removed": patterns.clone(),
                "revision": {"type": "integer"}
            }
        },
        "WorkerChange": {
            "type": "object",
            "required": ["control", "applied", "pending"],
            "properties": {
                "control": {"$ref": "#/components/schemas/WorkerControl"},
                "applied": patterns.clone(),
                "pending": patterns.clone(),
                "deleted_queues": {"type": "array", "items": {"type": "object", "required": ["queue", "messages"]}}
            }
        },
        "Binding": {
            "type": "object",
            "required": ["pattern"],
            "additionalProperties": false,
            "properties": {"pattern": {"type": "string"}}
        },
        "WebhookRetry": {
            "type": "object",
            "additionalProperties": false,
            "properties": {
                "max_attempts": {"type": "integer", "minimum": 1, "maximum": 50},
                "initial_delay_ms": {"type": "integer", "minimum": 100, "maximum": 86400000},
                "max_delay_ms": {"type": "integer", "minimum": 100, "maximum": 86400000}
            }
        },
        "NewWebhook": {
            "type": "object",
            "required": ["name", "url", "bindings"],
            "additionalProperties": false,
            "properties": {
                "name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
                "url": {"type": "string", "pattern": "^https?://", "maxLength": 2048},
                "bindings": {"type": "array", "minItems": 1, "maxItems": 32, "items": {"type": "string"}},
                "retry": {"oneOf": [{"$ref": "#/components/schemas/WebhookRetry"}, {"type": "null"}]}
            }
        },
        "Webhook": {
            "type": "object",
            "required": ["name", "url", "bindings", "retry", "queue"],
            "properties": {
                "name": {"type": "string"},
                "url": {"type": "string"},
                "bindings": patterns.clone(),
                "retry": {"$ref": "#/components/schemas/WebhookRetry"},
                "queue": {"type": "string"}
            }
        },
        "WebhookMade": {
            "allOf": [{"$ref": "#/components/schemas/Webhook"}, {"type": "object", "required": ["secret"], "properties": {"secret": {"type": "string"}}}]
        },
        "ReplayRequest": {
            "type": "object",
            "additionalProperties": false,
            "properties": {
                "message_id": {"type": ["string", "null"]},
                "type": {"type": ["string", "null"]},
                "correlation_id": {"type": ["string", "null"]},
                "since": {"type": ["integer", "null"], "description": "Unix milliseconds"},
                "limit": {"type": ["integer", "null"], "minimum": 1, "maximum": 1000},
                "to_worker": {"type": ["string", "null"]}
            }
        },
        "ReplayAnswer": {
            "type": "object",
            "required": ["matching", "replayed"],
            "properties": {
                "matching": {"type": "integer"},
                "replayed": {"type": "array", "items": {"type": "object", "required": ["from", "message_id"]}}
            }
        }
    });
    (paths, schemas)
}
