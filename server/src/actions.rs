//! Changing things (admin): redrive and purge dead letters, replay recorded events, add
//! and remove stored schedules.

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use rabbitry_store::{DeadLetter, DeadLetterState, RedriveError, StoredSchedule};
use serde::{Deserialize, Serialize};

use crate::records::EventQuery;
use crate::{ApiError, AppState, Caller};

/// The waiting dead letter `seq` (404 if there is none, 409 if it is not waiting).
async fn waiting(
    state: &AppState,
    seq: Result<Path<i64>, PathRejection>,
) -> Result<DeadLetter, ApiError> {
    let Path(seq) = seq.map_err(|e| ApiError::rejected(e.status(), e.body_text()))?;
    match state.store.dead_letter(seq).await? {
        None => Err(ApiError::not_found(format!("no dead letter {seq}"))),
        Some(d) if d.state != DeadLetterState::Waiting => Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_waiting",
            format!("dead letter {seq} is {}, not waiting", d.state.as_str()),
        )),
        Some(d) => Ok(d),
    }
}

/// `POST /api/v1/dead-letters/{seq}/redrive`: send it back to its worker's queue with a
/// fresh retry budget; answers the dead letter as it now is.
pub(crate) async fn redrive(
    State(state): State<AppState>,
    caller: Caller,
    seq: Result<Path<i64>, PathRejection>,
) -> Result<Json<DeadLetter>, ApiError> {
    caller.require_admin()?;
    let letter = waiting(&state, seq).await?;
    match state.store.redrive(&state.publisher, &letter).await {
        Ok(()) => {}
        Err(RedriveError::Publish(e)) => return Err(e.into()),
        Err(RedriveError::Mark(e)) => return Err(e.into()),
        Err(other) => return Err(ApiError::bad_request(other.to_string())),
    }
    let now = state.store.dead_letter(letter.seq).await?;
    Ok(Json(now.unwrap_or(letter)))
}

/// `POST /api/v1/dead-letters/{seq}/purge`: mark it purged (it stays in the store).
pub(crate) async fn purge(
    State(state): State<AppState>,
    caller: Caller,
    seq: Result<Path<i64>, PathRejection>,
) -> Result<Json<DeadLetter>, ApiError> {
    caller.require_admin()?;
    let letter = waiting(&state, seq).await?;
    // Only from waiting: a redrive or purge that got there first wins.
    let moved = state
        .store
        .set_dead_letter_state(&[letter.seq], DeadLetterState::Purged)
        .await?;
    if moved == 0 {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_waiting",
            format!("dead letter {} is no longer waiting", letter.seq),
        ));
    }
    let now = state.store.dead_letter(letter.seq).await?;
    Ok(Json(now.unwrap_or(letter)))
}

/// A schedule to keep.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ScheduleRequest {
    name: String,
    pattern: String,
    routing_key: String,
    body: serde_json::Value,
    time_zone: Option<String>,
}

/// `POST /api/v1/schedules`: keep a schedule (`rabbitry serve` fires it within seconds).
pub(crate) async fn add_schedule(
    State(state): State<AppState>,
    caller: Caller,
    request: Result<Json<ScheduleRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<StoredSchedule>), ApiError> {
    caller.require_admin()?;
    let Json(r) = request.map_err(|e| ApiError::rejected(e.status(), e.body_text()))?;
    let body = serde_json::to_string(&r.body).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let schedule = StoredSchedule::new(&r.name, &r.pattern, &r.routing_key, &body)
        .time_zone(r.time_zone.as_deref().unwrap_or("UTC"));
    if !state.store.add_schedule(&schedule).await? {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "exists",
            format!("a schedule called '{}' exists; remove it first", r.name),
        ));
    }
    let kept = state.store.schedules().await?;
    let kept = kept
        .into_iter()
        .find(|s| s.name == r.name)
        .unwrap_or(schedule);
    Ok((StatusCode::CREATED, Json(kept)))
}

/// `DELETE /api/v1/schedules/{name}`.
pub(crate) async fn remove_schedule(
    State(state): State<AppState>,
    caller: Caller,
    name: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    caller.require_admin()?;
    let Path(name) = name.map_err(|e| ApiError::rejected(e.status(), e.body_text()))?;
    match state.store.remove_schedule(&name).await? {
        true => Ok(StatusCode::NO_CONTENT),
        false => Err(ApiError::not_found(format!("no schedule called '{name}'"))),
    }
}

/// What to replay: one event by id, or the latest matching a filter.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReplayRequest {
    message_id: Option<String>,
    #[serde(rename = "type")]
    event_type: Option<String>,
    correlation_id: Option<String>,
    /// Unix milliseconds.
    since: Option<i64>,
    limit: Option<u32>,
    /// To this worker's queue only (default: to the exchange, every subscriber).
    to_worker: Option<String>,
}

/// One event replayed.
#[derive(Debug, Serialize)]
pub(crate) struct Replayed {
    /// The original's message id.
    from: String,
    /// The copy's.
    message_id: String,
}

#[derive(Debug, Serialize)]
pub(crate) struct ReplayAnswer {
    /// Events matching the filter (more than replayed when over the limit).
    matching: u64,
    replayed: Vec<Replayed>,
}

/// `POST /api/v1/replay`: publish recorded events again as new messages marked
/// `x-replayed-from`, oldest first, to one worker's queue or to the exchange.
pub(crate) async fn replay(
    State(state): State<AppState>,
    caller: Caller,
    request: Result<Json<ReplayRequest>, JsonRejection>,
) -> Result<Json<ReplayAnswer>, ApiError> {
    caller.require_admin()?;
    let Json(r) = request.map_err(|e| ApiError::rejected(e.status(), e.body_text()))?;
    if let Some(worker) = &r.to_worker {
        rabbitry::Subscription::new(worker)
            .bind("x")
            .validate()
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
    }
    let (mut events, matching) = match &r.message_id {
        Some(id) => {
            let found: Vec<_> = state.store.event(id).await?.into_iter().collect();
            let n = found.len() as u64;
            (found, n)
        }
        None => {
            let filter = EventQuery {
                event_type: r.event_type,
                correlation_id: r.correlation_id,
                since: r.since,
                limit: r.limit,
            }
            .filter()?;
            let events = state.store.events(&filter).await?;
            (events, state.store.count_events(&filter).await?)
        }
    };
    if events.is_empty() {
        return Err(ApiError::not_found("no recorded event matches"));
    }
    // Oldest first, as they happened.
    events.sort_by_key(|e| e.seq);
    let ids = rabbitry_store::replay(&state.publisher, &events, r.to_worker.as_deref())
        .await
        .map_err(|e| ApiError::from(e.error))?;
    let replayed = events
        .iter()
        .zip(ids)
        .map(|(e, id)| Replayed {
            from: e.message_id.clone(),
            message_id: id,
        })
        .collect();
    Ok(Json(ReplayAnswer { matching, replayed }))
}
