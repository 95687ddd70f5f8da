//! Who is calling: the bearer token of a request, checked against the store.

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;
use rabbitry_store::ApiToken;

use crate::{ApiError, AppState};

/// The token a request presented, live and known to the store. Handlers take it as an
/// extractor and ask it for the scope they need; a request without one, or with a bad,
/// expired or revoked one, is answered 401 before the handler runs.
#[derive(Debug, Clone)]
pub struct Caller(pub ApiToken);

impl Caller {
    /// 403 unless the token may read.
    pub fn require_read(&self) -> Result<(), ApiError> {
        match self.0.may_read() {
            true => Ok(()),
            false => Err(ApiError::forbidden("this token has no 'read' scope")),
        }
    }

    /// 403 unless the token is an administrator's.
    pub fn require_admin(&self) -> Result<(), ApiError> {
        match self.0.is_admin() {
            true => Ok(()),
            false => Err(ApiError::forbidden("this token has no 'admin' scope")),
        }
    }

    /// 403 unless the token may publish with `routing_key`.
    pub fn require_publish(&self, routing_key: &str) -> Result<(), ApiError> {
        match self.0.may_publish(routing_key) {
            true => Ok(()),
            false => Err(ApiError::forbidden(
                "this token has no 'publish' scope matching that routing key",
            )),
        }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Caller, ApiError> {
        let Some(value) = parts.headers.get(header::AUTHORIZATION) else {
            return Err(ApiError::unauthorized(
                "no token: send 'Authorization: Bearer <token>' (make one with `rabbitry tokens create`)",
            ));
        };
        let secret = value
            .to_str()
            .ok()
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                ApiError::unauthorized("the Authorization header is not 'Bearer <token>'")
            })?;
        if secret.len() > 200 {
            return Err(ApiError::unauthorized("unknown, expired or revoked token"));
        }
        let digest = rabbitry_store::token_digest(secret);
        if let Some(token) = state.tokens.get(&digest) {
            return Ok(Caller(token));
        }
        match state.store.authenticate_digest(&digest).await? {
            Some(token) => {
                state.tokens.put(digest, token.clone());
                Ok(Caller(token))
            }
            None => Err(ApiError::unauthorized("unknown, expired or revoked token")),
        }
    }
}
