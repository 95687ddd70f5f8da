//! Registered worker states (control across processes) and webhook subscriptions.

use base64::Engine;
use base64::prelude::BASE64_STANDARD;
use futures_util::future::BoxFuture;
use rabbitry::control::{ControlRegistry, DesiredState, RegistryError, WorkerControl};
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::{Store, StoreError, now_ms, text};

/// Attempts at a read-modify-write of one worker's state before giving up.
const CHANGE_ATTEMPTS: usize = 16;

fn state_of(text: &str) -> crate::Result<DesiredState> {
    match text {
        "running" => Ok(DesiredState::Running),
        "paused" => Ok(DesiredState::Paused),
        "removed" => Ok(DesiredState::Removed),
        other => Err(StoreError::Corrupt(format!("worker state '{other}'"))),
    }
}

fn patterns_of(row: &AnyRow, column: &str) -> crate::Result<Vec<String>> {
    let json: String = row.try_get(column)?;
    serde_json::from_str(&json).map_err(|e| StoreError::Corrupt(format!("{column}: {e}")))
}

fn control_of(row: &AnyRow) -> crate::Result<WorkerControl> {
    let state: String = row.try_get("state")?;
    let mut control = WorkerControl::new(row.try_get::<String, _>("worker")?);
    control.state = state_of(&state)?;
    control.bindings_added = patterns_of(row, "bindings_added")?;
    control.bindings_removed = patterns_of(row, "bindings_removed")?;
    control.revision = row.try_get("revision")?;
    Ok(control)
}

const CONTROL_COLUMNS: &str = "worker, state, bindings_added, bindings_removed, revision";

impl Store {
    /// Every registered worker state, by worker.
    pub async fn worker_controls(&self) -> crate::Result<Vec<WorkerControl>> {
        let sql = format!("SELECT {CONTROL_COLUMNS} FROM rabbitry_worker_controls ORDER BY worker");
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .fetch_all(self.read())
            .await?;
        rows.iter().map(control_of).collect()
    }

    /// The registered state of `worker`, if one was registered.
    pub async fn worker_control(&self, worker: &str) -> crate::Result<Option<WorkerControl>> {
        let sql =
            format!("SELECT {CONTROL_COLUMNS} FROM rabbitry_worker_controls WHERE worker = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(&*text(worker))
            .fetch_optional(self.read())
            .await?;
        row.as_ref().map(control_of).transpose()
    }

    /// Change the registered state of `worker` with `edit` and store it at the next
    /// revision; returns it, to send to the running processes. Concurrent changes are
    /// serialised by the revision: a change that lost the race is read again and re-applied.
    pub async fn change_worker_control(
        &self,
        worker: &str,
        edit: impl Fn(&mut WorkerControl),
    ) -> crate::Result<WorkerControl> {
        for _ in 0..CHANGE_ATTEMPTS {
            let held = self.worker_control(worker).await?;
            let mut control = held.clone().unwrap_or_else(|| WorkerControl::new(worker));
            edit(&mut control);
            control.worker = worker.to_owned();
            control.revision += 1;
            let added = serde_json::to_string(&control.bindings_added)
                .map_err(|e| StoreError::Invalid(e.to_string()))?;
            let removed = serde_json::to_string(&control.bindings_removed)
                .map_err(|e| StoreError::Invalid(e.to_string()))?;
            let done = match held {
                None => {
                    sqlx::query(
                        "INSERT INTO rabbitry_worker_controls (worker, state, bindings_added, \
                     bindings_removed, revision, updated_at) VALUES ($1, $2, $3, $4, $5, $6) \
                     ON CONFLICT (worker) DO NOTHING",
                    )
                    .bind(&*text(worker))
                    .bind(control.state.as_str())
                    .bind(&*text(&added))
                    .bind(&*text(&removed))
                    .bind(control.revision)
                    .bind(now_ms())
                    .execute(self.write())
                    .await?
                }
                Some(held) => {
                    sqlx::query(
                        "UPDATE rabbitry_worker_controls SET state = $1, bindings_added = $2, \
                     bindings_removed = $3, revision = $4, updated_at = $5 \
                     WHERE worker = $6 AND revision = $7",
                    )
                    .bind(control.state.as_str())
                    .bind(&*text(&added))
                    .bind(&*text(&removed))
                    .bind(control.revision)
                    .bind(now_ms())
                    .bind(&*text(worker))
                    .bind(held.revision)
                    .execute(self.write())
                    .await?
                }
            };
            if done.rows_affected() == 1 {
                return Ok(control);
            }
        }
        Err(StoreError::Invalid(format!(
            "worker '{worker}' is being changed by others all the time; try again"
        )))
    }
}

impl ControlRegistry for Store {
    fn controls(&self) -> BoxFuture<'_, Result<Vec<WorkerControl>, RegistryError>> {
        Box::pin(async move { Ok(self.worker_controls().await?) })
    }
}

