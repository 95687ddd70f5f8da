//! Only plain JSON within the size limit reaches the layers below.

use tower_layer::Layer;

use super::check::{Check, Checked};

use crate::disposition::Disposition;
use crate::message::{Message, Metadata};
use crate::outcome::FailureKind;

/// Dead-letters at once, with kind [`FailureKind::Undecodable`] and the reason, a message
/// whose body is over `max_bytes`, whose `content_encoding` is anything but identity, or
/// whose `content_type` is set to something other than JSON (`application/json`,
/// `text/json`, `*/*+json`). A message without a content type is taken as JSON, as bare
/// AMQP clients send it.
///
/// Built in, just inside the panic guard, with the limit of
/// [`RuntimeBuilder::max_body_bytes`](crate::RuntimeBuilder::max_body_bytes): every layer a
/// user adds sees a body of bounded size that claims to be JSON. Whether it parses is
/// found out by whoever reads it (the decoding service dead-letters what does not, as
/// `undecodable`); a layer that reads the JSON should treat a parse error the same way.
#[derive(Debug, Clone, Copy)]
pub struct JsonBodyLayer {
    max_bytes: usize,
}

impl JsonBodyLayer {
    /// Accept JSON bodies of at most `max_bytes`.
    pub fn new(max_bytes: usize) -> JsonBodyLayer {
        JsonBodyLayer { max_bytes }
    }
}

impl<S> Layer<S> for JsonBodyLayer {
    type Service = JsonBody<S>;

    fn layer(&self, inner: S) -> JsonBody<S> {
        Checked::new(inner, *self)
    }
}

/// The service of [`JsonBodyLayer`].
pub type JsonBody<S> = Checked<S, JsonBodyLayer>;

impl Check for JsonBodyLayer {
    fn check(&self, message: &mut Message) -> Option<Disposition> {
        let reason = refusal(message.metadata(), message.body().len(), self.max_bytes)?;
        Some(Disposition::dead_letter(FailureKind::Undecodable, reason))
    }
}

/// Why a body cannot be read as JSON, if it cannot.
fn refusal(meta: &Metadata, size: usize, max_bytes: usize) -> Option<String> {
    if size > max_bytes {
        return Some(format!(
            "body is {size} bytes, over the limit of {max_bytes} bytes"
        ));
    }
    if let Some(encoding) = meta.content_encoding() {
        let e = encoding.trim();
        if !(e.is_empty() || e.eq_ignore_ascii_case("identity") || e.eq_ignore_ascii_case("utf-8"))
        {
            return Some(format!(
                "unsupported content encoding '{e}' (only plain JSON is read)"
            ));
        }
    }
    if let Some(ct) = meta.content_type() {
        let mime = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        let json = mime.is_empty()
            || mime == "application/json"
            || mime == "text/json"
            || mime.ends_with("+json");
        if !json {
            return Some(format!(
                "unsupported content type '{mime}' (expected application/json)"
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::BasicProperties;

    fn meta(props: BasicProperties) -> Metadata {
        Metadata::new(
            "q".into(),
            "events".into(),
            "order.placed".into(),
            false,
            props,
        )
    }

    #[test]
    fn json_and_missing_content_types_pass() {
        for ct in [
            "application/json",
            "application/json; charset=utf-8",
            "application/vnd.x+json",
            "text/json",
        ] {
            let m = meta(BasicProperties::default().with_content_type(ct.into()));
            assert_eq!(refusal(&m, 2, 10), None, "{ct}");
        }
        assert_eq!(refusal(&meta(BasicProperties::default()), 2, 10), None);
    }

    #[test]
    fn foreign_encodings_and_oversized_bodies_are_refused() {
        let m = meta(BasicProperties::default().with_content_type("text/plain".into()));
        assert!(refusal(&m, 2, 10).unwrap().contains("text/plain"));
        let m = meta(BasicProperties::default().with_content_encoding("gzip".into()));
        assert!(refusal(&m, 2, 10).unwrap().contains("gzip"));
        let m = meta(BasicProperties::default());
        assert!(refusal(&m, 11, 10).unwrap().contains("11 bytes"));
    }
}
