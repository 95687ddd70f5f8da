//! `POST /api/v1/events/{routing_key}`: publish the request's JSON body, confirmed.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use rabbitry::lapin::BasicProperties;
use serde::Serialize;

use crate::{ApiError, AppState, Caller};

/// The answer to a publish.
#[derive(Debug, Serialize)]
pub(crate) struct Published {
    message_id: String,
}

/// A header's value as text, if it is there (400 if it is not valid text).
fn header<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ApiError> {
    match headers.get(name) {
        None => Ok(None),
        Some(value) => value
            .to_str()
            .map(Some)
            .map_err(|_| ApiError::bad_request(format!("the {name} header is not text"))),
    }
}

/// An AMQP short string for `what` as the API takes it: 1 to 255 visible ASCII
/// characters (what a header can carry, and what the OpenAPI document says).
fn short(what: &str, value: &str) -> Result<(), ApiError> {
    let fits =
        !value.is_empty() && value.len() <= 255 && value.bytes().all(|b| b.is_ascii_graphic());
    match fits {
        true => Ok(()),
        false => Err(ApiError::bad_request(format!(
            "the {what} must be 1 to 255 visible ASCII characters (no spaces)"
        ))),
    }
}

pub(crate) async fn publish(
    State(state): State<AppState>,
    caller: Caller,
    routing_key: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Published>), ApiError> {
    let Path(routing_key) =
        routing_key.map_err(|e| ApiError::rejected(e.status(), e.body_text()))?;
    short("routing key", &routing_key)?;
    if routing_key.contains(['*', '#']) {
        return Err(ApiError::bad_request(
            "a routing key to publish with has no wildcards ('*', '#')",
        ));
    }
    caller.require_publish(&routing_key)?;
    if let Some(rate) = caller.0.rate_per_second {
        state
            .limits
            .check(&caller.0.id, rate)
            .map_err(ApiError::too_many)?;
    }
    let body = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("the body is over the limit of {} bytes", state.max_body),
        ),
        status => ApiError::new(status, "bad_body", e.body_text()),
    })?;
    match state.schemas.get(&routing_key) {
        // Registered for this event type: the body must satisfy it.
        Some(schema) => {
            let json: serde_json::Value = serde_json::from_slice(&body)
                .map_err(|e| ApiError::bad_request(format!("the body is not JSON: {e}")))?;
            schema.check(&json).map_err(|violations| {
                ApiError::bad_request(format!(
                    "the body does not match the schema of '{routing_key}': {violations}"
                ))
            })?;
        }
        None => {
            if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&body) {
                return Err(ApiError::bad_request(format!("the body is not JSON: {e}")));
            }
        }
    }
    let id = match header(&headers, "idempotency-key")? {
        Some(key) => {
            short("Idempotency-Key", key)?;
            key.to_owned()
        }
        None => uuid::Uuid::now_v7().to_string(),
    };
    let mut properties = BasicProperties::default()
        .with_message_id(id.as_str().into())
        .with_type(routing_key.as_str().into())
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_timestamp(crate::unix_seconds())
        .with_app_id("rabbitry-server".into());
    if let Some(correlation) = header(&headers, "x-correlation-id")? {
        short("X-Correlation-Id", correlation)?;
        properties = properties.with_correlation_id(correlation.into());
    }
    let exchange = state.publisher.exchange().to_owned();
    state
        .publisher
        .publish_raw(&exchange, &routing_key, &body, properties)
        .await?;
    Ok((StatusCode::ACCEPTED, Json(Published { message_id: id })))
}
