//! The operator's Grafana dashboard (`deploy/grafana/keyless-dashboard.json`) and
//! Prometheus alert rules (`deploy/prometheus/keyless-alerts.yml`) name only metrics
//! the binaries export: a real key server and a real edge are driven through the events
//! that create the labelled families, both `/metrics` are scraped, and every metric
//! name in the PromQL of either file must be one of the exported series.
//!
//! prometheus-client 0.25 prints no `# TYPE` line for a labelled family without
//! children (`Registry::encode` skips empty metrics), so the families the files use are
//! created by events here:
//! - an enrolled edge that renews towards the group: `keyless_edge_credential_expiry_seconds`;
//! - a SoftHSM2 token in the keystore: `keyless_token_up`;
//! - `[tls] rotate_every` beyond the certificate's remaining half-life, so the key
//!   server rotates at start: `keyless_tls_rotations_total`;
//! - the key server's certificate file replaced by a copy of itself:
//!   `keyless_tls_reloads_total` (a rotation does not count there);
//! - SIGHUP to both: `keyless_reloads_total`, `keyless_edge_config_reloads_total`;
//! - a miss, a hit, a large object streamed to the disk tier and an unknown SNI:
//!   handshakes by result, cache lookups, served bytes, evictions (per tier),
//!   `keyless_edge_cache_disk_streamed_total`;
//! - pipelined RSA signatures against one worker and a queue of two:
//!   `keyless_queue_dropped_total`.
//!
//! Families the files do not use are not exercised: credential renewals (only after a
//! renewal), resumptions and the session store, slice fetches, ticket keys.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use keyless_shared::Opcode;
use keyless_tests::hsm::SoftHsm;
use keyless_tests::keys::{install_key, KeyAlg, KeyEncoding, KeySpec};
use keyless_tests::{
    edge_bin, enroll::create_token, run_with_timeout, set_tls, workspace_root, Deployment, Dns,
    Edge, EdgeConfig, KeyClient, KeyServer, Scripted, Signal, TestOrigin,
};

use crate::edge_support::{ORIGIN_HOST, SITE};
use crate::support::handshake_sign_request;

const DASHBOARD: &str = "deploy/grafana/keyless-dashboard.json";
const ALERTS: &str = "deploy/prometheus/keyless-alerts.yml";
/// Fewer names than this in a file means the extraction missed its queries.
const MIN_NAMES: usize = 10;
/// Longest wait for families created by background tasks (rotation, heartbeats,
/// the renewal loop, counters of a disk write).
const WAIT: Duration = Duration::from_secs(15);
/// The group `keyless-certs init --enroll` configures.
const GROUP: &str = "default";

/// PromQL words that stand bare without being metric names: aggregation operators,
/// their modifiers, binary operators, `offset` and the float literals.
const PROMQL_WORDS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "group",
    "limitk",
    "limit_ratio",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "atan2",
    "inf",
    "nan",
];
/// Modifiers followed by a parenthesised list of label names (not metrics).
const LABEL_LIST_WORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// The metric names in a PromQL expression: identifiers outside label matchers, range
/// selectors, strings and label lists that are neither called as functions nor PromQL
/// words.
fn promql_metric_names(expr: &str) -> BTreeSet<String> {
    let b = expr.as_bytes();
    let mut names = BTreeSet::new();
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        i = match c {
            b'"' | b'\'' | b'`' => skip_quoted(b, i),
            b'{' => skip_past(b, i, b'}'),
            b'[' => skip_past(b, i, b']'),
            b'#' => skip_past(b, i, b'\n'),
            // `${var}` or `$var` (Grafana variables).
            b'$' if b.get(i + 1) == Some(&b'{') => skip_past(b, i, b'}'),
            // Numbers and durations (`5m`, `1e-9`), and `$var`.
            b'$' | b'0'..=b'9' | b'.' => word_end(b, i + 1),
            c if c.is_ascii_alphabetic() || c == b'_' || c == b':' => {
                let end = word_end(b, i);
                let word = expr.get(i..end).unwrap_or_default();
                let next = skip_spaces(b, end);
                match b.get(next) {
                    Some(b'(') if LABEL_LIST_WORDS.contains(&word) => skip_past(b, next, b')'),
                    Some(b'(') => end,
                    _ if PROMQL_WORDS.contains(&word) => end,
                    _ => {
                        names.insert(word.to_owned());
                        end
                    }
                }
            }
            _ => i + 1,
        };
    }
    names
}

