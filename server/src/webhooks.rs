//! Registering webhooks: `POST /api/v1/webhooks` (the signing secret is answered once),
//! `GET /api/v1/webhooks`, `DELETE /api/v1/webhooks/{name}`.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use rabbitry::Subscription;
use rabbitry::control::DesiredState;
use rabbitry_store::{Webhook, WebhookRetry};
use serde::{Deserialize, Serialize};

use crate::webhook::{WebhookHost, webhook_queue};
use crate::{ApiError, AppState, Caller};

/// How long registration waits for a revived webhook's worker to consume again.
const APPLY_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// A webhook to register.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WebhookRequest {
    name: String,
    url: String,
    bindings: Vec<String>,
    #[serde(default)]
    retry: Option<WebhookRetry>,
}

/// A webhook just made, with its secret (shown this once).
#[derive(Debug, Serialize)]
pub(crate) struct WebhookMade {
    #[serde(flatten)]
    webhook: Webhook,
    queue: String,
    secret: String,
}

#[derive(Debug, Serialize)]
pub(crate) struct WebhookShown {
    #[serde(flatten)]
    webhook: Webhook,
    queue: String,
}

fn host(state: &AppState) -> Result<&Arc<WebhookHost>, ApiError> {
    state
        .webhooks
        .as_ref()
        .ok_or_else(|| ApiError::not_found("this server does not host webhooks"))
}

/// A name of 1 to 64 letters, digits, `-` and `_`.
fn check_name(name: &str) -> Result<(), ApiError> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    match ok {
        true => Ok(()),
        false => Err(ApiError::bad_request(
            "a webhook's name is 1 to 64 letters, digits, '-' and '_'",
        )),
    }
}

/// `POST /api/v1/webhooks`.
pub(crate) async fn create(
    State(state): State<AppState>,
    caller: Caller,
    request: Result<Json<WebhookRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<WebhookMade>), ApiError> {
    caller.require_admin()?;
    let host = host(&state)?;
    let Json(r) = request.map_err(|e| ApiError::rejected(e.status(), e.body_text()))?;
    check_name(&r.name)?;
    if r.bindings.is_empty() || r.bindings.len() > 32 {
        return Err(ApiError::bad_request("a webhook needs 1 to 32 bindings"));
    }
    let subscription = r
        .bindings
        .iter()
        .fold(Subscription::new(webhook_queue(&r.name)), |s, p| s.bind(p));
    subscription
        .validate()
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let retry = r.retry.unwrap_or_default();
    retry.check().map_err(ApiError::bad_request)?;
    // Refused now if it resolves inside; checked again at every connection.
    host.egress()
        .check(&r.url)
        .await
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let Some(webhook) = state
        .store
        .create_webhook(&r.name, &r.url, &r.bindings, retry)
        .await?
    else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "exists",
            format!("a webhook called '{}' exists; delete it first", r.name),
        ));
    };
    // A webhook of this name deleted as a worker earlier starts afresh, not removed.
    let queue = webhook_queue(&webhook.name);
    let mut revived = None;
    if let Some(control) = state.store.worker_control(&queue).await?
        && control.state == DesiredState::Removed
    {
        let control = state
            .store
            .change_worker_control(&queue, |c| c.state = DesiredState::Running)
            .await?;
        if let Some(controller) = &state.controller {
            match controller.send(&control).await {
                Ok(()) => revived = Some((controller, control.revision)),
                Err(e) => {
                    tracing::warn!(error = %e, %queue, "cannot send the webhook's running state; processes read it when they reconnect")
                }
            }
        }
    }
    // Registered: the secret must reach the caller even if starting it fails now (the
    // host starts it at its next sync).
    if let Err(e) = host.sync().await {
        tracing::warn!(error = %e, webhook = %webhook.name, "cannot start the webhook now; it starts at the next sync");
    }
    if let Some((controller, revision)) = revived {
        // Consuming again before the answer, as a new webhook is.
        controller.wait_running(&queue, revision, APPLY_WAIT).await;
    }
    let secret = webhook.secret().to_owned();
    Ok((
        StatusCode::CREATED,
        Json(WebhookMade {
            queue: webhook_queue(&webhook.name),
            webhook,
            secret,
        }),
    ))
}

/// `GET /api/v1/webhooks` (secrets are never listed).
pub(crate) async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<WebhookShown>>, ApiError> {
    caller.require_read()?;
    let webhooks = state.store.webhooks().await?;
    Ok(Json(
        webhooks
            .into_iter()
            .map(|webhook| WebhookShown {
                queue: webhook_queue(&webhook.name),
                webhook,
            })
            .collect(),
    ))
}

/// `DELETE /api/v1/webhooks/{name}`: stop delivering; its queue and the messages in it
/// stay until the worker is deleted (`DELETE /api/v1/workers/webhook.<name>?delete_queues=true`).
pub(crate) async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    name: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    caller.require_admin()?;
    let host = host(&state)?;
    let Path(name) = name.map_err(|e| ApiError::rejected(e.status(), e.body_text()))?;
    check_name(&name)?;
    if !state.store.delete_webhook(&name).await? {
        return Err(ApiError::not_found(format!("no webhook called '{name}'")));
    }
    host.sync().await?;
    Ok(StatusCode::NO_CONTENT)
}
