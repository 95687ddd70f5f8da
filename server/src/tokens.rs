//! `/api/v1/tokens`: make, list and revoke tokens (admin).

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use rabbitry_store::{ApiToken, NewToken, Scope};
use serde::{Deserialize, Serialize};

use crate::{ApiError, AppState, Caller};

/// A token to make.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TokenRequest {
    name: String,
    scopes: Vec<String>,
    rate_per_second: Option<u32>,
    /// Unix milliseconds.
    expires_at: Option<i64>,
}

/// A token just made: the secret is in this answer only.
#[derive(Serialize)]
pub(crate) struct TokenMade {
    token: ApiToken,
    secret: String,
}

impl std::fmt::Debug for TokenMade {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenMade")
            .field("token", &self.token)
            .field("secret", &"***")
            .finish()
    }
}

pub(crate) async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<ApiToken>>, ApiError> {
    caller.require_admin()?;
    Ok(Json(state.store.tokens().await?))
}

pub(crate) async fn create(
    State(state): State<AppState>,
    caller: Caller,
    request: Result<Json<TokenRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<TokenMade>), ApiError> {
    caller.require_admin()?;
    let Json(request) = request.map_err(|e| ApiError::rejected(e.status(), e.body_text()))?;
    let scopes = request
        .scopes
        .iter()
        .map(|s| Scope::parse(s))
        .collect::<Result<Vec<_>, _>>()?;
    let mut new = NewToken::new(request.name, scopes);
    new.rate_per_second = request.rate_per_second;
    new.expires_ms = request.expires_at;
    let (token, secret) = state.store.create_token(&new).await?;
    Ok((StatusCode::CREATED, Json(TokenMade { token, secret })))
}

pub(crate) async fn revoke(
    State(state): State<AppState>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    caller.require_admin()?;
    let Path(id) = id.map_err(|e| ApiError::rejected(e.status(), e.body_text()))?;
    match state.store.revoke_token(&id).await? {
        true => {
            state.tokens.forget(&id);
            Ok(StatusCode::NO_CONTENT)
        }
        false => Err(ApiError::not_found("no live token with that id")),
    }
}
