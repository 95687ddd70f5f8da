//! API tokens: who may publish, read and administer through the HTTP API. Only a SHA-256
//! hash of each token is kept; the token itself is shown once, when it is made.

use std::fmt;

use sha2::{Digest, Sha256};
use sqlx::Row;
use sqlx::any::AnyRow;
use subtle::ConstantTimeEq;

use crate::{Store, StoreError, now_ms, text};

/// What a token lets its holder do.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// Publish events whose routing key matches this topic pattern (`order.*`, `#`).
    Publish(String),
    /// Read the record: events, handlings, dead letters, schedules, sagas, workers.
    Read,
    /// Everything: registration, control, redrive, purge, tokens — and reading and
    /// publishing anything.
    Admin,
}

impl Scope {
    /// Read a scope as `rabbitry tokens create --scope` takes it: `read`, `admin` or
    /// `publish:<pattern>`.
    pub fn parse(text: &str) -> Result<Scope, StoreError> {
        match text {
            "read" => Ok(Scope::Read),
            "admin" => Ok(Scope::Admin),
            other => match other.strip_prefix("publish:") {
                Some(pattern) if valid_pattern(pattern) => Ok(Scope::Publish(pattern.to_owned())),
                Some(pattern) => Err(StoreError::Invalid(format!(
                    "scope 'publish:{pattern}': the pattern must be 1 to 255 bytes of words \
                     separated by '.', each word text, '*' or '#'"
                ))),
                None => Err(StoreError::Invalid(format!(
                    "unknown scope '{}': use read, admin or publish:<pattern>",
                    other.chars().take(64).collect::<String>()
                ))),
            },
        }
    }

    /// Whether this scope allows publishing with `routing_key`.
    pub fn allows_publish(&self, routing_key: &str) -> bool {
        match self {
            Scope::Admin => true,
            Scope::Publish(pattern) => topic_matches(pattern, routing_key),
            Scope::Read => false,
        }
    }

    /// Whether this scope allows reading.
    pub fn allows_read(&self) -> bool {
        matches!(self, Scope::Read | Scope::Admin)
    }
}

impl serde::Serialize for Scope {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Publish(pattern) => write!(f, "publish:{pattern}"),
            Scope::Read => f.write_str("read"),
            Scope::Admin => f.write_str("admin"),
        }
    }
}

fn valid_pattern(pattern: &str) -> bool {
    !pattern.is_empty()
        && pattern.len() <= 255
        && pattern.split('.').all(|word| {
            !word.is_empty()
                && (word == "*"
                    || word == "#"
                    || word
                        .chars()
                        .all(|c| !c.is_control() && !c.is_whitespace() && c != '*' && c != '#'))
        })
}

/// AMQP topic matching: `*` one word, `#` zero or more. Dynamic programming over (pattern
/// word, key word): linear in their product whatever the pattern, so no pattern can make a
/// request slow.
fn topic_matches(pattern: &str, key: &str) -> bool {
    let p: Vec<&str> = pattern.split('.').collect();
    let k: Vec<&str> = key.split('.').collect();
    // matched[j]: the pattern's words so far match the key's first j words.
    let mut matched = vec![false; k.len() + 1];
    matched[0] = true;
    for word in &p {
        let mut next = vec![false; k.len() + 1];
        for j in 0..=k.len() {
            next[j] = match *word {
                "#" => matched[j] || (j > 0 && next[j - 1]),
                "*" => j > 0 && matched[j - 1],
                w => j > 0 && matched[j - 1] && k[j - 1] == w,
            };
        }
        matched = next;
    }
    matched[k.len()]
}

/// A token as the store keeps it (never the token itself).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[non_exhaustive]
pub struct ApiToken {
    /// Its id (a UUID), to list and revoke it by.
    pub id: String,
    /// A label saying whose it is.
    pub name: String,
    /// What it allows.
    pub scopes: Vec<Scope>,
    /// Publishes per second it may make (none: unlimited).
    pub rate_per_second: Option<u32>,
    /// When it stops working (Unix ms).
    pub expires_ms: Option<i64>,
    /// When it was made (Unix ms).
    pub created_ms: i64,
    /// When it was revoked (Unix ms).
    pub revoked_ms: Option<i64>,
}

