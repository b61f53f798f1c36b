//! Distributed tracing: with `[tracing]` on in both binaries, one handshake through the
//! edge makes one trace, at a small OTLP/HTTP (JSON) receiver the test runs, holding
//! the edge's spans and, as their children, the key server's.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

use crate::edge_support::{StackBuilder, SITE};

/// A receiver of OTLP/HTTP JSON exports (`POST /v1/traces`), keeping every span.
struct Collector {
    addr: SocketAddr,
    spans: Arc<Mutex<Vec<Span>>>,
}

/// One exported span.
#[derive(Clone, Debug)]
struct Span {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
    attributes: Vec<(String, String)>,
}

impl Collector {
    fn start() -> Result<Collector> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let spans = Arc::new(Mutex::new(Vec::new()));
        let keep = spans.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let keep = keep.clone();
                std::thread::spawn(move || {
                    let _ = serve(stream, &keep);
                });
            }
        });
        Ok(Collector { addr, spans })
    }

    fn endpoint(&self) -> String {
        format!("http://{}/v1/traces", self.addr)
    }

    fn spans(&self) -> Vec<Span> {
        self.spans.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

/// Answers the exports of one connection (HTTP/1.1, kept alive).
fn serve(stream: std::net::TcpStream, keep: &Mutex<Vec<Span>>) -> Result<()> {
    let mut out = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let mut length = 0usize;
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        ensure!(
            line.starts_with("POST /v1/traces"),
            "unexpected request {line:?}"
        );
        loop {
            line.clear();
            reader.read_line(&mut line)?;
            if line.trim().is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse()?;
                }
            }
        }
        let mut body = vec![0u8; length];
        reader.read_exact(&mut body)?;
        let parsed: Value = serde_json::from_slice(&body)?;
        keep.lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .extend(spans_of(&parsed));
        out.write_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}",
        )?;
    }
}

/// The spans of an OTLP JSON export.
fn spans_of(export: &Value) -> Vec<Span> {
    let mut spans = Vec::new();
    let str_of = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
    for rs in export["resourceSpans"].as_array().into_iter().flatten() {
        let service = rs["resource"]["attributes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["key"] == "service.name")
            .map(|a| str_of(&a["value"], "stringValue"))
            .unwrap_or_default();
        for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
            for s in ss["spans"].as_array().into_iter().flatten() {
                let attributes = s["attributes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|a| (str_of(a, "key"), a["value"].to_string()))
                    .collect();
                spans.push(Span {
                    service: service.clone(),
                    name: str_of(s, "name"),
                    trace_id: str_of(s, "traceId"),
                    span_id: str_of(s, "spanId"),
                    parent: str_of(s, "parentSpanId"),
                    attributes,
                });
            }
        }
    }
    spans
}

/// The span named `name` of `service` whose parent is `parent` (any parent: None).
fn find<'a>(
    spans: &'a [Span],
    service: &str,
    name: &str,
    parent: Option<&str>,
) -> Option<&'a Span> {
    spans
        .iter()
        .find(|s| s.service == service && s.name == name && parent.is_none_or(|p| s.parent == p))
}

#[test]
fn one_handshake_makes_one_trace_of_edge_and_key_server_spans() -> Result<()> {
    let collector = Collector::start()?;
    let endpoint = collector.endpoint();
    let for_origin = endpoint.clone();
    let b = StackBuilder::default().backends_with_origin_config(move |t| {
        let mut tracing = toml::Table::new();
        tracing.insert("otlp_endpoint".into(), for_origin.into());
        tracing.insert("sample_ratio".into(), 1.0.into());
        t.insert("tracing".into(), tracing.into());
    })?;
    let s = b.with_edge(|c| {
        c.tracing_option("otlp_endpoint", endpoint)
            .tracing_option("sample_ratio", 1.0)
    })?;
    s.edge
        .curl(SITE)
        .get(&s.url(SITE, "/"))?
        .expect_status(200)?;

    // The batch exporters send within a second or two.
    let deadline = Instant::now() + Duration::from_secs(15);
    let (handshake, sign, operation) = loop {
        let spans = collector.spans();
        if let Some(found) = trace_of(&spans) {
            break found;
        }
        if Instant::now() > deadline {
            bail!("no whole trace within 15 s; spans: {spans:#?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let spans = collector.spans();
    for child in ["queue", "sign"] {
        find(&spans, "keyless-origin", child, Some(&operation.span_id))
            .with_context(|| format!("no {child} span under the key server's operation"))?;
    }
    let handshakes = spans.iter().filter(|s| s.name == "tls.handshake").count();
    ensure!(
        handshakes == 1,
        "{handshakes} handshake spans for one handshake"
    );
    ensure!(
        sign.trace_id == handshake.trace_id && operation.trace_id == handshake.trace_id,
        "not one trace"
    );
    // Names, sizes and results only: no key material, message, cookie or credential.
    for span in &spans {
        for (key, value) in &span.attributes {
            for forbidden in [
                "payload",
                "message",
                "signature",
                "cookie",
                "authorization",
                "key_der",
            ] {
                ensure!(
                    !key.contains(forbidden),
                    "span {} has attribute {key} = {value}",
                    span.name
                );
            }
            ensure!(
                value.len() < 200,
                "span {} attribute {key} is {} bytes",
                span.name,
                value.len()
            );
        }
    }
    s.edge.assert_no_panic();
    s.keyserver.assert_no_panic();
    Ok(())
}

/// The edge's handshake span, its key-server span and the key server's operation span
/// under it, when the exports hold all three.
fn trace_of(spans: &[Span]) -> Option<(Span, Span, Span)> {
    let handshake = find(spans, "keyless-edge", "tls.handshake", None)?;
    let sign = find(
        spans,
        "keyless-edge",
        "keyserver.sign",
        Some(&handshake.span_id),
    )?;
    let operation = find(
        spans,
        "keyless-origin",
        "keyserver.operation",
        Some(&sign.span_id),
    )?;
    Some((handshake.clone(), sign.clone(), operation.clone()))
}