fn word_end(b: &[u8], mut i: usize) -> usize {
    while b
        .get(i)
        .is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_' || *c == b':')
    {
        i += 1;
    }
    i
}

fn skip_spaces(b: &[u8], mut i: usize) -> usize {
    while b.get(i).is_some_and(u8::is_ascii_whitespace) {
        i += 1;
    }
    i
}

/// Past the string starting at `i` (its quote); backslash escapes except in backticks.
fn skip_quoted(b: &[u8], i: usize) -> usize {
    let quote = b.get(i).copied();
    let mut j = i + 1;
    while let Some(&c) = b.get(j) {
        if c == b'\\' && quote != Some(b'`') {
            j += 2;
            continue;
        }
        if Some(c) == quote {
            return j + 1;
        }
        j += 1;
    }
    j
}

/// Past the first `close` after `i`, skipping strings (a label value may hold `}`).
fn skip_past(b: &[u8], i: usize, close: u8) -> usize {
    let mut j = i + 1;
    while let Some(&c) = b.get(j) {
        if c == close {
            return j + 1;
        }
        j = match c {
            b'"' | b'\'' | b'`' => skip_quoted(b, j),
            _ => j + 1,
        };
    }
    j
}

/// The series names a text exposition offers to PromQL: each `# TYPE` family with
/// the suffixes of its kind, and every sample's name.
fn exported_names(exposition: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in exposition.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            if let (Some(family), Some(kind)) = (parts.next(), parts.next()) {
                let suffixes: &[&str] = match kind {
                    "counter" => &["_total"],
                    "histogram" | "gaugehistogram" => &["_bucket", "_sum", "_count"],
                    "summary" => &["", "_sum", "_count"],
                    "info" => &["_info"],
                    _ => &[""],
                };
                names.extend(suffixes.iter().map(|s| format!("{family}{s}")));
            }
        } else if !line.starts_with('#') {
            if let Some(name) = line.split(['{', ' ']).next().filter(|n| !n.is_empty()) {
                names.insert(name.to_owned());
            }
        }
    }
    names
}

