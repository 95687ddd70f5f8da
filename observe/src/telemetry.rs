//! Logs and traces for a process: `tracing` to stderr (text or JSON lines) and spans to
//! OpenTelemetry, configured by the environment.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

/// `text` (default) or `json`: the format of log lines.
pub const LOG_FORMAT_VAR: &str = "RABBITRY_LOG_FORMAT";

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, with the current span's fields (worker, event type,
    /// message id…), for log shippers.
    Json,
}

impl LogFormat {
    /// From `RABBITRY_LOG_FORMAT` (`text` when unset); anything but `text` or `json` is an
    /// error that says so.
    pub fn from_env() -> rabbitry::Result<LogFormat> {
        match std::env::var(LOG_FORMAT_VAR) {
            Err(_) => Ok(LogFormat::Text),
            Ok(v) => match v.trim().to_ascii_lowercase().as_str() {
                "" | "text" => Ok(LogFormat::Text),
                "json" => Ok(LogFormat::Json),
                _ => Err(rabbitry::Error::Config(format!(
                    "{LOG_FORMAT_VAR}={v:?} is not a log format: use text or json"
                ))),
            },
        }
    }
}

/// The process's logging and tracing, installed by [`Telemetry::init`]. Keep it for the
/// life of the process: dropping it flushes and stops the span exporter.
#[derive(Debug)]
#[must_use = "dropping Telemetry stops exporting spans: keep it until the process ends"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    exporting: bool,
}

impl Telemetry {
    /// Install a global `tracing` subscriber configured by the environment:
    ///
    /// - `RUST_LOG` filters log lines (default `info`);
    /// - `RABBITRY_LOG_FORMAT=json` writes JSON lines (default `text`);
    /// - spans go to OpenTelemetry, so the W3C trace context carried in message headers
    ///   links producers and consumers, unless `OTEL_SDK_DISABLED=true`;
    /// - with `OTEL_EXPORTER_OTLP_ENDPOINT` (or `…_TRACES_ENDPOINT`) set, spans are exported
    ///   over OTLP/HTTP (feature `otlp`; the other `OTEL_*` variables apply: headers,
    ///   timeout, sampler, resource); `OTEL_SERVICE_NAME` defaults to `service`.
    ///
    /// Fails when the settings are wrong, or when a global subscriber is already set.
    pub fn init(service: &str) -> rabbitry::Result<Telemetry> {
        let format = LogFormat::from_env()?;
        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
        let logs = match format {
            LogFormat::Text => tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_filter(filter)
                .boxed(),
            LogFormat::Json => tracing_subscriber::fmt::layer()
                .json()
                .with_current_span(true)
                .with_span_list(false)
                .with_writer(std::io::stderr)
                .with_filter(filter)
                .boxed(),
        };
        let disabled = env_flag("OTEL_SDK_DISABLED");
        let endpoint = [
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ]
        .iter()
        .any(|k| std::env::var(k).is_ok_and(|v| !v.trim().is_empty()));
        let (provider, exporting) = match disabled {
            true => (None, false),
            false => {
                let (provider, exporting) = tracer_provider(service, endpoint)?;
                (Some(provider), exporting)
            }
        };
        let mut layers: Vec<Box<dyn Layer<Registry> + Send + Sync>> = vec![logs];
        if let Some(p) = &provider {
            layers.push(trace_layer(p).with_filter(LevelFilter::INFO).boxed());
        }
        tracing_subscriber::registry()
            .with(layers)
            .try_init()
            .map_err(|e| {
                rabbitry::Error::Config(format!("cannot install the tracing subscriber: {e}"))
            })?;
        if endpoint && !exporting {
            tracing::warn!(
                "OTEL_EXPORTER_OTLP_ENDPOINT is set, but this binary was built without the `otlp` feature: spans are not exported"
            );
        }
        Ok(Telemetry {
            provider,
            exporting,
        })
    }

    /// Whether spans are exported over OTLP.
    pub fn exporting(&self) -> bool {
        self.exporting
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown()
        {
            eprintln!("flushing spans at exit failed: {e}");
        }
    }
}

/// A `tracing-opentelemetry` layer on `provider`'s tracer, set up for messaging at volume:
/// spans carry the attributes rabbitry gives them and none that cost a lookup or a clock
/// read on every poll (source location, thread, target, busy and idle time), and entering a
/// span does not activate an OpenTelemetry context (rabbitry reads a span's context
/// directly when it propagates it). [`Telemetry::init`] installs this layer; use it to
/// build a subscriber of your own.
pub fn trace_layer<S>(
    provider: &SdkTracerProvider,
) -> tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::SdkTracer>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("rabbitry"))
        .with_location(false)
        .with_threads(false)
        .with_target(false)
        .with_tracked_inactivity(false)
        .with_context_activation(false)
}

fn env_flag(key: &str) -> bool {
    std::env::var(key).is_ok_and(|v| v.trim().eq_ignore_ascii_case("true"))
}

/// A tracer provider: with an OTLP exporter when `export` (and the feature is on), else one
/// that only makes trace and span ids (enough to propagate a trace context).
fn tracer_provider(service: &str, export: bool) -> rabbitry::Result<(SdkTracerProvider, bool)> {
    let resource = match std::env::var("OTEL_SERVICE_NAME") {
        Ok(name) if !name.trim().is_empty() => Resource::builder().build(),
        _ => Resource::builder()
            .with_service_name(service.to_owned())
            .build(),
    };
    let builder = SdkTracerProvider::builder().with_resource(resource);
    #[cfg(feature = "otlp")]
    if export {
        use opentelemetry_otlp::WithExportConfig as _;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .build()
            .map_err(|e| {
                rabbitry::Error::Config(format!(
                    "cannot build the OTLP span exporter from the OTEL_* settings: {e}"
                ))
            })?;
        return Ok((builder.with_batch_exporter(exporter).build(), true));
    }
    let _ = export;
    Ok((builder.build(), false))
}
