//! W3C trace context (`traceparent`, `tracestate`) through AMQP headers.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use rabbitry::Metadata;
use rabbitry::observe::{Received, Sending};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The W3C `traceparent` header.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C `tracestate` header.
pub const TRACESTATE: &str = "tracestate";
/// Where MassTransit (and .NET's `Diagnostic-Id`) carry a W3C trace parent: read when a
/// message has no `traceparent`.
const FOREIGN_PARENTS: [&str; 2] = ["MT-Activity-Id", "Diagnostic-Id"];

/// Write the publish span's context into the message's headers. Nothing is written when
/// the span has no OpenTelemetry context (no `tracing-opentelemetry` layer is installed).
pub(crate) fn inject(sending: &mut Sending<'_>) {
    let cx = sending.span.context();
    if !cx.span().span_context().is_valid() {
        return;
    }
    TraceContextPropagator::new().inject_context(&cx, &mut Headers(sending));
}

/// Make the delivery span a child of the trace context the message carries; a message
/// without one starts a new trace.
pub(crate) fn extract(received: &Received<'_>) {
    let cx = TraceContextPropagator::new().extract(&Carried(received.metadata));
    if cx.span().span_context().is_valid() {
        // Fails only when the span has no OpenTelemetry data (no layer): nothing to join.
        let _ = received.span.set_parent(cx);
    }
}

struct Headers<'a, 'b>(&'a mut Sending<'b>);

impl Injector for Headers<'_, '_> {
    fn set(&mut self, key: &str, value: String) {
        // An empty `tracestate` says nothing: leave it out of every message.
        if !value.is_empty() {
            self.0.set_header(key, &value);
        }
    }
}

struct Carried<'a>(&'a Metadata);

impl Extractor for Carried<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        let found = self.0.header_str(key);
        if found.is_none() && key == TRACEPARENT {
            return FOREIGN_PARENTS.iter().find_map(|k| self.0.header_str(k));
        }
        found
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .headers()
            .map(|h| h.inner().keys().map(|k| k.as_str()).collect())
            .unwrap_or_default()
    }
}
