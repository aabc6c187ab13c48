//! Logs as hclog JSON lines on standard error. go-plugin's host reads the plugin's standard error
//! line by line, and a JSON object with `@level` and `@message` keys is logged by SPIRE at that
//! level with the other keys as fields. Fields of the enclosing spans, such as `request_id`, are
//! added to each line.

use std::io::Write as _;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Context, Layer, SubscriberExt as _};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt as _;

/// Environment variable with a tracing filter that replaces the default one.
pub const FILTER_VARIABLE: &str = "SIGIL_SPIRE_PLUGIN_LOG";
/// The plugin's own events from debug up, other crates' from info up.
pub const DEFAULT_FILTER: &str = "info,sigil_spire_plugin=debug";

/// Installs the hclog JSON logger as the global subscriber.
pub fn init() {
    let filter = std::env::var(FILTER_VARIABLE)
        .ok()
        .and_then(|text| EnvFilter::try_new(text).ok())
        .unwrap_or_else(|| EnvFilter::new(DEFAULT_FILTER));
    let layer = HclogLayer { writer: std::io::stderr };
    let _ = tracing_subscriber::registry().with(filter).with(layer).try_init();
}

/// A tracing layer that writes each event as one hclog JSON line to `writer`.
pub struct HclogLayer<W> {
    writer: W,
}

/// Fields recorded on a span, kept in the span's extensions.
#[derive(Default)]
struct SpanFields(Map<String, Value>);

impl<S, W> Layer<S> for HclogLayer<W>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + 'static,
{
    fn on_new_span(&self, attributes: &Attributes<'_>, id: &Id, context: Context<'_, S>) {
        let mut fields = SpanFields::default();
        attributes.record(&mut JsonVisitor(&mut fields.0));
        if let Some(span) = context.span(id) {
            span.extensions_mut().insert(fields);
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, context: Context<'_, S>) {
        if let Some(span) = context.span(id)
            && let Some(fields) = span.extensions_mut().get_mut::<SpanFields>()
        {
            values.record(&mut JsonVisitor(&mut fields.0));
        }
    }

    fn on_event(&self, event: &Event<'_>, context: Context<'_, S>) {
        let mut line = Map::new();
        line.insert("@level".to_owned(), Value::from(level_name(*event.metadata().level())));
        line.insert("@timestamp".to_owned(), Value::from(timestamp(time::OffsetDateTime::now_utc())));
        if let Some(scope) = context.event_scope(event) {
            for span in scope.from_root() {
                if let Some(fields) = span.extensions().get::<SpanFields>() {
                    line.extend(fields.0.iter().map(|(key, value)| (key.clone(), value.clone())));
                }
            }
        }
        event.record(&mut JsonVisitor(&mut line));
        line.entry("@message").or_insert_with(|| Value::from(""));

        let mut text = Value::Object(line).to_string();
        text.push('\n');
        // One write per line keeps lines of concurrent tasks apart. A failed write to standard
        // error has nowhere to be reported.
        let _ = self.writer.make_writer().write_all(text.as_bytes());
    }
}

/// Records tracing fields into a JSON object, with the `message` field as `@message`.
struct JsonVisitor<'a>(&'a mut Map<String, Value>);

impl JsonVisitor<'_> {
    fn insert(&mut self, field: &Field, value: Value) {
        let key = if field.name() == "message" { "@message" } else { field.name() };
        self.0.insert(key.to_owned(), value);
    }
}

impl Visit for JsonVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.insert(field, Value::from(value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.insert(field, Value::from(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.insert(field, Value::from(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.insert(field, Value::from(value));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        let mut text = value.to_string();
        let mut source = value.source();
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        self.insert(field, Value::from(text));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.insert(field, Value::from(format!("{value:?}")));
    }
}

/// hclog's level names, which go-plugin's host maps back to levels.
fn level_name(level: Level) -> &'static str {
    match level {
        Level::TRACE => "trace",
        Level::DEBUG => "debug",
        Level::INFO => "info",
        Level::WARN => "warn",
        Level::ERROR => "error",
    }
}

/// Formats a UTC time as hclog does, with microseconds: 2024-05-01T10:20:30.000123Z.
fn timestamp(now: time::OffsetDateTime) -> String {
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second(),
        now.microsecond()
    )
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;

    #[test]
    fn timestamp_has_microseconds_and_utc_suffix() {
        let time = time::OffsetDateTime::from_unix_timestamp_nanos(1_714_558_830_000_123_456).expect("valid time");
        assert_eq!(timestamp(time), "2024-05-01T10:20:30.000123Z");
    }

    #[test]
    fn level_names_match_hclog() {
        let names: Vec<&str> =
            [Level::TRACE, Level::DEBUG, Level::INFO, Level::WARN, Level::ERROR].into_iter().map(level_name).collect();
        assert_eq!(names, ["trace", "debug", "info", "warn", "error"]);
    }

    /// Output shared between the layer under test and the test.
    #[derive(Clone, Default)]
    struct SharedOutput(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for SharedOutput {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("output lock").extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for SharedOutput {
        type Writer = SharedOutput;

        fn make_writer(&'a self) -> SharedOutput {
            self.clone()
        }
    }

    #[test]
    fn event_carries_message_level_and_span_fields() {
        let output = SharedOutput::default();
        let subscriber = tracing_subscriber::registry().with(HclogLayer { writer: output.clone() });
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("rpc", request_id = 7_u64);
            let _entered = span.enter();
            tracing::warn!(endpoint = "127.0.0.1:7001", attempt = 2_u64, "retrying");
        });
        let bytes = output.0.lock().expect("output lock").clone();
        let text = String::from_utf8(bytes).expect("UTF-8 output");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1, "{text}");
        let line: Value = serde_json::from_str(lines[0]).expect("line is JSON");
        assert_eq!(line["@level"], "warn");
        assert_eq!(line["@message"], "retrying");
        assert_eq!(line["request_id"], 7);
        assert_eq!(line["endpoint"], "127.0.0.1:7001");
        assert_eq!(line["attempt"], 2);
        assert!(line["@timestamp"].as_str().is_some_and(|t| t.ends_with('Z')), "{line}");
    }
}
