//! The binary's log lines: tracing-subscriber's text format (`2026-12-07T03:24:31.205010Z  INFO
//! target: message field=value ...`), written by a dedicated thread in batches, with two parts
//! of the format made cheap because the gateway writes a line per request at `info`:
//!
//! - [`LogTime`]: the timestamp's date and time of day formatted once a second per thread;
//! - [`LogFields`]: fields written straight into the line (tracing-subscriber's default visitor
//!   runs every field through `write!` and escapes every string; ours quotes a string as it is
//!   when it needs no escape, and escapes the rest as before).
//!
//! The line is the same text the default format writes.

use std::fmt;

use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::{FormatFields, Writer};

/// Starts logging to stderr at `level`: colour only on a terminal, lines written off the request
/// path. Keep the guard until exit: dropping it flushes what waits.
/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Format {
    /// tracing-subscriber's text lines.
    Text,
    /// One JSON object per line: `timestamp`, `level`, `message`, the fields, `target`.
    Json,
}

impl std::str::FromStr for Format {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(Format::Text),
            "json" => Ok(Format::Json),
            _ => Err(format!(
                "gateway.log_format: \"{s}\" is not a log format (text or json)"
            )),
        }
    }
}

/// Set when the binary writes text lines: the access line then writes its fields itself.
static TEXT_LINES: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether log lines are the binary's text lines.
pub(crate) fn text_lines() -> bool {
    TEXT_LINES.load(std::sync::atomic::Ordering::Relaxed)
}

/// The log writer, when the binary writes uncoloured text lines at `info` or quieter: a line of
/// our own is then written to it whole ([`write_direct`]), as the text format would write it,
/// without tracing's event machinery (about 3,000 instructions for the access line).
static DIRECT: std::sync::OnceLock<tracing_appender::non_blocking::NonBlocking> =
    std::sync::OnceLock::new();

/// Writes `fields` as one `INFO` line of `target`, exactly as the text format writes it
/// (`2026-12-07T03:24:31.205010Z  INFO target: fields`), straight to the log writer. `false`
/// when lines do not go that way: log through tracing instead.
pub(crate) fn write_direct(target: &str, fields: &str) -> bool {
    let Some(writer) = DIRECT.get() else {
        return false;
    };
    use std::cell::RefCell;
    use std::io::Write;
    thread_local! {
        static BUF: RefCell<String> = const { RefCell::new(String::new()) };
    }
    BUF.with(|buf| {
        let mut buf = buf.borrow_mut();
        buf.clear();
        info_line(&mut buf, target, fields);
        let _ = writer.clone().write_all(buf.as_bytes());
    });
    true
}

/// The text format's line for an `INFO` event of `target` with `fields`, at this instant.
fn info_line(buf: &mut String, target: &str, fields: &str) {
    push_time(buf);
    buf.push_str("  INFO ");
    buf.push_str(target);
    buf.push_str(": ");
    buf.push_str(fields);
    buf.push('\n');
}

/// Runs `f` with this thread's line buffer, emptied.
pub(crate) fn with_line(f: impl FnOnce(&mut String)) {
    use std::cell::RefCell;
    thread_local! {
        static LINE: RefCell<String> = const { RefCell::new(String::new()) };
    }
    LINE.with(|line| {
        let mut line = line.borrow_mut();
        line.clear();
        f(&mut line);
    });
}

/// ` name=value`, a value of our own that needs no quoting (as `%value` writes it).
pub(crate) fn plain(line: &mut String, name: &str, value: &str) {
    line.push(' ');
    line.push_str(name);
    line.push('=');
    line.push_str(value);
}

/// ` name="value"`, quoted and escaped as the text format writes a string field.
pub(crate) fn quoted(line: &mut String, name: &str, value: &str) {
    line.push(' ');
    line.push_str(name);
    line.push('=');
    if plain_str(value) {
        line.push('"');
        line.push_str(value);
        line.push('"');
    } else {
        use std::fmt::Write;
        let _ = write!(line, "{value:?}");
    }
}

/// ` name=number`.
pub(crate) fn number(line: &mut String, name: &str, value: u64) {
    line.push(' ');
    line.push_str(name);
    line.push('=');
    line.push_str(itoa::Buffer::new().format(value));
}

