//! `rabbitry`: run the keeper, publish events, and browse, redrive and purge what the store
//! recorded. See `rabbitry --help`.

mod sagas;
mod schedules;
mod tokens;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use clap::{Args, Parser, Subcommand, ValueEnum};
use rabbitry::control::Control;
use rabbitry::lapin::BasicProperties;
use rabbitry::report::REPORTS_EXCHANGE;
use rabbitry::{Error, Publisher, Runtime};
use rabbitry_observe::RuntimeBuilderExt;
use rabbitry_server::WebhookHost;
use rabbitry_store::{
    DeadLetter, DeadLetterState, EventFilter, Keeper, RedriveError, Store, StoreError,
};

/// How often `serve` reads the webhooks registered (by other servers, say).
const WEBHOOK_SYNC: Duration = Duration::from_secs(5);

/// The rabbitry command. Exit codes: 0 done; 2 bad arguments or input; 3 unroutable (no
/// queue takes the routing key); 4 the broker failed or refused; 5 the store failed; 6 not
/// found.
#[derive(Parser, Debug)]
#[command(name = "rabbitry", version, about, long_about = None)]
struct Cli {
    /// The broker.
    #[arg(long, env = "AMQP_URL", default_value = rabbitry::DEFAULT_URL, global = true, hide_env_values = true)]
    url: String,
    /// The store: sqlite://FILE or postgres://USER@HOST/DB.
    #[arg(
        long,
        env = "RABBITRY_STORE",
        default_value = "sqlite://rabbitry.db",
        global = true,
        hide_env_values = true
    )]
    store: String,
    /// The system's exchange.
    #[arg(
        long,
        env = "RABBITRY_EXCHANGE",
        default_value = "events",
        global = true
    )]
    exchange: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the keeper until SIGINT or SIGTERM: audit every event into the store, move the
    /// named workers' dead letters into it, write the runtimes' handling reports, and fire
    /// the stored schedules (one `serve` leads each schedule).
    Serve {
        /// A worker whose dead-letter queue (WORKER.dlq) to drain (repeat for several).
        #[arg(long = "dlq", value_name = "WORKER")]
        dlq: Vec<String>,
        /// The queue the handling reports are read from. Keepers of one store share it; a
        /// keeper of another store on the same broker needs a queue of its own.
        #[arg(
            long,
            env = "RABBITRY_REPORTS_QUEUE",
            value_name = "QUEUE",
            default_value = "rabbitry.reports.keeper"
        )]
        reports_queue: String,
        /// Also serve the HTTP API on this address (e.g. 127.0.0.1:8080).
        #[arg(long, env = "RABBITRY_HTTP", value_name = "ADDR")]
        http: Option<std::net::SocketAddr>,
        /// Let webhooks reach this non-public address range (e.g. 10.0.0.0/8; repeat for
        /// several). Private, loopback, link-local and reserved ranges are refused otherwise.
        #[arg(
            long = "webhook-allow",
            value_name = "CIDR",
            env = "RABBITRY_WEBHOOK_ALLOW",
            value_delimiter = ','
        )]
        webhook_allow: Vec<rabbitry_server::IpNet>,
        /// A directory of JSON Schemas, one per event type, named `<type>.json`
        /// (`order.placed.json`): events of those types published through the HTTP API must
        /// match theirs (400 otherwise).
        #[arg(long, env = "RABBITRY_SCHEMAS", value_name = "DIR")]
        schemas: Option<std::path::PathBuf>,
    },
    /// Publish one JSON event (confirmed) and print its message id.
    Publish {
        /// Its routing key.
        routing_key: String,
        /// Its body: JSON.
        json: String,
        /// Its event type (default: the routing key).
        #[arg(long = "type")]
        event_type: Option<String>,
        /// Its message id (default: a new UUID v7).
        #[arg(long)]
        id: Option<String>,
        /// Its correlation id.
        #[arg(long)]
        correlation_id: Option<String>,
    },
    /// List recorded events, oldest first.
    Events {
        #[command(flatten)]
        filter: Filter,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One event and every handling of it: which workers, which attempts, which outcomes.
    Event {
        /// Its message id.
        message_id: String,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print the AsyncAPI 3.0 document of the topology the controlled runtimes on the
    /// exchange announce (their queues, bindings and, with --schemas, payload schemas).
    Asyncapi {
        /// A directory of JSON Schemas, one per event type, named `<type>.json`.
        #[arg(long, env = "RABBITRY_SCHEMAS", value_name = "DIR")]
        schemas: Option<std::path::PathBuf>,
        /// How long to listen for the runtimes' announcements.
        #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = humantime::parse_duration)]
        wait: Duration,
    },
    /// Publish recorded events again, as new messages marked `x-replayed-from` (the
    /// keeper does not audit them twice): to one worker's queue only, or to the exchange
    /// (every subscriber) with their original routing keys.
    Replay {
        #[command(flatten)]
        filter: Filter,
        /// To this worker's queue only.
        #[arg(long, value_name = "WORKER", required_unless_present = "to_exchange")]
        to_worker: Option<String>,
        /// To the exchange, with each event's routing key.
        #[arg(long, conflicts_with = "to_worker")]
        to_exchange: bool,
        /// Only say what would be published.
        #[arg(long)]
        dry_run: bool,
    },
    /// The dead letters the keeper moved into the store.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Saga instances kept in the store.
    Sagas {
        #[command(subcommand)]
        command: sagas::SagasCommand,
    },
    /// Cron schedules kept in the store, fired by `rabbitry serve`.
    Schedules {
        #[command(subcommand)]
        command: schedules::SchedulesCommand,
    },
    /// Tokens for the HTTP API (`serve --http`).
    Tokens {
        #[command(subcommand)]
        command: tokens::TokensCommand,
    },
}

#[derive(Args, Debug)]
struct Filter {
    /// Only this event type.
    #[arg(long = "type")]
    event_type: Option<String>,
    /// Only events recorded since this time (RFC 3339).
    #[arg(long, conflicts_with = "last")]
    since: Option<String>,
    /// Only events recorded in the last DURATION (e.g. 30s, 15m, 1h, 2days).
    #[arg(long)]
    last: Option<String>,
    /// Only events with this correlation id.
    #[arg(long)]
    correlation_id: Option<String>,
    /// At most N (the latest).
    #[arg(long, default_value_t = 100)]
    limit: u32,
}

#[derive(Subcommand, Debug)]
enum DlqCommand {
    /// List dead letters, oldest first. With --broker, no store: how many wait in each
    /// named worker's dead-letter queue.
    List {
        /// Only this worker's (with --broker: the workers to count, at least one).
        #[arg(num_args = 0..)]
        workers: Vec<String>,
        /// Count in the broker's dead-letter queues instead of listing the store.
        #[arg(long)]
        broker: bool,
        /// Only in this state.
        #[arg(long, value_enum, default_value_t = StateArg::Waiting)]
        state: StateArg,
        /// At most N.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One dead letter, with its failure, headers and body.
    Show {
        /// Its id (the first column of `dlq list`).
        id: i64,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Send dead letters back to their worker's queue only, with a fresh retry budget
    /// (x-retry-count and the failure headers removed, x-redriven-at added). Each is
    /// confirmed by the broker before it is marked redriven.
    Redrive {
        /// The worker whose dead letters to send back.
        worker: String,
        #[command(flatten)]
        which: Which,
        /// Only say what would be sent.
        #[arg(long)]
        dry_run: bool,
        /// No store: move messages straight from the worker's dead-letter queue (take one,
        /// publish it with confirm, then acknowledge it — never browsing). With --all only.
        #[arg(long)]
        broker: bool,
    },
    /// Mark dead letters purged (they are already out of the broker).
    Purge {
        /// The worker whose dead letters to purge.
        worker: String,
        #[command(flatten)]
        which: Which,
    },
}

#[derive(Args, Debug)]
#[group(required = true, multiple = false)]
struct Which {
    /// These dead letters (ids from `dlq list`).
    #[arg(long = "id", value_name = "ID", num_args = 1..)]
    ids: Vec<i64>,
    /// Every waiting dead letter of the worker.
    #[arg(long)]
    all: bool,
}

#[derive(ValueEnum, Debug, Clone, Copy)]
enum StateArg {
    Waiting,
    Redriven,
    Purged,
    All,
}

impl StateArg {
    fn state(self) -> Option<DeadLetterState> {
        match self {
            StateArg::Waiting => Some(DeadLetterState::Waiting),
            StateArg::Redriven => Some(DeadLetterState::Redriven),
            StateArg::Purged => Some(DeadLetterState::Purged),
            StateArg::All => None,
        }
    }
}

/// A failure, with its exit code.
struct Failed {
    code: u8,
    message: String,
}

impl Failed {
    fn usage(message: impl Into<String>) -> Failed {
        Failed {
            code: 2,
            message: message.into(),
        }
    }

    fn not_found(message: impl Into<String>) -> Failed {
        Failed {
            code: 6,
            message: message.into(),
        }
    }
}

impl From<Error> for Failed {
    fn from(e: Error) -> Failed {
        let code = match &e {
            Error::Config(_) | Error::BodyTooLarge { .. } | Error::Invalid { .. } => 2,
            Error::Unroutable { .. } => 3,
            _ => 4,
        };
        Failed {
            code,
            message: e.to_string(),
        }
    }
}

impl From<StoreError> for Failed {
    fn from(e: StoreError) -> Failed {
        let code = match e {
            StoreError::Url(_) => 2,
            _ => 5,
        };
        Failed {
            code,
            message: e.to_string(),
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,rabbitry_cli=info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(failed) => {
            eprintln!("error: {}", failed.message);
            ExitCode::from(failed.code)
        }
    }
}

async fn run(cli: Cli) -> Result<(), Failed> {
    match cli.command {
        Command::Serve {
            dlq,
            reports_queue,
            http,
            webhook_allow,
            schemas,
        } => {
            let schemas = match schemas {
                Some(dir) => load_schemas(&dir)?,
                None => rabbitry::Schemas::new(),
            };
            let egress = webhook_allow
                .into_iter()
                .fold(rabbitry_server::Egress::new(), |e, range| e.allow(range));
            let served = Served {
                dlq,
                reports_queue,
                http,
                egress,
                schemas,
            };
            serve(&cli.url, &cli.store, &cli.exchange, served).await
        }
        Command::Publish {
            routing_key,
            json,
            event_type,
            id,
            correlation_id,
        } => {
            let value: serde_json::Value = serde_json::from_str(&json)
                .map_err(|e| Failed::usage(format!("the event is not JSON: {e}")))?;
            let body = serde_json::to_vec(&value).unwrap_or_default();
            let id = id.unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
            let mut properties = BasicProperties::default()
                .with_message_id(id.as_str().into())
                .with_type(event_type.as_deref().unwrap_or(&routing_key).into())
                .with_content_type("application/json".into())
                .with_delivery_mode(2)
                .with_timestamp(unix_seconds())
                .with_app_id("rabbitry-cli".into());
            if let Some(c) = correlation_id {
                properties = properties.with_correlation_id(c.as_str().into());
            }
            let publisher = Publisher::builder(cli.url)
                .exchange(cli.exchange.as_str())
                .connect()
                .await?;
            let sent = publisher
                .publish_raw(&cli.exchange, &routing_key, &body, properties)
                .await;
            publisher.close().await;
            sent?;
            println!("{id}");
            Ok(())
        }
        Command::Events { filter, json } => {
            let filter = event_filter(&filter)?;
            let store = Store::connect(&cli.store).await?;
            let events = store.events(&filter).await?;
            if json {
                print_json(&events);
            } else {
                println!(
                    "{:>6}  {:<24}  {:<24}  {:<24}  {:<36}  correlation",
                    "seq", "recorded", "type", "routing key", "message id"
                );
                for e in &events {
                    println!(
                        "{:>6}  {:<24}  {:<24}  {:<24}  {:<36}  {}",
                        e.seq,
                        time(e.recorded_at),
                        e.event_type,
                        e.routing_key,
                        e.message_id,
                        e.correlation_id().unwrap_or("-")
                    );
                }
            }
            Ok(())
        }
        Command::Event { message_id, json } => {
            let store = Store::connect(&cli.store).await?;
            let event = store.event(&message_id).await?;
            let handlings = store.handlings(&message_id).await?;
            if event.is_none() && handlings.is_empty() {
                return Err(Failed::not_found(format!(
                    "no event or handling of message {message_id} in the store"
                )));
            }
            if json {
                print_json(&serde_json::json!({ "event": event, "handlings": handlings }));
                return Ok(());
            }
            match &event {
                Some(e) => {
                    println!(
                        "message {} ({}), published to {} with key {}",
                        e.message_id, e.event_type, e.exchange, e.routing_key
                    );
                    println!(
                        "recorded {}; correlation {}",
                        time(e.recorded_at),
                        e.correlation_id().unwrap_or("-")
                    );
                    println!("body: {}", String::from_utf8_lossy(&e.body));
                }
                None => println!("message {message_id}: not audited (handlings only)"),
            }
            println!(
                "\n{:<24}  {:<32}  {:>7}  {:<14}  {:>10}  reason",
                "when", "worker", "attempt", "outcome", "ms"
            );
            for h in &handlings {
                println!(
                    "{:<24}  {:<32}  {:>7}  {:<14}  {:>10.1}  {}",
                    time(h.handled_at),
                    h.worker,
                    h.attempt,
                    h.outcome,
                    h.duration_us as f64 / 1000.0,
                    h.reason.as_deref().unwrap_or("")
                );
            }
            Ok(())
        }
        Command::Replay {
            filter,
            to_worker,
            to_exchange: _,
            dry_run,
        } => {
            let selected = event_filter(&filter)?;
            let store = Store::connect(&cli.store).await?;
            let events = store.events(&selected).await?;
            let matching = store.count_events(&selected).await?;
            store.close().await;
            if matching > events.len() as u64 {
                eprintln!(
                    "note: {matching} events match; only the latest {} are replayed (raise --limit to replay more)",
                    events.len()
                );
            }
            let target = |e: &rabbitry_store::StoredEvent| match &to_worker {
                Some(worker) => (String::new(), worker.clone()),
                None => (e.exchange.clone(), e.routing_key.clone()),
            };
            if dry_run {
                for e in &events {
                    let (exchange, key) = target(e);
                    println!(
                        "would replay {} ({}) to exchange {exchange:?} with key {key}",
                        e.message_id, e.event_type
                    );
                }
                println!("{} event(s) would be replayed", events.len());
                return Ok(());
            }
            let publisher = Publisher::builder(cli.url).connect().await?;
            let sent = rabbitry_store::replay(&publisher, &events, to_worker.as_deref()).await;
            publisher.close().await;
            let replayed = match sent {
                Ok(ids) => ids.len(),
                Err(e) => {
                    return Err(Failed {
                        message: e.to_string(),
                        ..Failed::from(e.error)
                    });
                }
            };
            println!("{replayed} event(s) replayed");
            Ok(())
        }
        Command::Dlq { command } => dlq(&cli.url, &cli.store, command).await,
        Command::Sagas { command } => sagas::run(&cli.store, command).await,
        Command::Schedules { command } => schedules::run(&cli.store, command).await,
        Command::Tokens { command } => tokens::run(&cli.store, command).await,
        Command::Asyncapi { schemas, wait } => {
            let schemas = match schemas {
                Some(dir) => load_schemas(&dir)?,
                None => rabbitry::Schemas::new(),
            };
            // Every controlled runtime announces itself when the controller starts.
            let controller = rabbitry::control::Controller::start(cli.url).await?;
            tokio::time::sleep(wait).await;
            let workers = controller.workers();
            controller.close().await;
            let document = rabbitry_server::asyncapi_document(&cli.exchange, &workers, &schemas);
            println!(
                "{}",
                serde_json::to_string_pretty(&document).unwrap_or_default()
            );
            Ok(())
        }
    }
}

/// What `serve` runs besides the keeper.
struct Served {
    dlq: Vec<String>,
    reports_queue: String,
    http: Option<std::net::SocketAddr>,
    egress: rabbitry_server::Egress,
    schemas: rabbitry::Schemas,
}

/// The JSON Schemas in `dir`, each `<event type>.json`.
fn load_schemas(dir: &std::path::Path) -> Result<rabbitry::Schemas, Failed> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| Failed::usage(format!("cannot read the schemas in {}: {e}", dir.display())))?;
    let mut schemas = rabbitry::Schemas::new();
    for entry in entries {
        let path = entry
            .map_err(|e| Failed::usage(format!("cannot read {}: {e}", dir.display())))?
            .path();
        let Some(event_type) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".json"))
        else {
            continue;
        };
        let bad = |why: String| Failed::usage(format!("schema {}: {why}", path.display()));
        let text = std::fs::read_to_string(&path).map_err(|e| bad(e.to_string()))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let schema = rabbitry::Schema::from_json(&json).map_err(|e| bad(e.to_string()))?;
        schemas = schemas.insert(event_type, schema);
    }
    Ok(schemas)
}

