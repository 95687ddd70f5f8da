//! Workers across processes: list what every controlled runtime announces; pause, resume,
//! remove and rebind a worker in every process running it, registered in the store so
//! that a process starting later comes up the same way.

use std::time::Duration;

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use rabbitry::Subscription;
use rabbitry::control::{Applied, Controller, DesiredState, WorkerControl, WorkerView};
use serde::{Deserialize, Serialize};

use crate::{ApiError, AppState, Caller};

/// How long a change waits for the running processes to say they applied it.
const APPLY_WAIT: Duration = Duration::from_secs(3);
/// How long processes have to answer a ping before queues are deleted.
const PING_WAIT: Duration = Duration::from_millis(500);

/// `GET /api/v1/workers`.
#[derive(Debug, Serialize)]
pub(crate) struct WorkerList {
    /// Every worker of every live process.
    workers: Vec<WorkerView>,
    /// Every registered state (a worker registered as paused shows here even while no
    /// process runs it).
    registered: Vec<WorkerControl>,
}

/// A change and who applied it.
#[derive(Debug, Serialize)]
pub(crate) struct Change {
    /// The registered state now.
    control: WorkerControl,
    /// Processes running the worker that applied it, and those that had not within a few
    /// seconds (they apply it when they can: it is registered).
    #[serde(flatten)]
    applied: Applied,
    /// Queues deleted with their messages (`DELETE …?delete_queues=true`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    deleted_queues: Vec<DeletedQueue>,
}

#[derive(Debug, Serialize)]
struct DeletedQueue {
    queue: String,
    messages: u32,
}

fn controller(state: &AppState) -> Result<&Controller, ApiError> {
    state.controller.as_ref().ok_or_else(|| {
        ApiError::not_found("this server does not control workers (start it with a controller)")
    })
}

/// The worker name from the path, checked as a queue name.
fn worker_name(name: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let Path(name) = name.map_err(|e| ApiError::rejected(e.status(), e.body_text()))?;
    check(&Subscription::new(&name).bind("x"))?;
    Ok(name)
}

fn check(subscription: &Subscription) -> Result<(), ApiError> {
    subscription
        .validate()
        .map_err(|e| ApiError::bad_request(e.to_string()))
}

pub(crate) async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<WorkerList>, ApiError> {
    caller.require_read()?;
    let controller = controller(&state)?;
    Ok(Json(WorkerList {
        workers: controller.workers(),
        registered: state.store.worker_controls().await?,
    }))
}

/// Register the change, send it to every process, wait a little for them to apply it.
async fn change(
    state: &AppState,
    worker: &str,
    edit: impl Fn(&mut WorkerControl),
) -> Result<Change, ApiError> {
    let controller = controller(state)?;
    let control = state.store.change_worker_control(worker, edit).await?;
    // Registered first: a process that misses the command reads it when it (re)connects.
    controller.send(&control).await?;
    let applied = controller
        .wait_applied(worker, control.revision, APPLY_WAIT)
        .await;
    Ok(Change {
        control,
        applied,
        deleted_queues: Vec::new(),
    })
}

/// `POST /api/v1/workers/{name}/pause`.
pub(crate) async fn pause(
    State(state): State<AppState>,
    caller: Caller,
    name: Result<Path<String>, PathRejection>,
) -> Result<Json<Change>, ApiError> {
    caller.require_admin()?;
    let name = worker_name(name)?;
    Ok(Json(
        change(&state, &name, |c| c.state = DesiredState::Paused).await?,
    ))
}

/// `POST /api/v1/workers/{name}/resume` (also brings a removed worker back).
pub(crate) async fn resume(
    State(state): State<AppState>,
    caller: Caller,
    name: Result<Path<String>, PathRejection>,
) -> Result<Json<Change>, ApiError> {
    caller.require_admin()?;
    let name = worker_name(name)?;
    Ok(Json(
        change(&state, &name, |c| c.state = DesiredState::Running).await?,
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RemoveQuery {
    #[serde(default)]
    delete_queues: bool,
}

/// `DELETE /api/v1/workers/{name}[?delete_queues=true]`: stop consuming everywhere; with
/// `delete_queues`, once every process has stopped, delete its queues and their messages.
pub(crate) async fn remove(
    State(state): State<AppState>,
    caller: Caller,
    name: Result<Path<String>, PathRejection>,
    query: Result<Query<RemoveQuery>, QueryRejection>,
) -> Result<Json<Change>, ApiError> {
    caller.require_admin()?;
    let name = worker_name(name)?;
    let Query(query) = query.map_err(|e| ApiError::rejected(e.status(), e.body_text()))?;
    let controller = controller(&state)?;
    // The queues as the processes running it report them (retry tiers included).
    let mut queues: Vec<String> = controller
        .workers()
        .into_iter()
        .filter(|w| w.report.name == name)
        .flat_map(|w| w.report.queues)
        .collect();
    let mut change = change(&state, &name, |c| c.state = DesiredState::Removed).await?;
    if query.delete_queues && change.applied.pending.is_empty() {
        // Heard from everyone first: a process silent for a while must not be missed.
        controller.ping().await?;
        tokio::time::sleep(PING_WAIT).await;
        change.applied = controller
            .wait_applied(&name, change.control.revision, APPLY_WAIT)
            .await;
    }
    if query.delete_queues {
        if !change.applied.pending.is_empty() {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "still_running",
                format!(
                    "worker '{name}' is removed, but {} process(es) have not stopped it yet; \
                     its queues are kept: try again",
                    change.applied.pending.len()
                ),
            ));
        }
        queues.extend([
            name.clone(),
            format!("{name}.dlq"),
            format!("{name}.topology"),
        ]);
        queues.sort();
        queues.dedup();
        change.deleted_queues = controller
            .delete_queues(&queues)
            .await?
            .into_iter()
            .map(|(queue, messages)| DeletedQueue { queue, messages })
            .collect();
    }
    Ok(Json(change))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BindingRequest {
    pattern: String,
}

/// `POST /api/v1/workers/{name}/bindings` `{"pattern": "invoice.#"}`.
pub(crate) async fn bind(
    State(state): State<AppState>,
    caller: Caller,
    name: Result<Path<String>, PathRejection>,
    request: Result<Json<BindingRequest>, JsonRejection>,
) -> Result<Json<Change>, ApiError> {
    caller.require_admin()?;
    let name = worker_name(name)?;
    let Json(request) = request.map_err(|e| ApiError::rejected(e.status(), e.body_text()))?;
    check(&Subscription::new(&name).bind(&request.pattern))?;
    Ok(Json(
        change(&state, &name, |c| c.bind(&request.pattern)).await?,
    ))
}

/// `DELETE /api/v1/workers/{name}/bindings/{pattern}` (`#` written `%23`).
pub(crate) async fn unbind(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Json<Change>, ApiError> {
    caller.require_admin()?;
    let Path((name, pattern)) = path.map_err(|e| ApiError::rejected(e.status(), e.body_text()))?;
    check(&Subscription::new(&name).bind(&pattern))?;
    Ok(Json(change(&state, &name, |c| c.unbind(&pattern)).await?))
}