impl ApiToken {
    /// Whether it works at `now_ms`: not revoked, not expired.
    pub fn is_live(&self, now_ms: i64) -> bool {
        self.revoked_ms.is_none() && self.expires_ms.is_none_or(|at| now_ms < at)
    }

    /// Whether it allows publishing with `routing_key`.
    pub fn may_publish(&self, routing_key: &str) -> bool {
        self.scopes.iter().any(|s| s.allows_publish(routing_key))
    }

    /// Whether it allows reading.
    pub fn may_read(&self) -> bool {
        self.scopes.iter().any(Scope::allows_read)
    }

    /// Whether it allows administration.
    pub fn is_admin(&self) -> bool {
        self.scopes.contains(&Scope::Admin)
    }
}

/// What to make a token with; see [`Store::create_token`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct NewToken {
    /// A label saying whose it is.
    pub name: String,
    /// What it allows (at least one).
    pub scopes: Vec<Scope>,
    /// Publishes per second it may make.
    pub rate_per_second: Option<u32>,
    /// When it stops working (Unix ms).
    pub expires_ms: Option<i64>,
}

impl NewToken {
    /// A token called `name` with `scopes`, no rate limit, no expiry.
    pub fn new(name: impl Into<String>, scopes: Vec<Scope>) -> NewToken {
        NewToken {
            name: name.into(),
            scopes,
            rate_per_second: None,
            expires_ms: None,
        }
    }
}

/// The SHA-256 of a token's secret, in hex: what the store keeps and looks it up by.
pub fn token_digest(secret: &str) -> String {
    digest(secret)
}

/// The SHA-256 of a token, as stored.
fn digest(secret: &str) -> String {
    let hash = Sha256::digest(secret.as_bytes());
    hash.iter().map(|b| format!("{b:02x}")).collect()
}

/// A fresh secret: `rbt_` and 32 random bytes in hex.
fn fresh_secret() -> Result<String, StoreError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)
        .map_err(|e| StoreError::Invalid(format!("no randomness for a token: {e}")))?;
    Ok(format!(
        "rbt_{}",
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    ))
}

const TOKEN_COLUMNS: &str = "id, name, scopes, rate_per_second, expires_at, created_at, revoked_at";

fn token_of(row: &AnyRow) -> crate::Result<ApiToken> {
    let scopes: String = row.try_get("scopes")?;
    let scopes = scopes
        .split(' ')
        .filter(|s| !s.is_empty())
        .map(Scope::parse)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| StoreError::Corrupt(format!("token scopes: {e}")))?;
    let rate: Option<i64> = row.try_get("rate_per_second")?;
    Ok(ApiToken {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        scopes,
        // A rate that does not read is an error, never "unlimited".
        rate_per_second: rate
            .map(|r| u32::try_from(r).map_err(|_| StoreError::Corrupt(format!("token rate {r}"))))
            .transpose()?,
        expires_ms: row.try_get("expires_at")?,
        created_ms: row.try_get("created_at")?,
        revoked_ms: row.try_get("revoked_at")?,
    })
}

impl Store {
    /// Make a token: returns it as stored and the secret to give its holder — shown this
    /// once, never stored (only its SHA-256 is).
    pub async fn create_token(&self, new: &NewToken) -> crate::Result<(ApiToken, String)> {
        if new.scopes.is_empty() {
            return Err(StoreError::Invalid(
                "a token needs at least one scope".into(),
            ));
        }
        if new.name.is_empty() || new.name.len() > 100 {
            return Err(StoreError::Invalid(
                "a token's name is 1 to 100 bytes".into(),
            ));
        }
        if new.rate_per_second == Some(0) {
            return Err(StoreError::Invalid(
                "a rate of 0 per second allows nothing".into(),
            ));
        }
        let secret = fresh_secret()?;
        let token = ApiToken {
            id: uuid::Uuid::now_v7().to_string(),
            name: new.name.clone(),
            scopes: new.scopes.clone(),
            rate_per_second: new.rate_per_second,
            expires_ms: new.expires_ms,
            created_ms: now_ms(),
            revoked_ms: None,
        };
        let scopes: Vec<String> = token.scopes.iter().map(Scope::to_string).collect();
        sqlx::query(
            "INSERT INTO rabbitry_tokens (id, name, hash, scopes, rate_per_second, expires_at, \
             created_at, revoked_at) VALUES ($1, $2, $3, $4, $5, $6, $7, NULL)",
        )
        .bind(&token.id)
        .bind(&*text(&token.name))
        .bind(digest(&secret))
        .bind(scopes.join(" "))
        .bind(token.rate_per_second.map(i64::from))
        .bind(token.expires_ms)
        .bind(token.created_ms)
        .execute(self.write())
        .await?;
        Ok((token, secret))
    }