async fn serve(url: &str, store: &str, exchange: &str, served: Served) -> Result<(), Failed> {
    let Served {
        dlq,
        reports_queue,
        http,
        egress,
        schemas,
    } = served;
    let store = Store::connect(store).await?;
    // Bound first: a busy port is an error before anything else starts.
    let listener = match http {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| Failed::usage(format!("cannot serve HTTP on {addr}: {e}")))?,
        ),
        None => None,
    };
    // Workers across processes (with the API): what controlled runtimes announce, and
    // commands. Started before anything that would need stopping if it fails.
    let controller = match &listener {
        Some(_) => Some(rabbitry::control::Controller::start(url).await?),
        None => None,
    };
    let mut keeper = Keeper::new(store.clone(), exchange).reports_queue(reports_queue);
    for worker in dlq {
        keeper = keeper.dead_letters_of(worker);
    }
    // The keeper's own metrics (what it handled, its publishes), served on /metrics.
    let observed = rabbitry_observe::Observability::new();
    let mut events = Runtime::builder()
        .url(url)
        .exchange(exchange)
        .observability(&observed);
    for worker in keeper.registrations() {
        events = events.worker(worker);
    }
    let events = events.start().await?;
    let reports = Runtime::builder()
        .url(url)
        .exchange(REPORTS_EXCHANGE)
        .observability(&observed)
        .worker(keeper.handling_reports());
    let reports = match reports.start().await {
        Ok(runtime) => runtime,
        Err(e) => {
            events.shutdown().await;
            return Err(e.into());
        }
    };
    // Webhooks: workers of their own runtime, controllable like any other.
    let hooks = Runtime::builder()
        .url(url)
        .exchange(exchange)
        .connection_name("rabbitry:webhooks")
        .observability(&observed)
        .control(Control::new().registry(store.clone()))
        .start()
        .await;
    let hooks = match hooks {
        Ok(runtime) => runtime,
        Err(e) => {
            events.shutdown().await;
            reports.shutdown().await;
            return Err(e.into());
        }
    };
    let host = Arc::new(WebhookHost::new(hooks.clone(), store.clone(), egress));
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let hosting = {
        let (host, mut stopping) = (host.clone(), stop.subscribe());
        tokio::spawn(async move {
            let stop = async move {
                let _ = stopping.wait_for(|stopped| *stopped).await;
            };
            host.run(WEBHOOK_SYNC, stop).await;
        })
    };
    let schedules = tokio::spawn(schedules::fire(
        url.to_owned(),
        exchange.to_owned(),
        store.clone(),
        stopping,
    ));
    let api = match (listener, controller.clone()) {
        (Some(listener), Some(controller)) => {
            // Two connections: confirms of concurrent requests do not queue on one.
            let publisher = Publisher::builder(url)
                .exchange(exchange)
                .connections(2)
                .build()?;
            let addr = listener.local_addr().ok();
            let mut stopping = stop.subscribe();
            let api = rabbitry_server::Api::new(store.clone(), publisher)
                .metrics(move || observed.render())
                .controller(controller)
                .webhooks(host.clone())
                .schemas(schemas);
            let shutdown = async move {
                let _ = stopping.wait_for(|stopped| *stopped).await;
            };
            eprintln!(
                "rabbitry serve: HTTP API on http://{}",
                addr.map_or("?".into(), |a| a.to_string())
            );
            Some(tokio::spawn(api.serve(listener, shutdown)))
        }
        _ => None,
    };
    eprintln!(
        "rabbitry serve: keeping {exchange} into the store ({:?}) and firing its schedules",
        store.backend()
    );
    println!("ready");
    tokio::select! {
        () = events.shutdown_on_signal() => {}
        () = reports.stopped() => {}
    }
    let _ = stop.send(true);
    let _ = hosting.await;
    hooks.shutdown().await;
    events.shutdown().await;
    reports.shutdown().await;
    let _ = schedules.await;
    if let Some(api) = api {
        let _ = api.await;
    }
    if let Some(controller) = controller {
        controller.close().await;
    }
    store.close().await;
    Ok(())
}

