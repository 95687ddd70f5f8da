//! Webhooks as consumers: each registered webhook is a worker without a Rust type, with a
//! queue of its own (`webhook.<name>`, so that a slow endpoint holds up only itself) bound
//! to its patterns. Each message's exact body is POSTed, signed per Standard Webhooks; 2xx
//! acknowledges, 408/429/5xx and transport failures retry through the broker's tiers
//! (`Retry-After` honoured), other answers dead-letter with the status and a body excerpt.

mod deliver;
mod egress;
mod sign;

use std::collections::HashMap;
use std::time::Duration;

use rabbitry::{Registration, RetryPolicy, Runtime, Subscription};
use rabbitry_store::{Store, Webhook};
use tokio::sync::Mutex;
use tracing::{info, warn};

pub use egress::{Egress, EgressError};
pub use sign::signature;

/// The queue of the webhook `name`.
pub fn webhook_queue(name: &str) -> String {
    format!("webhook.{name}")
}

/// Runs the registered webhooks as workers of a runtime, and keeps them in step with the
/// store.
pub struct WebhookHost {
    runtime: Runtime,
    store: Store,
    egress: Egress,
    /// What runs, by name: the URL and secret it runs with.
    running: Mutex<HashMap<String, (String, String)>>,
}

impl std::fmt::Debug for WebhookHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookHost")
            .field("egress", &self.egress)
            .finish_non_exhaustive()
    }
}

impl WebhookHost {
    /// Host the store's webhooks on `runtime`, sending through `egress`.
    pub fn new(runtime: Runtime, store: Store, egress: Egress) -> WebhookHost {
        WebhookHost {
            runtime,
            store,
            egress,
            running: Mutex::new(HashMap::new()),
        }
    }

    /// Where webhooks may be sent.
    pub fn egress(&self) -> &Egress {
        &self.egress
    }

    /// Start the webhooks registered and not running, stop those no longer registered.
    /// A webhook that cannot start (its queue declared otherwise, say) is logged and
    /// tried again at the next sync.
    pub async fn sync(&self) -> Result<(), rabbitry_store::StoreError> {
        let wanted = self.store.webhooks().await?;
        let mut running = self.running.lock().await;
        let gone: Vec<String> = running
            .iter()
            .filter(|(name, (url, secret))| {
                !wanted
                    .iter()
                    .any(|w| &w.name == *name && &w.url == url && w.secret() == secret)
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            running.remove(&name);
            match self.runtime.remove_worker(&webhook_queue(&name)).await {
                Ok(()) | Err(rabbitry::Error::UnknownWorker(_)) => {
                    info!(webhook = %name, "webhook stopped")
                }
                Err(e) => warn!(webhook = %name, error = %e, "cannot stop the webhook"),
            }
        }
        for webhook in wanted {
            if running.contains_key(&webhook.name) {
                continue;
            }
            match self.runtime.add_worker(self.registration(&webhook)).await {
                Ok(()) => {
                    info!(webhook = %webhook.name, url = %webhook.url, "webhook started");
                    running.insert(
                        webhook.name.clone(),
                        (webhook.url.clone(), webhook.secret().to_owned()),
                    );
                }
                Err(e) => warn!(webhook = %webhook.name, error = %e, "cannot start the webhook"),
            }
        }
        Ok(())
    }

    /// [`sync`](WebhookHost::sync) every `every` until `stop` completes (webhooks
    /// registered through another server's API start here within that time).
    pub async fn run(&self, every: Duration, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        loop {
            if let Err(e) = self.sync().await {
                warn!(error = %e, "cannot read the webhooks from the store");
            }
            tokio::select! {
                () = &mut stop => return,
                () = tokio::time::sleep(every) => {}
            }
        }
    }

    fn registration(&self, webhook: &Webhook) -> Registration {
        let retry = RetryPolicy::exponential(Duration::from_millis(webhook.retry.initial_delay_ms))
            .max_delay(Duration::from_millis(webhook.retry.max_delay_ms))
            .max_attempts(webhook.retry.max_attempts);
        let subscription = webhook.bindings.iter().fold(
            Subscription::new(webhook_queue(&webhook.name))
                .retry(retry.clone())
                .prefetch(20)
                .concurrency(8),
            |s, pattern| s.bind(pattern),
        );
        let deliver = deliver::Deliver::new(
            webhook.url.clone(),
            webhook.secret().to_owned(),
            self.egress.clone(),
            &retry,
            Duration::from_millis(webhook.retry.max_delay_ms),
        );
        Registration::service(subscription, deliver)
    }
}
