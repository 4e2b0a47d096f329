//! Helpers shared by the gateway's integration tests: the binary on a free port, a log
//! capture, the README's config blocks.

#![allow(dead_code)]

use std::sync::{Arc, Mutex};

/// A `tracing` writer that keeps everything written, to check logs for secrets.
#[derive(Clone, Default)]
pub struct Captured(pub Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

impl Captured {
    /// Captures every event of this thread, at all levels, until the guard is dropped.
    ///
    /// tracing caches each callsite's interest process-wide, computed on the thread that first
    /// reaches it: a sibling test without a subscriber would cache "never" and blind this
    /// capture (it failed a CI run that way). A global [`Anchor`] that is interested
    /// "sometimes" in every callsite makes each event ask the current thread's subscriber.
    pub fn install(&self) -> tracing::subscriber::DefaultGuard {
        static ANCHOR: std::sync::Once = std::sync::Once::new();
        ANCHOR.call_once(|| {
            let _ = tracing::subscriber::set_global_default(Anchor);
        });
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(self.clone())
            .with_ansi(false)
            .finish();
        let guard = tracing::subscriber::set_default(subscriber);
        tracing::callsite::rebuild_interest_cache();
        guard
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// The process-wide default subscriber of a test binary that captures logs: records nothing,
/// but keeps every callsite's interest at "sometimes" (see [`Captured::install`]).
pub struct Anchor;

impl tracing::Subscriber for Anchor {
    fn register_callsite(
        &self,
        _: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        tracing::subscriber::Interest::sometimes()
    }
    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        Some(tracing::level_filters::LevelFilter::TRACE)
    }
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        false
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, _: &tracing::Event<'_>) {}
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// The README's first JSON block after `marker`.
pub fn readme_json_after(marker: &str) -> &'static str {
    let readme = include_str!("../../../README.md");
    let from = readme.find(marker).expect("the marker is in the README");
    let start = from + readme[from..].find("```json\n").expect("a JSON block") + "```json\n".len();
    &readme[start..start + readme[start..].find("```").unwrap()]
}

/// A `serve --config` process on a free port, its base URL and its stderr.
pub fn serve_config(path: &std::path::Path) -> (std::process::Child, String) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tower-llm-lb"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--log",
            "info",
            "--config",
        ])
        .arg(path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).unwrap();
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .trim_end_matches("/v1")
        .to_string();
    (child, url)
}