async fn dlq(url: &str, store: &str, command: DlqCommand) -> Result<(), Failed> {
    match command {
        DlqCommand::List {
            workers,
            broker: true,
            json,
            ..
        } => return broker_counts(url, &workers, json).await,
        DlqCommand::Redrive {
            worker,
            which,
            broker: true,
            dry_run,
        } => {
            if !which.all {
                return Err(Failed::usage(
                    "--broker moves a worker's whole dead-letter queue: use --all",
                ));
            }
            return broker_redrive(url, &worker, dry_run).await;
        }
        _ => {}
    }
    let store = Store::connect(store).await?;
    match command {
        DlqCommand::List {
            workers,
            state,
            limit,
            json,
            ..
        } => {
            if workers.len() > 1 {
                return Err(Failed::usage(
                    "list one worker's dead letters, or every worker's",
                ));
            }
            let worker = workers.first().map(String::as_str);
            let letters = store
                .dead_letters(worker, state.state(), Some(limit))
                .await?;
            if json {
                print_json(&letters);
                return Ok(());
            }
            println!(
                "{:>6}  {:<9}  {:<32}  {:<36}  {:<14}  reason",
                "id", "state", "worker", "message id", "kind"
            );
            for d in &letters {
                println!(
                    "{:>6}  {:<9}  {:<32}  {:<36}  {:<14}  {}",
                    d.seq,
                    d.state.as_str(),
                    d.worker,
                    d.message_id,
                    d.kind.as_deref().unwrap_or("-"),
                    d.reason.as_deref().unwrap_or("")
                );
            }
            Ok(())
        }
        DlqCommand::Show { id, json } => {
            let Some(d) = store.dead_letter(id).await? else {
                return Err(Failed::not_found(format!(
                    "no dead letter {id} in the store"
                )));
            };
            if json {
                print_json(&d);
                return Ok(());
            }
            println!(
                "dead letter {} of {} ({})",
                d.seq,
                d.worker,
                d.state.as_str()
            );
            println!(
                "message {} ({}), first published to {} with key {}",
                d.message_id, d.event_type, d.exchange, d.routing_key
            );
            println!(
                "failed at {}: {} — {}",
                d.failed_at,
                d.kind.as_deref().unwrap_or("-"),
                d.reason.as_deref().unwrap_or("")
            );
            if let Some(headers) = d.properties.headers() {
                for (k, v) in headers.inner() {
                    println!("  {k}: {v:?}");
                }
            }
            println!("body: {}", String::from_utf8_lossy(&d.body));
            Ok(())
        }
        DlqCommand::Redrive {
            worker,
            which,
            dry_run,
            ..
        } => {
            let letters = chosen(&store, &worker, &which).await?;
            if dry_run {
                for d in &letters {
                    println!(
                        "would redrive {} (message {}) to {}",
                        d.seq, d.message_id, d.worker
                    );
                }
                println!("{} dead letter(s) would be redriven", letters.len());
                return Ok(());
            }
            let publisher = Publisher::builder(url).connect().await?;
            let mut redriven = 0;
            for d in &letters {
                // To the worker's own queue only (the default exchange routes by queue name).
                if let Err(e) = store.redrive(&publisher, d).await {
                    publisher.close().await;
                    let failed = match e {
                        RedriveError::Publish(e) => Failed::from(e),
                        RedriveError::Mark(e) => Failed::from(e),
                        other => Failed::usage(other.to_string()),
                    };
                    return Err(Failed {
                        message: format!(
                            "redriving {} stopped after {redriven}: {}",
                            d.seq, failed.message
                        ),
                        ..failed
                    });
                }
                redriven += 1;
            }
            publisher.close().await;
            println!("{redriven} dead letter(s) redriven to {worker}");
            Ok(())
        }
        DlqCommand::Purge { worker, which } => {
            let letters = chosen(&store, &worker, &which).await?;
            let seqs: Vec<i64> = letters.iter().map(|d| d.seq).collect();
            let purged = store
                .set_dead_letter_state(&seqs, DeadLetterState::Purged)
                .await?;
            println!("{purged} dead letter(s) of {worker} purged");
            Ok(())
        }
    }
}

