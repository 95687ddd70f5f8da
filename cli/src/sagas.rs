//! `rabbitry sagas`: the saga instances kept in the store.

use clap::Subcommand;
use rabbitry_store::{SagaFilter, Store};

use crate::{Failed, print_json, time};

#[derive(Subcommand, Debug)]
pub(crate) enum SagasCommand {
    /// List saga instances, the latest changed first.
    List {
        /// Only this saga's (its queue's name).
        #[arg(long)]
        saga: Option<String>,
        /// Only instances with this status label (`confirmed`, `compensating`…).
        #[arg(long)]
        state: Option<String>,
        /// At most N.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One instance (per saga that has the key): status, version, state, pending events.
    Show {
        /// Its correlation key.
        key: String,
        /// Only this saga's.
        #[arg(long)]
        saga: Option<String>,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

pub(crate) async fn run(store: &str, command: SagasCommand) -> Result<(), Failed> {
    let store = Store::connect(store).await?;
    // In a block of its own, so that every way out closes the store.
    let result = async {
        match command {
            SagasCommand::List {
                saga,
                state,
                limit,
                json,
            } => {
                let mut filter = SagaFilter::new().limit(limit);
                if let Some(saga) = saga {
                    filter = filter.saga(saga);
                }
                if let Some(state) = state {
                    filter = filter.status(state);
                }
                let found = store.sagas(&filter).await?;
                if json {
                    print_json(&found);
                } else {
                    println!(
                        "{:<24}  {:<24}  {:<20}  {:<5}  {:>7}  {:>7}  updated",
                        "saga", "key", "status", "done", "version", "pending"
                    );
                    for s in &found {
                        let r = &s.record;
                        println!(
                            "{:<24}  {:<24}  {:<20}  {:<5}  {:>7}  {:>7}  {}",
                            s.saga,
                            r.key,
                            r.status,
                            if r.completed { "yes" } else { "no" },
                            r.version,
                            r.pending.len(),
                            time(r.updated_ms)
                        );
                    }
                }
                Ok(())
            }
            SagasCommand::Show { key, saga, json } => {
                let found = store.saga_instances(&key, saga.as_deref()).await?;
                if found.is_empty() {
                    return Err(Failed::not_found(format!(
                        "no saga instance with key {key:?} in the store"
                    )));
                }
                if json {
                    print_json(&found);
                    return Ok(());
                }
                for s in &found {
                    let r = &s.record;
                    println!("saga {} key {}", s.saga, r.key);
                    println!(
                        "status {}{}; version {}; started {}; changed {}",
                        r.status,
                        if r.completed { " (complete)" } else { "" },
                        r.version,
                        time(r.created_ms),
                        time(r.updated_ms)
                    );
                    let state = serde_json::to_string_pretty(&r.state).unwrap_or_default();
                    println!("state {state}");
                    for p in &r.pending {
                        println!("pending {} {} {}", p.routing_key, p.message_id, p.body);
                    }
                    println!();
                }
                Ok(())
            }
        }
    }
    .await;
    store.close().await;
    result
}
