//! OpenTelemetry traces (feature `otel`): when `OTEL_EXPORTER_OTLP_ENDPOINT` or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set, one span per forwarded request is exported over
//! OTLP/gRPC (the standard `OTEL_*` variables configure the exporter and the batch processor;
//! `OTEL_SERVICE_NAME` names the service, `tower-llm-lb` by default). The span continues the
//! caller's W3C `traceparent`, and its context goes to the backend in `traceparent`. Its
//! attributes follow OpenTelemetry's GenAI conventions (`gen_ai.operation.name`,
//! `gen_ai.provider.name`, `gen_ai.request.model`, `gen_ai.usage.input_tokens`,
//! `gen_ai.usage.output_tokens`, `server.address`) and add ours (`llm_lb.backend`,
//! `llm_lb.attempts`). Each attempt is a client span under it, at the time it took, with its
//! backend and outcome (`llm_lb.backend`, `llm_lb.outcome`).

use http::HeaderMap;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};

/// The exporter and its tracer.
#[derive(Clone)]
pub(crate) struct Otel {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
}

impl std::fmt::Debug for Otel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Otel")
    }
}

impl Otel {
    /// The exporter the environment asks for, if it asks for one. Needs a tokio runtime.
    pub(crate) fn from_env() -> Result<Option<Otel>, String> {
        let set = |v: &str| std::env::var_os(v).is_some_and(|v| !v.is_empty());
        if !set("OTEL_EXPORTER_OTLP_ENDPOINT") && !set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
            return Ok(None);
        }
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
            .map_err(|e| format!("OpenTelemetry exporter: {e}"))?;
        let name = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| "tower-llm-lb".into());
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name(name)
                    .build(),
            )
            .build();
        let tracer = provider.tracer("tower-llm-lb");
        Ok(Some(Otel { provider, tracer }))
    }

    /// A span for a request to `path`, the child of the caller's `traceparent` if it sent one.
    pub(crate) fn start(&self, headers: &HeaderMap, path: &str) -> RequestSpan {
        let parent = TraceContextPropagator::new().extract(&Headers(headers));
        let operation = match path {
            "/v1/embeddings" => "embeddings",
            "/v1/completions" => "text_completion",
            _ => "chat",
        };
        let span = self
            .tracer
            .span_builder(operation)
            .with_kind(SpanKind::Server)
            .with_attributes([
                KeyValue::new("gen_ai.operation.name", operation),
                KeyValue::new("url.path", path.to_string()),
            ])
            .start_with_context(&self.tracer, &parent);
        RequestSpan {
            cx: parent.with_span(span),
            operation,
            model: std::sync::OnceLock::new(),
            tracer: self.tracer.clone(),
        }
    }

    /// Exports what is still buffered.
    pub(crate) fn shutdown(&self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "OpenTelemetry exporter did not shut down cleanly");
        }
    }
}

/// One request's span, ended when its access line is written.
pub(crate) struct RequestSpan {
    cx: Context,
    operation: &'static str,
    model: std::sync::OnceLock<String>,
    tracer: SdkTracer,
}

impl RequestSpan {
    /// The span's context, as `traceparent` (and `tracestate`), for the request to a backend.
    pub(crate) fn inject(&self, headers: &mut HeaderMap) {
        TraceContextPropagator::new().inject_context(&self.cx, &mut HeadersMut(headers));
    }

    /// Names the model: `gen_ai.request.model`, and the span `{operation} {model}`.
    pub(crate) fn model(&self, model: &str) {
        let span = self.cx.span();
        span.set_attribute(KeyValue::new("gen_ai.request.model", model.to_string()));
        span.update_name(format!("{} {model}", self.operation));
        let _ = self.model.set(model.to_string());
    }

    /// Records what the answer's head said.
    pub(crate) fn answered(
        &self,
        status: u16,
        served: Option<&tower_llm_lb::endpoint::Served>,
        attempts: &[tower_llm_lb::error::Attempt],
    ) {
        let span = self.cx.span();
        span.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(status),
        ));
        if let Some(s) = served {
            let provider = match s.backend.provider().name() {
                "azure" => "azure.ai.openai",
                other => other,
            };
            span.set_attribute(KeyValue::new("gen_ai.provider.name", provider.to_string()));
            span.set_attribute(KeyValue::new(
                "llm_lb.backend",
                s.backend.name().to_string(),
            ));
            span.set_attribute(KeyValue::new(
                "server.address",
                s.backend.authority().host().to_string(),
            ));
        }
        span.set_attribute(KeyValue::new("llm_lb.attempts", attempts.len() as i64));
        // tokio's instants to the wall clock, once.
        let (now, wall) = (tokio::time::Instant::now(), std::time::SystemTime::now());
        let name = match self.model.get() {
            Some(m) => format!("{} {m}", self.operation),
            None => self.operation.to_string(),
        };
        for a in attempts {
            let start = wall - now.saturating_duration_since(a.started);
            let mut attributes = vec![
                KeyValue::new("gen_ai.operation.name", self.operation),
                KeyValue::new("llm_lb.backend", a.backend.to_string()),
                KeyValue::new("llm_lb.outcome", a.outcome.name()),
            ];
            if let Some(m) = self.model.get() {
                attributes.push(KeyValue::new("gen_ai.request.model", m.clone()));
            }
            let mut attempt = self
                .tracer
                .span_builder(name.clone())
                .with_kind(SpanKind::Client)
                .with_start_time(start)
                .with_attributes(attributes)
                .start_with_context(&self.tracer, &self.cx);
            opentelemetry::trace::Span::end_with_timestamp(&mut attempt, start + a.elapsed);
        }
        if status >= 500 {
            span.set_status(Status::error(format!("answered {status}")));
        }
    }

    /// Ends the span, with the tokens the answer said it used.
    pub(crate) fn end(self, tokens: Option<(u64, u64)>) {
        let span = self.cx.span();
        if let Some((input, output)) = tokens {
            span.set_attribute(KeyValue::new("gen_ai.usage.input_tokens", input as i64));
            span.set_attribute(KeyValue::new("gen_ai.usage.output_tokens", output as i64));
        }
        span.end();
    }
}

struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct HeadersMut<'a>(&'a mut HeaderMap);

impl Injector for HeadersMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}
