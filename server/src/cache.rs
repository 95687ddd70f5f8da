//! Tokens recently authenticated, kept a second so that a busy client does not cost a
//! database query per request.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use rabbitry_store::ApiToken;
use tokio::time::Instant;

/// How long an authenticated token is trusted without asking the store again: a
/// revocation made by another process (the CLI) takes effect within this; one made through
/// this API at once.
pub(crate) const TRUST_FOR: Duration = Duration::from_secs(1);

/// The most tokens remembered (more are simply asked for again).
const MAX_ENTRIES: usize = 10_000;

#[derive(Default)]
pub(crate) struct TokenCache {
    /// Secret digest → token, and when it was read from the store.
    entries: Mutex<HashMap<String, (ApiToken, Instant)>>,
    /// Tokens revoked here lately, by id: a request that read one from the store just
    /// before its revocation must not put it back.
    revoked: Mutex<HashMap<String, Instant>>,
}

impl TokenCache {
    /// The token with `digest`, if it was read from the store less than [`TRUST_FOR`] ago
    /// and is still live.
    pub(crate) fn get(&self, digest: &str) -> Option<ApiToken> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let (token, at) = entries.get(digest)?;
        let live = at.elapsed() < TRUST_FOR && token.is_live(rabbitry_store::now_ms());
        live.then(|| token.clone())
    }

    pub(crate) fn put(&self, digest: String, token: ApiToken) {
        {
            let mut revoked = self.revoked.lock().unwrap_or_else(|e| e.into_inner());
            revoked.retain(|_, at| at.elapsed() < TRUST_FOR);
            if revoked.contains_key(&token.id) {
                return;
            }
        }
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= MAX_ENTRIES {
            entries.retain(|_, (_, at)| at.elapsed() < TRUST_FOR);
            if entries.len() >= MAX_ENTRIES {
                return;
            }
        }
        entries.insert(digest, (token, Instant::now()));
    }

    /// Forget the token `id` (it was just revoked here), and refuse to remember it again
    /// while a read from before the revocation may still come back.
    pub(crate) fn forget(&self, id: &str) {
        {
            let mut revoked = self.revoked.lock().unwrap_or_else(|e| e.into_inner());
            if revoked.len() < MAX_ENTRIES {
                revoked.insert(id.to_owned(), Instant::now());
            }
        }
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.retain(|_, (token, _)| token.id != id);
    }
}
