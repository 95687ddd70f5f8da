//! `rabbitry schedules`: cron schedules kept in the store, and the loop `rabbitry serve`
//! runs them in.

use std::time::{Duration, SystemTime};

use clap::Subcommand;
use rabbitry::Scheduler;
use rabbitry_store::{Store, StoredSchedule};
use tokio::sync::watch;

use crate::{Failed, print_json, time};

/// How often `serve` looks for added or removed schedules.
const RELOAD_EVERY: Duration = Duration::from_secs(5);

#[derive(Subcommand, Debug)]
pub(crate) enum SchedulesCommand {
    /// Keep a schedule: `rabbitry serve` publishes JSON with ROUTING_KEY at every tick of
    /// PATTERN, within a few seconds from now on.
    Add {
        /// Its name: letters, digits, '.', '_', '-'.
        name: String,
        /// The cron pattern: 5 fields (minute hour day month weekday) or 6 with seconds
        /// first, e.g. "0 30 2 * * *".
        pattern: String,
        /// The routing key (and event type) of what it publishes.
        routing_key: String,
        /// The JSON body it publishes.
        json: String,
        /// The IANA time zone the pattern is read in.
        #[arg(long, default_value = "UTC")]
        time_zone: String,
    },
    /// List the stored schedules with their next tick.
    List {
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove a stored schedule (`serve` stops firing it within a few seconds).
    Remove {
        /// Its name.
        name: String,
    },
}

/// The next tick of `schedule` after now, as text.
fn next_tick(schedule: &StoredSchedule) -> String {
    match schedule.to_schedule() {
        Ok(s) => s
            .next_after(SystemTime::now())
            .map(|t| time(crate::millis(t)))
            .unwrap_or_else(|| "never".into()),
        Err(e) => format!("invalid: {e}"),
    }
}

pub(crate) async fn run(store: &str, command: SchedulesCommand) -> Result<(), Failed> {
    let store = Store::connect(store).await?;
    let result = match command {
        SchedulesCommand::Add {
            name,
            pattern,
            routing_key,
            json,
            time_zone,
        } => {
            let schedule =
                StoredSchedule::new(&name, &pattern, &routing_key, &json).time_zone(&time_zone);
            match store.add_schedule(&schedule).await {
                Ok(true) => {
                    println!("schedule {name} added; next tick {}", next_tick(&schedule));
                    Ok(())
                }
                Ok(false) => Err(Failed::usage(format!(
                    "a schedule called {name:?} exists; remove it first"
                ))),
                Err(rabbitry_store::StoreError::Invalid(e)) => Err(Failed::usage(e)),
                Err(e) => Err(e.into()),
            }
        }
        SchedulesCommand::List { json } => {
            let schedules = store.schedules().await?;
            if json {
                let all: Vec<_> = schedules
                    .iter()
                    .map(|s| {
                        serde_json::json!({
                            "name": s.name,
                            "pattern": s.pattern,
                            "time_zone": s.time_zone,
                            "routing_key": s.routing_key,
                            "body": serde_json::from_str::<serde_json::Value>(&s.body).unwrap_or_default(),
                            "created_at": time(s.created_ms),
                            "next": next_tick(s),
                        })
                    })
                    .collect();
                print_json(&all);
            } else {
                println!(
                    "{:<24}  {:<20}  {:<16}  {:<24}  next",
                    "name", "pattern", "time zone", "routing key"
                );
                for s in &schedules {
                    println!(
                        "{:<24}  {:<20}  {:<16}  {:<24}  {}",
                        s.name,
                        s.pattern,
                        s.time_zone,
                        s.routing_key,
                        next_tick(s)
                    );
                }
            }
            Ok(())
        }
        SchedulesCommand::Remove { name } => match store.remove_schedule(&name).await? {
            true => {
                println!("schedule {name} removed");
                Ok(())
            }
            false => Err(Failed::not_found(format!("no schedule called {name:?}"))),
        },
    };
    store.close().await;
    result
}

/// Fire the store's schedules until `stop` says so: one leader per schedule among every
/// `serve` on the broker; reloaded when schedules are added or removed.
pub(crate) async fn fire(
    url: String,
    exchange: String,
    store: Store,
    mut stop: watch::Receiver<bool>,
) {
    while !*stop.borrow() {
        let stored = match store.schedules().await {
            Ok(stored) => stored,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the stored schedules; trying again");
                let _ = tokio::time::timeout(RELOAD_EVERY, stop.changed()).await;
                continue;
            }
        };
        let mut scheduler = Scheduler::new(url.clone(), exchange.clone())
            .connection_name("rabbitry-serve:scheduler");
        for s in &stored {
            match s.to_schedule() {
                Ok(schedule) => scheduler = scheduler.schedule(schedule),
                Err(e) => {
                    tracing::warn!(schedule = %s.name, error = %e, "a stored schedule is invalid and not fired")
                }
            }
        }
        let mut stopping = stop.clone();
        let watch_store = store.clone();
        let changed = async move {
            loop {
                tokio::select! {
                    _ = stopping.changed() => return,
                    () = tokio::time::sleep(RELOAD_EVERY) => {}
                }
                match watch_store.schedules().await {
                    Ok(now) if now != stored => return,
                    _ => {}
                }
            }
        };
        if let Err(e) = scheduler.run_until(changed).await {
            tracing::error!(error = %e, "the stored schedules cannot run");
            let _ = tokio::time::timeout(RELOAD_EVERY, stop.changed()).await;
        }
        if stop.has_changed().is_err() {
            return;
        }
    }
}
