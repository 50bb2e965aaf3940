//! The tracing subscriber: `text` or `json` lines on stderr (`[log] format`), the level from
//! `RUST_LOG`, and control characters escaped in both, since fields carry what peers send
//! (destination names, HTTP paths, certificate subjects).

use std::fmt::{self, Write as _};
use std::io::IsTerminal as _;

use godoxy_agent::config::LogFormat;
use tracing::field::{Field, Visit};
use tracing::{Level, Subscriber};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt as _;

/// Installs the process's subscriber.
pub fn init(format: LogFormat) {
    let filter = filter();
    // Under systemd the journal stamps every line already.
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_max_level(Level::TRACE)
        .with_writer(std::io::stderr)
        .with_target(false);
    match format {
        // JSON strings escape every control character themselves; the span's fields (peer,
        // subject) go under "span", the event's fields at the top level (docs/LOGS.md).
        LogFormat::Json => builder
            .with_ansi(false)
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .finish()
            .with(filter)
            .init(),
        LogFormat::Text => {
            let text = builder
                .with_ansi(std::io::stderr().is_terminal())
                .fmt_fields(EscapedFields);
            if journal {
                finish(text.without_time().finish(), filter);
            } else {
                finish(text.finish(), filter);
            }
        }
    }
}

fn finish<S>(subscriber: S, filter: Targets)
where
    S: Subscriber + for<'a> LookupSpan<'a> + Send + Sync + 'static,
{
    subscriber.with(filter).init();
}

/// `RUST_LOG`'s "level,target=level" form (read by `Targets`, without a regex engine), else
/// info with webrtc-dtls's chatter (a warning for every extension it does not know) kept out.
fn filter() -> Targets {
    let default = || {
        Targets::new()
            .with_default(Level::INFO)
            .with_target("webrtc_dtls", Level::ERROR)
            .with_target("webrtc_util", Level::ERROR)
    };
    match std::env::var("RUST_LOG") {
        Ok(spec) => spec.parse::<Targets>().unwrap_or_else(|err| {
            eprintln!(
                "godoxy-agent: ignoring RUST_LOG={spec:?} ({err}); \
                 using info,webrtc_dtls=error,webrtc_util=error"
            );
            default()
        }),
        Err(_) => default(),
    }
}

/// The text format's fields as `name=value`, like tracing-subscriber's own, with every
/// control character in a message or a displayed value written as an escape (`\n`, `\x1b`),
/// so a peer cannot forge a log line or drive the terminal. String values keep their quoted
/// Debug form, which escapes already.
struct EscapedFields;

impl<'w> FormatFields<'w> for EscapedFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut visitor = Visitor {
            writer,
            result: Ok(()),
            first: true,
            scratch: String::new(),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct Visitor<'w> {
    writer: Writer<'w>,
    result: fmt::Result,
    first: bool,
    /// A value's text before escaping.
    scratch: String,
}

impl Visitor<'_> {
    fn field(&mut self, field: &Field, value: fmt::Arguments<'_>, escape: bool) {
        let name = field.name();
        if self.result.is_err() || name.starts_with("log.") {
            return;
        }
        if !self.first {
            self.result = self.writer.write_char(' ');
        }
        self.first = false;
        if name != "message" {
            let name = name.strip_prefix("r#").unwrap_or(name);
            self.result = self.result.and_then(|()| write!(self.writer, "{name}="));
        }
        self.result = self.result.and_then(|()| {
            if escape {
                self.scratch.clear();
                let _ = self.scratch.write_fmt(value);
                write_escaped(&mut self.writer, &self.scratch)
            } else {
                self.writer.write_fmt(value)
            }
        });
    }
}

impl Visit for Visitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.field(field, format_args!("{value}"), true);
        } else {
            self.field(field, format_args!("{value:?}"), false);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.field(field, format_args!("{value:?}"), true);
    }
}

/// Writes `text` with control characters (C0, DEL, C1) escaped.
fn write_escaped(out: &mut impl fmt::Write, text: &str) -> fmt::Result {
    let mut rest = text;
    while let Some(at) = rest.find(char::is_control) {
        out.write_str(&rest[..at])?;
        let mut chars = rest[at..].chars();
        let Some(c) = chars.next() else { break };
        match c {
            '\n' => out.write_str("\\n")?,
            '\r' => out.write_str("\\r")?,
            '\t' => out.write_str("\\t")?,
            c if u32::from(c) < 0x80 => write!(out, "\\x{:02x}", u32::from(c))?,
            c => write!(out, "\\u{{{:x}}}", u32::from(c))?,
        }
        rest = chars.as_str();
    }
    out.write_str(rest)
}

#[cfg(test)]
mod tests {
    use super::write_escaped;

    #[test]
    fn escapes_controls() {
        let mut out = String::new();
        write_escaped(&mut out, "a\nb\x1b[31mc\td\u{85}é\x7f").unwrap();
        assert_eq!(out, "a\\nb\\x1b[31mc\\td\\u{85}é\\x7f");
    }
}