/// How a webhook's failed deliveries are retried: through the broker's retry tiers,
/// `initial_delay_ms` doubling up to `max_delay_ms`, `max_attempts` in all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookRetry {
    /// Attempts in all, the first included (1..=50).
    pub max_attempts: u32,
    /// Wait before the first retry, in milliseconds (100..=86 400 000).
    pub initial_delay_ms: u64,
    /// Longest wait between attempts, in milliseconds (≥ the initial delay, ≤ 1 day).
    pub max_delay_ms: u64,
}

impl Default for WebhookRetry {
    fn default() -> Self {
        WebhookRetry {
            max_attempts: 8,
            initial_delay_ms: 1_000,
            max_delay_ms: 300_000,
        }
    }
}

impl WebhookRetry {
    /// Why it is out of bounds, if it is.
    pub fn check(&self) -> Result<(), String> {
        const DAY_MS: u64 = 86_400_000;
        if !(1..=50).contains(&self.max_attempts) {
            return Err("retry.max_attempts is 1 to 50".into());
        }
        if !(100..=DAY_MS).contains(&self.initial_delay_ms) {
            return Err("retry.initial_delay_ms is 100 to 86400000".into());
        }
        if self.max_delay_ms < self.initial_delay_ms || self.max_delay_ms > DAY_MS {
            return Err("retry.max_delay_ms is initial_delay_ms to 86400000".into());
        }
        Ok(())
    }
}

/// A webhook subscription as the store keeps it.
#[derive(Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct Webhook {
    /// Its name, also its queue's.
    pub name: String,
    /// Where each message is POSTed.
    pub url: String,
    /// The routing-key patterns its queue is bound with.
    pub bindings: Vec<String>,
    /// How failed deliveries are retried.
    pub retry: WebhookRetry,
    /// When it was made (Unix ms).
    pub created_ms: i64,
    #[serde(skip)]
    secret: String,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("name", &self.name)
            .field("url", &self.url)
            .field("bindings", &self.bindings)
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

impl Webhook {
    /// The signing secret, `whsec_<base64>` (Standard Webhooks).
    pub fn secret(&self) -> &str {
        &self.secret
    }
}

fn webhook_of(row: &AnyRow) -> crate::Result<Webhook> {
    let retry: String = row.try_get("retry")?;
    Ok(Webhook {
        name: row.try_get("name")?,
        url: row.try_get("url")?,
        bindings: patterns_of(row, "bindings")?,
        retry: serde_json::from_str(&retry)
            .map_err(|e| StoreError::Corrupt(format!("webhook retry: {e}")))?,
        created_ms: row.try_get("created_at")?,
        secret: row.try_get("secret")?,
    })
}

impl Store {
    /// Register a webhook with a fresh signing secret; `Ok(None)` if one with its name
    /// exists. The caller validates the name, URL and bindings.
    pub async fn create_webhook(
        &self,
        name: &str,
        url: &str,
        bindings: &[String],
        retry: WebhookRetry,
    ) -> crate::Result<Option<Webhook>> {
        retry.check().map_err(StoreError::Invalid)?;
        let mut key = [0u8; 32];
        getrandom::fill(&mut key)
            .map_err(|e| StoreError::Invalid(format!("no randomness for a secret: {e}")))?;
        let webhook = Webhook {
            name: name.to_owned(),
            url: url.to_owned(),
            bindings: bindings.to_vec(),
            retry,
            created_ms: now_ms(),
            secret: format!("whsec_{}", BASE64_STANDARD.encode(key)),
        };
        let done = sqlx::query(
            "INSERT INTO rabbitry_webhooks (name, url, bindings, retry, secret, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (name) DO NOTHING",
        )
        .bind(&*text(name))
        .bind(&*text(url))
        .bind(serde_json::to_string(bindings).map_err(|e| StoreError::Invalid(e.to_string()))?)
        .bind(serde_json::to_string(&retry).map_err(|e| StoreError::Invalid(e.to_string()))?)
        .bind(&webhook.secret)
        .bind(webhook.created_ms)
        .execute(self.write())
        .await?;
        Ok((done.rows_affected() == 1).then_some(webhook))
    }

    /// Every webhook, by name.
    pub async fn webhooks(&self) -> crate::Result<Vec<Webhook>> {
        let rows = sqlx::query(
            "SELECT name, url, bindings, retry, secret, created_at FROM rabbitry_webhooks \
             ORDER BY name",
        )
        .fetch_all(self.read())
        .await?;
        rows.iter().map(webhook_of).collect()
    }

    /// Forget the webhook `name`; whether there was one.
    pub async fn delete_webhook(&self, name: &str) -> crate::Result<bool> {
        let done = sqlx::query("DELETE FROM rabbitry_webhooks WHERE name = $1")
            .bind(&*text(name))
            .execute(self.write())
            .await?;
        Ok(done.rows_affected() > 0)
    }
}
