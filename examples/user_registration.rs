//! `user.registered` → a welcome email. The smallest complete rabbitry program: one event,
//! one worker, a publisher, and a rejected message that goes to the dead-letter queue.
//!
//! ```text
//! cargo run --example user_registration     # in memory; set AMQP_URL to use RabbitMQ
//! ```

use std::collections::BTreeSet;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rabbitry::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct UserRegistered {
    user_id: u64,
    email: String,
}

impl Event for UserRegistered {
    const TYPE: &'static str = "user.registered";
}

/// Sends a welcome email to every new user.
struct WelcomeEmail {
    sent: Arc<Mutex<BTreeSet<String>>>,
    done: tokio::sync::mpsc::UnboundedSender<()>,
}

impl Worker for WelcomeEmail {
    type Event = UserRegistered;

    fn subscription(&self) -> Subscription {
        Subscription::new("demo.users.welcome-email")
            .bind(UserRegistered::TYPE)
            .retry(RetryPolicy::exponential(Duration::from_millis(200)).max_attempts(3))
    }

    async fn handle(&self, user: Delivery<UserRegistered>, _ctx: &Context) -> Outcome {
        let outcome = if user.email.contains('@') {
            println!(
                "welcome email sent to {} (user {})",
                user.email, user.user_id
            );
            self.sent.lock().unwrap().insert(user.email.clone());
            Ok(())
        } else {
            println!(
                "user {}: '{}' is not an email address; dead-lettered",
                user.user_id, user.email
            );
            Err(Failure::reject(format!(
                "'{}' is not an email address",
                user.email
            )))
        };
        let _ = self.done.send(());
        outcome
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    // rabbitry logs through `tracing`: without a subscriber, a wrong URL or a dead-letter
    // would go unseen. Warnings and errors to stderr; RUST_LOG=rabbitry=debug for more.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    // `main() -> Result<…>` would print an error's Debug form; this prints the readable
    // message, which says what to do.
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let sent = Arc::new(Mutex::new(BTreeSet::new()));
    let (done, mut handled) = tokio::sync::mpsc::unbounded_channel();
    // RabbitMQ when AMQP_URL says where; otherwise the in-memory broker.
    let in_memory = rabbitry::MemoryBroker::new();
    let url = std::env::var("AMQP_URL").unwrap_or_else(|_| in_memory.url());
    let runtime = Runtime::builder()
        .url(url)
        .exchange("demo.events")
        .worker(WelcomeEmail {
            sent: sent.clone(),
            done,
        })
        .start()
        .await?;

    let users = [
        (1, "ada@example.com"),
        (2, "grace@example.com"),
        (3, "not-an-email"),
    ];
    for (user_id, email) in users {
        let event = UserRegistered {
            user_id,
            email: email.into(),
        };
        runtime.publisher().publish(&event).await?;
    }
    for _ in users {
        if tokio::time::timeout(Duration::from_secs(30), handled.recv())
            .await
            .is_err()
        {
            runtime.shutdown().await;
            return Err("the worker did not handle every user within 30 s".into());
        }
    }
    runtime.shutdown().await;
    println!("{} welcome emails sent", sent.lock().unwrap().len());
    Ok(())
}