pub(crate) fn init(
    level: tracing::Level,
    format: Format,
) -> tracing_appender::non_blocking::WorkerGuard {
    TEXT_LINES.store(format == Format::Text, std::sync::atomic::Ordering::Relaxed);
    // Log lines go to a dedicated thread that writes each batch in one system call (one write
    // and a lock per line otherwise). At most 128k lines wait; past that, lines are dropped
    // rather than a request held.
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .thread_name("tower-llm-lb-log")
        .finish(std::io::BufWriter::new(std::io::stderr()));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    if format == Format::Text && !ansi && level <= tracing::Level::INFO {
        let _ = DIRECT.set(writer.clone());
    }
    let builder = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_timer(LogTime)
        .with_writer(writer);
    let _ = match format {
        Format::Text => builder
            .fmt_fields(LogFields)
            // Colour only on a terminal: a file or a pipe (a log collector) gets plain text.
            .with_ansi(ansi)
            .try_init(),
        Format::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
    };
    guard
}

/// Log timestamps as tracing-subscriber writes them (RFC 3339, UTC, microseconds:
/// `2026-12-07T03:24:31.205010Z`), the date and time of day formatted once a second per thread
/// instead of on every line.
pub(crate) struct LogTime;

impl tracing_subscriber::fmt::time::FormatTime for LogTime {
    fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
        with_time(|t| w.write_str(t))
    }
}

/// Appends the timestamp [`LogTime`] writes.
fn push_time(buf: &mut String) {
    with_time(|t| {
        buf.push_str(t);
        Ok(())
    })
    .unwrap_or(());
}

/// Runs `f` with this instant's timestamp text, the date and time of day formatted once a
/// second per thread.
fn with_time(f: impl FnOnce(&str) -> fmt::Result) -> fmt::Result {
    use std::cell::RefCell;
    thread_local! {
        static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    SECOND.with(|cached| {
        let mut cached = cached.borrow_mut();
        if cached.0 != since.as_secs() {
            cached.0 = since.as_secs();
            cached.1 = second_text(cached.0);
        }
        let whole = cached.1.len();
        // `YYYY-MM-DDTHH:MM:SS` then `.micros` and `Z`, written after it in place.
        cached.1.push('.');
        let mut micros = since.subsec_micros();
        let mut digits = [b'0'; 6];
        for d in digits.iter_mut().rev() {
            *d = b'0' + (micros % 10) as u8;
            micros /= 10;
        }
        cached
            .1
            .push_str(std::str::from_utf8(&digits).unwrap_or("000000"));
        cached.1.push('Z');
        let result = f(&cached.1);
        cached.1.truncate(whole);
        result
    })
}

/// `YYYY-MM-DDTHH:MM:SS` of a UNIX time in seconds, UTC.
fn second_text(secs: u64) -> String {
    let t = i64::try_from(secs)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// Fields as tracing-subscriber's default format writes them (`message name=value`, strings
/// quoted), without a formatting pass per field where none is needed.
pub(crate) struct LogFields;

impl<'writer> FormatFields<'writer> for LogFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'writer>, fields: R) -> fmt::Result {
        let mut v = Visitor {
            w: writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut v);
        v.result
    }
}

struct Visitor<'a> {
    w: Writer<'a>,
    first: bool,
    result: fmt::Result,
}

impl Visitor<'_> {
    /// The separator before a field and its name (`message` has none).
    fn name(&mut self, field: &Field) -> fmt::Result {
        if !self.first {
            self.w.write_char(' ')?;
        }
        self.first = false;
        if field.name() == "message" {
            return Ok(());
        }
        let name = field.name();
        self.w.write_str(name.strip_prefix("r#").unwrap_or(name))?;
        self.w.write_char('=')
    }

    fn put(&mut self, field: &Field, value: impl FnOnce(&mut Writer<'_>) -> fmt::Result) {
        if self.result.is_ok() {
            self.result = self.name(field).and_then(|()| value(&mut self.w));
        }
    }
}