/// Every PromQL query of a dashboard: `expr` fields, and the selector of
/// `label_values(SELECTOR, label)` variable queries.
fn dashboard_queries(json: &str) -> Result<Vec<String>> {
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(map) => {
                for (key, value) in map {
                    match (key.as_str(), value.as_str()) {
                        ("expr", Some(e)) => out.push(e.to_owned()),
                        ("definition" | "query", Some(q)) => out.extend(label_values_selector(q)),
                        _ => walk(value, out),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let value: serde_json::Value = serde_json::from_str(json).context("dashboard JSON")?;
    let mut out = Vec::new();
    walk(&value, &mut out);
    Ok(out)
}

fn label_values_selector(query: &str) -> Option<String> {
    let inner = query
        .trim()
        .strip_prefix("label_values(")?
        .strip_suffix(')')?;
    Some(inner.rsplit_once(',')?.0.to_owned())
}

/// The `expr:` values of an alert-rules file, read as text (no YAML parser among the
/// dependencies): inline, quoted, or `|` / `>` blocks of deeper-indented lines.
fn alert_exprs(yaml: &str) -> Vec<String> {
    let indent = |l: &str| l.len() - l.trim_start().len();
    let lines: Vec<&str> = yaml.lines().collect();
    let mut out = Vec::new();
    for (n, line) in lines.iter().enumerate() {
        let Some(value) = line.trim_start().strip_prefix("expr:") else {
            continue;
        };
        let value = value.trim();
        if value.starts_with('|') || value.starts_with('>') {
            let block: Vec<&str> = lines
                .iter()
                .skip(n + 1)
                .take_while(|l| l.trim().is_empty() || indent(l) > indent(line))
                .map(|l| l.trim())
                .collect();
            out.push(block.join("\n"));
        } else if let Some(q) = value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
            out.push(q.replace("\\\"", "\"").replace("\\\\", "\\"));
        } else if let Some(q) = value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')) {
            out.push(q.replace("''", "'"));
        } else {
            out.push(value.to_owned());
        }
    }
    out
}

/// The metric names of `exprs` (from `file`), at least [`MIN_NAMES`] of them.
fn names_in(file: &str, exprs: &[String]) -> Result<BTreeSet<String>> {
    let names: BTreeSet<String> = exprs.iter().flat_map(|e| promql_metric_names(e)).collect();
    ensure!(
        names.len() >= MIN_NAMES,
        "{file}: only {} metric names found in {} queries: {names:?}",
        names.len(),
        exprs.len()
    );
    Ok(names)
}

/// Fails naming every name of `used` (from `file`) missing from `exported`.
fn check_exported(file: &str, used: &BTreeSet<String>, exported: &BTreeSet<String>) -> Result<()> {
    let unknown: Vec<&String> = used.difference(exported).collect();
    ensure!(
        unknown.is_empty(),
        "{file} uses metrics neither keyless-edge nor keyless-origin exports: {unknown:?}\n\
         exported: {exported:?}"
    );
    Ok(())
}

fn read_deploy(rel: &str) -> Result<String> {
    let path = workspace_root().join(rel);
    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

#[test]
fn promql_names_are_extracted_and_an_unknown_one_is_reported() -> Result<()> {
    let expr = r#"histogram_quantile(0.99, sum by (le, group) (rate(keyless_edge_keyserver_seconds_bucket{result!="ok", op=~"a}b"}[$__rate_interval])))
        / on (instance) group_left (server) keyless_no_such_metric offset 5m
        and sum without (reason) (increase(keyless_queue_dropped_total[1h])) > bool 1e-9"#;
    let names = promql_metric_names(expr);
    let expected = [
        "keyless_edge_keyserver_seconds_bucket",
        "keyless_no_such_metric",
        "keyless_queue_dropped_total",
    ];
    ensure!(
        names == expected.iter().map(|s| s.to_string()).collect(),
        "{names:?}"
    );
    let exported = exported_names(
        "# TYPE keyless_edge_keyserver_seconds histogram\n\
         # TYPE keyless_queue_dropped counter\n# TYPE keyless_no_such counter\n# EOF\n",
    );
    ensure!(
        exported.contains("keyless_queue_dropped_total") && !exported.contains("keyless_no_such")
    );
    let err = check_exported("test", &names, &exported)
        .err()
        .context("an unknown name was not reported")?;
    ensure!(
        err.to_string().contains("[\"keyless_no_such_metric\"]"),
        "the report should name exactly the unknown metric: {err}"
    );
    Ok(())
}

#[test]
fn dashboard_and_alert_rules_are_complete() -> Result<()> {
    let dashboard = read_deploy(DASHBOARD)?;
    let value: serde_json::Value = serde_json::from_str(&dashboard)?;
    ensure!(
        value["__inputs"][0]["name"] == "DS_PROMETHEUS",
        "the dashboard should take its data source as the DS_PROMETHEUS input"
    );
    let panels = value["panels"].as_array().context("no panels")?;
    for p in panels.iter().filter(|p| p["type"] != "row") {
        ensure!(
            p["datasource"]["uid"] == "${DS_PROMETHEUS}" && p["targets"].as_array().is_some(),
            "panel {} has no ${{DS_PROMETHEUS}} data source or no targets",
            p["title"]
        );
    }
    let rules = read_deploy(ALERTS)?;
    let count = |key: &str| {
        rules
            .lines()
            .filter(|l| l.trim_start().starts_with(key))
            .count()
    };
    let alerts = count("- alert:");
    ensure!(alerts >= 8, "{ALERTS}: only {alerts} alerts");
    for key in ["expr:", "for:", "severity:", "summary:", "description:"] {
        ensure!(
            count(key) == alerts,
            "{ALERTS}: {alerts} alerts but {} {key}",
            count(key)
        );
    }
    ensure!(alert_exprs(&rules).len() == alerts);
    Ok(())
}

/// A key server with a token and the edge enrolled towards it. Fields drop in order:
/// the edge first, the deployment (holding the logs) last.
struct Ops {
    edge: Edge,
    _dns: Dns,
    origin: TestOrigin,
    keyserver: KeyServer,
    _hsm: SoftHsm,
    d: Deployment,
}

/// The key server: file keys plus one key on a SoftHSM2 token, one worker with a
/// queue of two, rotating its certificate at start, files polled every 200 ms.
fn start_keyserver(d: &Deployment) -> Result<(KeyServer, SoftHsm)> {
    let hsm = SoftHsm::init(&d.dir().join("hsm"), "ops")?;
    let src = d.dir().join("token-src");
    std::fs::create_dir_all(&src)?;
    let names = ["token.test"];
    install_key(
        &src,
        "token.test",
        KeySpec::EcP256,
        KeyEncoding::Pkcs8,
        &names,
    )?;
    hsm.import(&src.join("token.test.key"), "token.test", "7f")?;
    let store = hsm.store_table();
    let config = d.write_config_variant("origin-ops.toml", move |t| {
        t.insert("workers".into(), 1.into());
        t.insert("queue_size".into(), 2.into());
        t.insert("tls_reload_interval".into(), "200ms".into());
        set_tls(t, "rotate_every", "200d");
        set_tls(t, "ca_cert", "ca/keyserver-ca.crt");
        set_tls(t, "ca_key", "ca/keyserver-ca.key");
        if let Some(keys) = t.get_mut("keys").and_then(|k| k.as_table_mut()) {
            keys.insert("store".into(), vec![toml::Value::Table(store)].into());
        }
    })?;
    let (k, v) = hsm.env();
    let server = KeyServer::start_with_env(d, &config, &[(k, &v)])?;
    Ok((server, hsm))
}

/// `keyless-edge enroll` with a fresh token; the directory of the credential.
fn enroll_edge(d: &Deployment) -> Result<PathBuf> {
    let token = create_token(&d.config_path(), GROUP, "1h", None)?;
    let token_file = d.dir().join("token");
    std::fs::write(&token_file, token.to_text())?;
    let out = d.dir().join("enrolled");
    let server = d.enroll_addr().context("no enrollment API")?;
    let mut cmd = Command::new(edge_bin()?);
    cmd.arg("enroll")
        .args(["--server", &server.to_string()])
        .arg("--ca")
        .arg(d.keyserver_ca())
        .args(["--server-name", "localhost", "--id", "edge-ops"])
        .arg("--token-file")
        .arg(&token_file)
        .arg("--out")
        .arg(&out)
        .env("NO_COLOR", "1");
    let run = run_with_timeout(cmd, Duration::from_secs(30))?;
    ensure!(
        run.status.success(),
        "keyless-edge enroll: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    Ok(out)
}

/// The edge: the enrolled group (renewing at the enrollment API), a disk tier, and
/// bodies over 16 KiB streamed to it.
fn edge_config(
    d: &Deployment,
    ks: &KeyServer,
    dns: &Dns,
    origin: &TestOrigin,
    enrolled: &Path,
) -> Result<EdgeConfig> {
    let path = |f: &str| enrolled.join(f).display().to_string();
    let enroll = d.enroll_addr().context("no enrollment API")?;
    Ok(EdgeConfig::new(d)?
        .nameserver(dns.addr())
        .group(GROUP, &[(ks.addr(), 10, 1)])
        .group_option("ca", path("keyserver-ca.crt"))
        .group_option("cert", path("edge.crt"))
        .group_option("key", path("edge.key"))
        .group_option("enroll", enroll.to_string())
        .cache_option("disk_dir", "cache-disk")
        .cache_option("max_object_bytes", 16_384)
        .site(&[SITE], &format!("http://{ORIGIN_HOST}:{}", origin.port())))
}

fn start() -> Result<Ops> {
    let d = Deployment::init_enroll(&[SITE])?;
    let (keyserver, hsm) = start_keyserver(&d)?;
    let enrolled = enroll_edge(&d)?;
    let logs = d.logs_dir();
    let origin = TestOrigin::start(&logs)?;
    let dns = Dns::start(&logs, &[(ORIGIN_HOST, IpAddr::V4(Ipv4Addr::LOCALHOST))])?;
    let config = edge_config(&d, &keyserver, &dns, &origin, &enrolled)?;
    let edge = Edge::start_with(&d, &config)?;
    Ok(Ops {
        edge,
        _dns: dns,
        origin,
        keyserver,
        _hsm: hsm,
        d,
    })
}

/// A miss, a hit, a large object streamed to disk, and a handshake for an unknown name.
fn drive_edge(s: &Ops) -> Result<()> {
    let cacheable = Scripted::new(200).header("Cache-Control", "max-age=60");
    s.origin
        .script("/cached", &[cacheable.clone().body("cached")])?;
    s.origin
        .script("/large", &[cacheable.body_bytes(100_000)])?;
    for path in ["/cached", "/cached", "/large"] {
        s.edge
            .curl(SITE)
            .get(&s.edge.url(SITE, path))?
            .expect_status(200)?;
    }
    let _ = s.edge.s_client("unknown.test").run()?;
    Ok(())
}

/// Replaces the key server's certificate by a copy of itself (a new inode): a change
/// the file poll reloads.
fn replace_keyserver_cert(d: &Deployment) -> Result<()> {
    let cert = d.dir().join("origin/keyserver.crt");
    let copy = d.dir().join("origin/keyserver.crt.new");
    std::fs::copy(&cert, &copy).with_context(|| format!("copying {}", cert.display()))?;
    std::fs::rename(&copy, &cert)?;
    Ok(())
}

/// Far more pipelined RSA signatures than one worker with a queue of two takes.
async fn flood_queue(d: &Deployment) -> Result<()> {
    let rsa = d.site_key(SITE, KeyAlg::Rsa)?;
    let ops = (0..100)
        .map(|_| Ok(handshake_sign_request(Opcode::RsaPssSignSha256, rsa.ski)?.0))
        .collect::<Result<Vec<_>>>()?;
    let mut client = KeyClient::connect(d).await?;
    client.pipeline(ops).await?;
    Ok(())
}

/// Scrapes both binaries until every name of `used` is exported or [`WAIT`] passes;
/// the names last exported.
fn exported_when_ready(s: &Ops, used: &BTreeSet<String>) -> Result<BTreeSet<String>> {
    let deadline = Instant::now() + WAIT;
    loop {
        let edge = exported_names(&s.edge.metrics_text()?);
        let keyserver = exported_names(&s.keyserver.metrics_text()?);
        ensure!(
            edge.len() >= 20 && keyserver.len() >= 10,
            "scrapes look empty: edge {edge:?}, key server {keyserver:?}"
        );
        let exported: BTreeSet<String> = edge.union(&keyserver).cloned().collect();
        if used.is_subset(&exported) || Instant::now() >= deadline {
            return Ok(exported);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn dashboard_and_alerts_use_only_metrics_the_binaries_export() -> Result<()> {
    let dashboard = names_in(DASHBOARD, &dashboard_queries(&read_deploy(DASHBOARD)?)?)?;
    let alerts = names_in(ALERTS, &alert_exprs(&read_deploy(ALERTS)?))?;
    let s = start()?;
    drive_edge(&s)?;
    replace_keyserver_cert(&s.d)?;
    s.keyserver.signal(Signal::Hup)?;
    s.edge.signal(Signal::Hup)?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(flood_queue(&s.d))?;
    let used: BTreeSet<String> = dashboard.union(&alerts).cloned().collect();
    let exported = exported_when_ready(&s, &used)?;
    check_exported(DASHBOARD, &dashboard, &exported)?;
    check_exported(ALERTS, &alerts, &exported)
}