/// `dlq list --broker`: the messages waiting in each worker's dead-letter queue.
async fn broker_counts(url: &str, workers: &[String], json: bool) -> Result<(), Failed> {
    if workers.is_empty() {
        return Err(Failed::usage(
            "name the workers whose dead-letter queues to count",
        ));
    }
    let publisher = Publisher::builder(url).connect().await?;
    let mut counts = Vec::new();
    for worker in workers {
        let queue = format!("{worker}.dlq");
        let depth = match publisher.queue_depth(&queue).await {
            Ok(depth) => depth,
            Err(e) => {
                publisher.close().await;
                return Err(e.into());
            }
        };
        counts.push((worker.clone(), queue, depth.map(|d| d.ready)));
    }
    publisher.close().await;
    if json {
        let rows: Vec<_> = counts
            .iter()
            .map(|(worker, queue, ready)| {
                serde_json::json!({ "worker": worker, "queue": queue, "ready": ready })
            })
            .collect();
        print_json(&rows);
        return Ok(());
    }
    for (worker, queue, ready) in &counts {
        match ready {
            Some(n) => println!("{worker}: {n} message(s) in {queue}"),
            None => println!("{worker}: no queue {queue}"),
        }
    }
    Ok(())
}

/// `dlq redrive --broker --all`: move every message of the worker's dead-letter queue back
/// to its queue, with a fresh retry budget.
async fn broker_redrive(url: &str, worker: &str, dry_run: bool) -> Result<(), Failed> {
    let publisher = Publisher::builder(url).connect().await?;
    let queue = format!("{worker}.dlq");
    let result = async {
        let Some(depth) = publisher.queue_depth(&queue).await? else {
            return Err(Failed::not_found(format!("no queue {queue}")));
        };
        if dry_run {
            println!(
                "{} message(s) in {queue} would be redriven to {worker}",
                depth.ready
            );
            return Ok(());
        }
        let moved = publisher
            .move_messages(&queue, "", worker, depth.ready as usize, |p| {
                rabbitry_store::redriven_properties(&p)
            })
            .await?;
        println!("{moved} message(s) redriven from {queue} to {worker}");
        Ok(())
    }
    .await;
    publisher.close().await;
    result
}

