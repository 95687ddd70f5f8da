//! Reading the record: events and their handlings, dead letters, schedules, sagas.

use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use rabbitry_store::{
    DeadLetter, DeadLetterState, EventFilter, SagaFilter, StoredEvent, StoredSaga, StoredSchedule,
};
use serde::{Deserialize, Serialize};

use crate::{ApiError, AppState, Caller};

/// The most rows one listing returns.
const MAX_LIMIT: u32 = 1000;

fn query_error(e: QueryRejection) -> ApiError {
    ApiError::rejected(e.status(), e.body_text())
}

/// The `limit` asked for (default 100); 400 outside 1 to 1000.
fn limit(asked: Option<u32>) -> Result<u32, ApiError> {
    match asked.unwrap_or(100) {
        n @ 1..=MAX_LIMIT => Ok(n),
        n => Err(ApiError::bad_request(format!(
            "limit={n}: ask for 1 to {MAX_LIMIT}"
        ))),
    }
}

/// `GET /api/v1/events` parameters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EventQuery {
    #[serde(rename = "type")]
    pub(crate) event_type: Option<String>,
    pub(crate) correlation_id: Option<String>,
    /// Unix milliseconds.
    pub(crate) since: Option<i64>,
    pub(crate) limit: Option<u32>,
}

impl EventQuery {
    /// The store's filter for it; 400 for a limit out of bounds.
    pub(crate) fn filter(self) -> Result<EventFilter, ApiError> {
        let mut filter = EventFilter::new().limit(limit(self.limit)?);
        if let Some(t) = self.event_type {
            filter = filter.event_type(t);
        }
        if let Some(c) = self.correlation_id {
            filter = filter.correlation_id(c);
        }
        if let Some(since) = self.since {
            filter = filter.since(since);
        }
        Ok(filter)
    }
}

pub(crate) async fn events(
    State(state): State<AppState>,
    caller: Caller,
    q: Result<Query<EventQuery>, QueryRejection>,
) -> Result<Json<Vec<StoredEvent>>, ApiError> {
    caller.require_read()?;
    let Query(q) = q.map_err(query_error)?;
    Ok(Json(state.store.events(&q.filter()?).await?))
}

/// One event and every handling of it.
#[derive(Debug, Serialize)]
pub(crate) struct EventStory {
    event: Option<StoredEvent>,
    handlings: Vec<rabbitry_store::HandlingRecord>,
}

pub(crate) async fn event(
    State(state): State<AppState>,
    caller: Caller,
    message_id: Result<Path<String>, PathRejection>,
) -> Result<Json<EventStory>, ApiError> {
    caller.require_read()?;
    let Path(message_id) = message_id.map_err(|e| ApiError::rejected(e.status(), e.body_text()))?;
    let event = state.store.event(&message_id).await?;
    let handlings = state.store.handlings(&message_id).await?;
    if event.is_none() && handlings.is_empty() {
        return Err(ApiError::not_found(
            "no event or handling of that message id",
        ));
    }
    Ok(Json(EventStory { event, handlings }))
}

/// `GET /api/v1/dead-letters` parameters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DeadLetterQuery {
    worker: Option<String>,
    state: Option<StateParam>,
    limit: Option<u32>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum StateParam {
    Waiting,
    Redriven,
    Purged,
    All,
}

pub(crate) async fn dead_letters(
    State(state): State<AppState>,
    caller: Caller,
    q: Result<Query<DeadLetterQuery>, QueryRejection>,
) -> Result<Json<Vec<DeadLetter>>, ApiError> {
    caller.require_read()?;
    let Query(q) = q.map_err(query_error)?;
    let wanted = match q.state.unwrap_or(StateParam::Waiting) {
        StateParam::Waiting => Some(DeadLetterState::Waiting),
        StateParam::Redriven => Some(DeadLetterState::Redriven),
        StateParam::Purged => Some(DeadLetterState::Purged),
        StateParam::All => None,
    };
    let letters = state
        .store
        .dead_letters(q.worker.as_deref(), wanted, Some(limit(q.limit)?))
        .await?;
    Ok(Json(letters))
}

pub(crate) async fn dead_letter(
    State(state): State<AppState>,
    caller: Caller,
    seq: Result<Path<i64>, PathRejection>,
) -> Result<Json<DeadLetter>, ApiError> {
    caller.require_read()?;
    let Path(seq) = seq.map_err(|e| ApiError::rejected(e.status(), e.body_text()))?;
    match state.store.dead_letter(seq).await? {
        Some(letter) => Ok(Json(letter)),
        None => Err(ApiError::not_found(format!("no dead letter {seq}"))),
    }
}

pub(crate) async fn schedules(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<StoredSchedule>>, ApiError> {
    caller.require_read()?;
    Ok(Json(state.store.schedules().await?))
}

/// `GET /api/v1/sagas` parameters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SagaQuery {
    saga: Option<String>,
    state: Option<String>,
    limit: Option<u32>,
}

pub(crate) async fn sagas(
    State(state): State<AppState>,
    caller: Caller,
    q: Result<Query<SagaQuery>, QueryRejection>,
) -> Result<Json<Vec<StoredSaga>>, ApiError> {
    caller.require_read()?;
    let Query(q) = q.map_err(query_error)?;
    let mut filter = SagaFilter::new().limit(limit(q.limit)?);
    if let Some(saga) = q.saga {
        filter = filter.saga(saga);
    }
    if let Some(status) = q.state {
        filter = filter.status(status);
    }
    Ok(Json(state.store.sagas(&filter).await?))
}

pub(crate) async fn saga(
    State(state): State<AppState>,
    caller: Caller,
    key: Result<Path<String>, PathRejection>,
) -> Result<Json<Vec<StoredSaga>>, ApiError> {
    caller.require_read()?;
    let Path(key) = key.map_err(|e| ApiError::rejected(e.status(), e.body_text()))?;
    let found = state.store.saga_instances(&key, None).await?;
    if found.is_empty() {
        return Err(ApiError::not_found("no saga instance with that key"));
    }
    Ok(Json(found))
}
