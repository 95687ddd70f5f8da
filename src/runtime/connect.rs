//! Connecting to the broker, with backoff, within a deadline when starting.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::broker::{Connection, redact_url};
use crate::error::{Error, Result};

/// Connection settings of a runtime. (No `Debug`: the URL holds the password.)
#[derive(Clone)]
pub(crate) struct Settings {
    pub(crate) url: String,
    pub(crate) connection_name: String,
    pub(crate) grace: Duration,
    pub(crate) reconnect_min: Duration,
    pub(crate) reconnect_max: Duration,
}

/// Connect, retrying with exponential backoff and jitter until `deadline` (forever when
/// `None`). The last attempt is made at the deadline, so a start gives up after the
/// startup timeout it was given, not before (that attempt itself takes at most the
/// connect timeout). `Ok(None)` when shutdown was requested.
pub(crate) async fn connect(
    settings: &Settings,
    shutdown: &CancellationToken,
    deadline: Option<Instant>,
) -> Result<Option<Connection>> {
    let mut delays = ExponentialBuilder::default()
        .with_min_delay(settings.reconnect_min)
        .with_max_delay(settings.reconnect_max)
        .with_jitter()
        .without_max_times()
        .build();
    let url = redact_url(&settings.url);
    let mut told_stderr = false;
    for attempt in 1u64.. {
        let opened = Connection::open(&settings.url, &settings.connection_name).await;
        let error = match opened {
            Ok(conn) => {
                info!(%url, attempt, "connected to RabbitMQ");
                return Ok(Some(conn));
            }
            // A malformed URL will not get better by waiting.
            Err(e @ Error::Config(_)) => return Err(e),
            // Nor will refused credentials or a missing vhost while starting; a running
            // runtime keeps trying, in case they are being rotated.
            Err(e) if deadline.is_some() && refused(&e) => return Err(e),
            Err(e) => e,
        };
        let mut delay = delays.next().unwrap_or(settings.reconnect_max);
        if let Some(deadline) = deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(error);
            }
            delay = delay.min(left);
            if !told_stderr && no_subscriber() {
                // Nobody would see the warning below: say once what the wait is about.
                eprintln!(
                    "rabbitry: {error}; retrying for up to {left:.0?} \
                     (install a tracing subscriber to see rabbitry's logs)"
                );
                told_stderr = true;
            }
        }
        warn!(%error, attempt, retry_in = ?delay, "cannot connect to RabbitMQ");
        tokio::select! {
            () = shutdown.cancelled() => return Ok(None),
            () = tokio::time::sleep(delay) => {}
        }
    }
    unreachable!("the attempt counter does not run out")
}

/// Whether no tracing subscriber would record rabbitry's warnings.
fn no_subscriber() -> bool {
    tracing::dispatcher::get_default(|d| d.is::<tracing::subscriber::NoSubscriber>())
}

/// ACCESS_REFUSED (bad credentials) or NOT_ALLOWED (no such vhost, or no access to it).
fn refused(error: &Error) -> bool {
    const ACCESS_REFUSED: u16 = 403;
    const NOT_ALLOWED: u16 = 530;
    matches!(error, Error::Connect { source, .. }
        if matches!(source.reply_code(), Some(ACCESS_REFUSED | NOT_ALLOWED)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stderr_fallback_speaks_only_when_no_subscriber_listens() {
        assert!(no_subscriber());
        let subscriber = tracing_subscriber::fmt()
            .with_writer(std::io::sink)
            .finish();
        tracing::subscriber::with_default(subscriber, || assert!(!no_subscriber()));
    }
}