/// Whether `s` is written the same quoted as escaped (`{:?}`): printable ASCII without `"`, `\`.
fn plain_str(s: &str) -> bool {
    s.bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
}

impl Visit for Visitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        let message = field.name() == "message";
        self.put(field, |w| {
            if message {
                w.write_str(value)
            } else if plain_str(value) {
                w.write_char('"')?;
                w.write_str(value)?;
                w.write_char('"')
            } else {
                write!(w, "{value:?}")
            }
        });
    }

    // Numbers through `itoa`, not `core::fmt` (the access line has six).
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, |w| w.write_str(itoa::Buffer::new().format(value)));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, |w| w.write_str(itoa::Buffer::new().format(value)));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, |w| w.write_str(if value { "true" } else { "false" }));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, |w| write!(w, "{value:?}"));
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn timestamps_and_fields_read_as_the_default_format_writes_them() {
        assert_eq!(second_text(1_765_078_271), "2025-12-07T03:31:11");
        assert_eq!(second_text(0), "1970-01-01T00:00:00");
        let captured = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
        let sink = captured.clone();
        let ours = tracing_subscriber::fmt()
            .with_writer(move || SharedVec(sink.clone()))
            .with_ansi(false)
            .without_time()
            .fmt_fields(LogFields)
            .finish();
        let theirs_sink = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
        let sink = theirs_sink.clone();
        let theirs = tracing_subscriber::fmt()
            .with_writer(move || SharedVec(sink.clone()))
            .with_ansi(false)
            .without_time()
            .finish();
        let log = || {
            tracing::info!(
                request_id = "a b\"c",
                id = "plain-id",
                method = %http::Method::POST,
                status = 200u16,
                delta = -3i64,
                ok = true,
                elapsed = ?std::time::Duration::from_micros(1500),
                r#type = "x",
                "request {}",
                7
            );
        };
        tracing::subscriber::with_default(ours, log);
        tracing::subscriber::with_default(theirs, log);
        let ours = String::from_utf8(captured.lock().unwrap().clone()).unwrap();
        let theirs = String::from_utf8(theirs_sink.lock().unwrap().clone()).unwrap();
        assert_eq!(ours, theirs);
        assert!(
            ours.contains(r#"request 7 request_id="a b\"c" id="plain-id" method=POST status=200"#),
            "{ours}"
        );
    }

    #[test]
    fn a_line_written_directly_reads_as_the_text_format_writes_it() {
        let captured = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
        let sink = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || SharedVec(sink.clone()))
            .with_ansi(false)
            .with_timer(LogTime)
            .fmt_fields(LogFields)
            .finish();
        let fields = r#"request request_id="a b" method=POST status=200 duration_us=17"#;
        tracing::subscriber::with_default(subscriber, || tracing::info!("{fields}"));
        let theirs = String::from_utf8(captured.lock().unwrap().clone()).unwrap();
        let mut ours = String::new();
        info_line(&mut ours, module_path!(), fields);
        // The same but for the microseconds of the timestamp.
        let cut = |s: &str| (s[..19].to_string(), s[27..].to_string());
        assert_eq!(cut(&ours).1, cut(&theirs).1, "{ours:?} vs {theirs:?}");
        assert_eq!(&ours[19..20], ".");
        assert_eq!(&ours[26..27], "Z");
        assert!(ours[20..26].bytes().all(|b| b.is_ascii_digit()), "{ours}");
    }

    pub(crate) struct SharedVec(pub(crate) std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    /// What `log` writes as the binary's text lines (no time, no colour), with the access line
    /// written by `TEXT_LINES`' path or not.
    pub(crate) fn text_of(text_lines: bool, log: impl FnOnce()) -> String {
        let captured = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
        let sink = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || SharedVec(sink.clone()))
            .with_ansi(false)
            .without_time()
            .fmt_fields(LogFields)
            .finish();
        super::TEXT_LINES.store(text_lines, std::sync::atomic::Ordering::Relaxed);
        tracing::subscriber::with_default(subscriber, log);
        super::TEXT_LINES.store(false, std::sync::atomic::Ordering::Relaxed);
        String::from_utf8(captured.lock().unwrap().clone()).unwrap()
    }

    impl std::io::Write for SharedVec {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}