    /// Every token, newest first (revoked ones too).
    pub async fn tokens(&self) -> crate::Result<Vec<ApiToken>> {
        let sql = format!(
            "SELECT {TOKEN_COLUMNS} FROM rabbitry_tokens ORDER BY created_at DESC, id DESC"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .fetch_all(self.read())
            .await?;
        rows.iter().map(token_of).collect()
    }

    /// Revoke the token `id` (it stops working at once); whether a live one was found.
    pub async fn revoke_token(&self, id: &str) -> crate::Result<bool> {
        let done = sqlx::query(
            "UPDATE rabbitry_tokens SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL",
        )
        .bind(now_ms())
        .bind(&*text(id))
        .execute(self.write())
        .await?;
        Ok(done.rows_affected() > 0)
    }

    /// The live token whose secret is `secret`: found by its hash, compared in constant
    /// time, neither revoked nor expired. `None` for anything else.
    pub async fn authenticate(&self, secret: &str) -> crate::Result<Option<ApiToken>> {
        if secret.len() > 200 {
            return Ok(None);
        }
        self.authenticate_digest(&digest(secret)).await
    }

    /// As [`authenticate`](Store::authenticate), given the secret's [`token_digest`].
    pub async fn authenticate_digest(&self, hash: &str) -> crate::Result<Option<ApiToken>> {
        let sql = format!("SELECT {TOKEN_COLUMNS}, hash FROM rabbitry_tokens WHERE hash = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(hash)
            .fetch_optional(self.read())
            .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let stored: String = row.try_get("hash")?;
        if !bool::from(stored.as_bytes().ct_eq(hash.as_bytes())) {
            return Ok(None);
        }
        let token = token_of(&row)?;
        Ok(token.is_live(now_ms()).then_some(token))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_parse_and_match_routing_keys() {
        assert_eq!(Scope::parse("read").unwrap(), Scope::Read);
        let orders = Scope::parse("publish:order.*").unwrap();
        assert!(orders.allows_publish("order.placed"));
        assert!(!orders.allows_publish("order.placed.eu"));
        assert!(!orders.allows_publish("payment.made"));
        let all = Scope::parse("publish:#").unwrap();
        assert!(all.allows_publish("a.b.c") && !all.allows_read());
        assert!(Scope::Admin.allows_publish("x") && Scope::Admin.allows_read());
        let hash = Scope::parse("publish:#.order.#").unwrap();
        assert!(hash.allows_publish("order") && hash.allows_publish("eu.order.placed"));
        assert!(!hash.allows_publish("eu.payment"));
        let nasty = format!("{}z", "#.".repeat(60));
        let key = vec!["a"; 127].join(".");
        assert!(!topic_matches(&nasty, &key), "and quickly");
        for bad in [
            "write",
            "publish:",
            "publish:a..b",
            "publish:a b",
            "publish:ord*",
            "publish",
        ] {
            assert!(Scope::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(orders.to_string(), "publish:order.*");
    }

    #[test]
    fn secrets_are_random_and_only_their_digest_is_kept() {
        let (a, b) = (fresh_secret().unwrap(), fresh_secret().unwrap());
        assert_ne!(a, b);
        assert!(a.starts_with("rbt_") && a.len() == 68);
        assert_eq!(digest(&a).len(), 64);
        assert_ne!(digest(&a), digest(&b));
    }
}