/// The waiting dead letters of `worker` that `which` names; a named one that is not
/// waiting, or not the worker's, is an error that says so.
async fn chosen(store: &Store, worker: &str, which: &Which) -> Result<Vec<DeadLetter>, Failed> {
    if which.all {
        return Ok(store
            .dead_letters(Some(worker), Some(DeadLetterState::Waiting), Some(u32::MAX))
            .await?);
    }
    let mut letters = Vec::with_capacity(which.ids.len());
    for id in &which.ids {
        match store.dead_letter(*id).await? {
            Some(d) if d.worker == worker && d.state == DeadLetterState::Waiting => letters.push(d),
            Some(d) if d.worker != worker => {
                return Err(Failed::usage(format!(
                    "dead letter {id} is {}'s, not {worker}'s",
                    d.worker
                )));
            }
            Some(d) => {
                return Err(Failed::usage(format!(
                    "dead letter {id} is {}, not waiting",
                    d.state.as_str()
                )));
            }
            None => {
                return Err(Failed::not_found(format!(
                    "no dead letter {id} in the store"
                )));
            }
        }
    }
    Ok(letters)
}

fn event_filter(filter: &Filter) -> Result<EventFilter, Failed> {
    let mut f = EventFilter::new().limit(filter.limit);
    if let Some(t) = &filter.event_type {
        f = f.event_type(t.clone());
    }
    if let Some(c) = &filter.correlation_id {
        f = f.correlation_id(c.clone());
    }
    if let Some(since) = &filter.since {
        let at = humantime::parse_rfc3339_weak(since).map_err(|e| {
            Failed::usage(format!(
                "--since {since:?}: {e} (e.g. 2026-12-01T10:00:00Z)"
            ))
        })?;
        f = f.since(millis(at));
    }
    if let Some(last) = &filter.last {
        let span: Duration = humantime::parse_duration(last)
            .map_err(|e| Failed::usage(format!("--last {last:?}: {e} (e.g. 15m, 1h, 2days)")))?;
        let at = SystemTime::now()
            .checked_sub(span)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        f = f.since(millis(at));
    }
    Ok(f)
}

fn millis(at: SystemTime) -> i64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Unix milliseconds as RFC 3339 (UTC); a time RFC 3339 cannot show (a report from a
/// broken clock) as the number itself.
fn time(ms: i64) -> String {
    const YEAR_9999: i64 = 253_402_300_799_999;
    match u64::try_from(ms) {
        Ok(millis) if ms <= YEAR_9999 => {
            let at = SystemTime::UNIX_EPOCH + Duration::from_millis(millis);
            humantime::format_rfc3339_millis(at).to_string()
        }
        _ => format!("{ms} ms"),
    }
}

fn print_json(value: &impl serde::Serialize) {
    match serde_json::to_string_pretty(value) {
        Ok(text) => println!("{text}"),
        Err(e) => eprintln!("error: cannot write JSON: {e}"),
    }
}
