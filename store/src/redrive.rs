//! Sending a dead letter back to the worker that gave up on it.

use std::fmt;
use std::time::SystemTime;

use rabbitry::lapin::BasicProperties;
use rabbitry::lapin::types::{AMQPValue, FieldTable};
use rabbitry::{Publisher, headers};

use crate::{DeadLetter, DeadLetterState, Store, StoreError};

/// The header a redriven message carries: when it was sent back (RFC 3339).
pub const REDRIVEN_AT: &str = "x-redriven-at";

/// Why a redrive did not complete.
#[derive(Debug)]
#[non_exhaustive]
pub enum RedriveError {
    /// The copy was not published (nothing changed; try again).
    Publish(rabbitry::Error),
    /// The copy was published but the dead letter could not be marked redriven: another
    /// redrive would send it again.
    Mark(StoreError),
}

impl fmt::Display for RedriveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RedriveError::Publish(e) => write!(f, "not sent back: {e}"),
            RedriveError::Mark(e) => write!(
                f,
                "sent back, but not marked redriven (another redrive would send it again): {e}"
            ),
        }
    }
}

impl std::error::Error for RedriveError {}

/// The properties of a redriven copy of a message that had `properties`: the failure
/// headers, the retry count and `x-death` removed — so the worker gives it its whole retry
/// budget again — and [`REDRIVEN_AT`] added.
pub fn redriven_properties(properties: &BasicProperties) -> BasicProperties {
    let mut table = FieldTable::default();
    if let Some(old) = properties.headers() {
        for (key, value) in old.inner() {
            let key_str = key.as_str();
            if !headers::FAILURE.contains(&key_str) && key_str != headers::X_DEATH {
                table.insert(key.clone(), value.clone());
            }
        }
    }
    let now = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
    table.insert(
        REDRIVEN_AT.into(),
        AMQPValue::LongString(now.as_str().into()),
    );
    properties.clone().with_headers(table)
}

impl Store {
    /// Send `letter` back to its worker's own queue (through the default exchange: no other
    /// subscriber sees it), confirmed, with a fresh retry budget; then mark it redriven.
    pub async fn redrive(
        &self,
        publisher: &Publisher,
        letter: &DeadLetter,
    ) -> Result<(), RedriveError> {
        publisher
            .publish_raw(
                "",
                &letter.worker,
                &letter.body,
                redriven_properties(&letter.properties),
            )
            .await
            .map_err(RedriveError::Publish)?;
        self.set_dead_letter_state(&[letter.seq], DeadLetterState::Redriven)
            .await
            .map_err(RedriveError::Mark)?;
        Ok(())
    }
}
