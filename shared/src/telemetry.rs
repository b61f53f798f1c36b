//! Distributed tracing: OpenTelemetry spans exported over OTLP/HTTP (JSON) to a
//! collector, off unless `[tracing] otlp_endpoint` is set. The edge's spans of a
//! handshake and the key server's spans of the operations it asked for share one trace:
//! the edge sends its span's context in the trace-context extension tag
//! ([`crate::TraceContext`], PROTOCOL.md), the key server makes its spans children of it.
//!
//! Spans are made only while tracing is on ([`enabled`]): with it off, nothing is
//! created and nothing costs. Span attributes never hold key material, signature input,
//! cookies or authorization: only names (opcode, site, key file stem), sizes, results.
//! Export runs on the exporter's own thread; recording a span never waits for the
//! collector (a full queue of `max_queue` spans drops new ones), and each export gives
//! up after `export_timeout`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry_otlp::{Protocol, WithExportConfig as _};
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider,
};
use opentelemetry_sdk::Resource;
use serde::Deserialize;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::TraceContext;

/// The target of every span meant for traces (the exporter takes only these).
pub const TARGET: &str = "keyless::trace";

/// Longest wait at exit for the spans still queued to be exported.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether tracing is on: make spans only then.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// `[tracing]` of either binary's configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TracingConfig {
    /// The collector's OTLP/HTTP traces endpoint, `http://host:port/v1/traces` (plain
    /// http: a collector on the host or its private network); none (default) = off.
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
    /// Share of the traces this process starts that are recorded, 0 to 1 (a trace
    /// started by the caller follows the caller's choice). Default 0.01.
    #[serde(default = "default_sample_ratio")]
    pub sample_ratio: f64,
    /// Deadline of one export to the collector (retries included). Default "2s".
    #[serde(default = "default_export_timeout", with = "humantime_serde")]
    pub export_timeout: Duration,
    /// Spans waiting for export at most; more are dropped. Default 2048.
    #[serde(default = "default_max_queue")]
    pub max_queue: usize,
}

impl Default for TracingConfig {
    fn default() -> Self {
        TracingConfig {
            otlp_endpoint: None,
            sample_ratio: default_sample_ratio(),
            export_timeout: default_export_timeout(),
            max_queue: default_max_queue(),
        }
    }
}

fn default_sample_ratio() -> f64 {
    0.01
}
fn default_export_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_max_queue() -> usize {
    2048
}

impl TracingConfig {
    /// What is wrong with the settings, if anything.
    pub fn check(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return Err("[tracing] sample_ratio must be between 0 and 1".into());
        }
        if let Some(url) = &self.otlp_endpoint {
            let rest = url.strip_prefix("http://").ok_or_else(|| {
                format!(
                    "[tracing] otlp_endpoint {url:?} must be an http:// URL (a local collector)"
                )
            })?;
            if rest.is_empty() || rest.starts_with('/') {
                return Err(format!("[tracing] otlp_endpoint {url:?} has no host"));
            }
        }
        if self.export_timeout.is_zero() || self.export_timeout > Duration::from_secs(30) {
            return Err("[tracing] export_timeout must be between 1ms and 30s".into());
        }
        if !(1..=1_000_000).contains(&self.max_queue) {
            return Err("[tracing] max_queue must be between 1 and 1000000".into());
        }
        Ok(())
    }
}

/// A running exporter; [`Tracing::shutdown`] exports what is queued.
#[derive(Debug)]
pub struct Tracing {
    provider: SdkTracerProvider,
}

impl Tracing {
    /// Exports the spans still queued (at most 5 s) and stops the exporter.
    pub fn shutdown(self) {
        ENABLED.store(false, Ordering::Relaxed);
        if let Err(e) = self.provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT) {
            eprintln!("tracing: last spans not exported: {e}");
        }
    }
}

/// The exporter of `config` for the process `service` (`keyless-edge`...), and the
/// tracer its `tracing` layer records with; none when tracing is off.
pub fn start(
    config: &TracingConfig,
    service: &'static str,
) -> Result<Option<(Tracing, opentelemetry_sdk::trace::Tracer)>, String> {
    let Some(endpoint) = &config.otlp_endpoint else {
        return Ok(None);
    };
    config.check()?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpJson)
        .with_endpoint(endpoint.clone())
        .with_timeout(config.export_timeout)
        .build()
        .map_err(|e| format!("[tracing] cannot set up the OTLP exporter: {e}"))?;
    let batch = BatchConfigBuilder::default()
        .with_max_queue_size(config.max_queue)
        .with_max_export_batch_size(config.max_queue.min(512))
        .with_scheduled_delay(Duration::from_secs(1))
        .build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(
            BatchSpanProcessor::builder(exporter)
                .with_batch_config(batch)
                .build(),
        )
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            config.sample_ratio,
        ))))
        .with_resource(Resource::builder().with_service_name(service).build())
        .build();
    let tracer = provider.tracer(service);
    ENABLED.store(true, Ordering::Relaxed);
    Ok(Some((Tracing { provider }, tracer)))
}

/// The trace context of `span` to send with a request, when it is recorded.
pub fn context_of(span: &tracing::Span) -> Option<TraceContext> {
    if !enabled() || span.is_none() {
        return None;
    }
    let cx = span.context();
    let otel = cx.span();
    let sc = otel.span_context();
    if !sc.is_valid() {
        return None;
    }
    Some(TraceContext {
        trace_id: sc.trace_id().to_bytes(),
        span_id: sc.span_id().to_bytes(),
        flags: sc.trace_flags().to_u8(),
    })
}

/// Makes the caller's span (`remote`) the parent of `span`, which must not have been
/// entered yet.
pub fn set_remote_parent(span: &tracing::Span, remote: &TraceContext) {
    let sc = SpanContext::new(
        TraceId::from_bytes(remote.trace_id),
        SpanId::from_bytes(remote.span_id),
        TraceFlags::new(remote.flags),
        true,
        TraceState::default(),
    );
    if sc.is_valid() {
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(sc));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_checked() {
        let on = |url: &str| TracingConfig {
            otlp_endpoint: Some(url.to_owned()),
            ..TracingConfig::default()
        };
        assert!(TracingConfig::default().check().is_ok());
        assert!(on("http://127.0.0.1:4318/v1/traces").check().is_ok());
        assert!(on("https://collector:4318/v1/traces").check().is_err());
        assert!(on("http:///v1/traces").check().is_err());
        let mut c = on("http://c:4318/v1/traces");
        c.sample_ratio = 1.5;
        assert!(c.check().is_err());
    }
}
