//! What every keyless binary's command line shares: `--config`, `--test`,
//! `--log-format`, logging set-up and how a fatal error is printed.

use std::io::IsTerminal;
use std::path::PathBuf;

/// Log output format.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    Human,
    /// One JSON object per event.
    Json,
}

/// Arguments of a server binary.
#[derive(Debug, clap::Args)]
pub struct ServerArgs {
    /// Path to the configuration file (TOML).
    #[arg(long, short = 'c')]
    pub config: PathBuf,
    /// Validate the configuration and every file it names, then exit.
    #[arg(long, short = 't')]
    pub test: bool,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
    /// Take the listening sockets from the running process (over the configuration's
    /// `upgrade_socket`) instead of binding them; once this process serves, that one
    /// stops accepting, drains its connections and exits (a zero-downtime upgrade).
    #[arg(long)]
    pub upgrade: bool,
}

/// Lines the log writer thread may have queued before a logging call waits for it.
const LOG_QUEUE_LINES: usize = 8192;

/// The log writer thread's guard, taken by [`flush_logs`] (a `static` so that
/// [`exit_with_error`], which never returns, can flush too).
static LOG_WRITER: std::sync::Mutex<Option<tracing_appender::non_blocking::WorkerGuard>> =
    std::sync::Mutex::new(None);

/// Held by `main` for the life of the process: dropping it writes out every queued log
/// line (see [`flush_logs`]).
#[must_use = "dropping the guard stops the log writer"]
pub struct LogGuard {
    tracing: Option<crate::telemetry::Tracing>,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        if let Some(tracing) = self.tracing.take() {
            tracing.shutdown();
        }
        flush_logs();
    }
}

/// Logs to stderr at the level of `KEYLESS_LOG` (default `info`). rustls' own
/// messages are kept to errors unless `KEYLESS_LOG` names `rustls`: its warnings are
/// about what single clients send (e.g. an IP address as SNI) and would log a line per
/// connection; our handshake logs already say why a handshake failed.
///
/// Lines are formatted by the thread that logs and written by a thread of their own
/// (`keyless-log`), many lines per `write`: a worker signing or serving never waits
/// for stderr's pipe or journald while the queue has room. No line is dropped: when
/// [`LOG_QUEUE_LINES`] lines wait, logging waits (as writing to stderr directly did).
///
/// With `tracing` (its `[tracing]` and the process's name) naming a collector, spans of
/// the `keyless::trace` target are also exported there ([`crate::telemetry`]), whatever
/// `KEYLESS_LOG` says.
pub fn init_logging(
    format: LogFormat,
    tracing: Option<(&crate::telemetry::TracingConfig, &'static str)>,
) -> LogGuard {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::Layer as _;
    const DEFAULT: &str = "info";
    let spec = std::env::var("KEYLESS_LOG").unwrap_or_else(|_| DEFAULT.to_owned());
    let spec = if spec.contains("rustls") {
        spec
    } else {
        format!("{spec},rustls=error")
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&spec)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{DEFAULT},rustls=error")));
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .buffered_lines_limit(LOG_QUEUE_LINES)
        .thread_name("keyless-log")
        .finish(std::io::BufWriter::with_capacity(
            64 * 1024,
            std::io::stderr(),
        ));
    *LOG_WRITER.lock().unwrap_or_else(|e| e.into_inner()) = Some(guard);
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(writer);
    let fmt = match format {
        LogFormat::Human => fmt.boxed(),
        LogFormat::Json => fmt.json().boxed(),
    };
    let (exporter, error) = match tracing.map(|(c, name)| crate::telemetry::start(c, name)) {
        Some(Ok(Some((exporter, tracer)))) => (Some((exporter, tracer)), None),
        Some(Err(e)) => (None, Some(e)),
        _ => (None, None),
    };
    let (tracing, otel) = match exporter {
        Some((exporter, tracer)) => {
            let only_traces = tracing_subscriber::filter::Targets::new()
                .with_target(crate::telemetry::TARGET, tracing::Level::TRACE);
            let layer = tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_filter(only_traces);
            (Some(exporter), Some(layer))
        }
        None => (None, None),
    };
    tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(otel)
        .init();
    if let Some(e) = error {
        tracing::error!(error = %e, "tracing off");
    }
    LogGuard { tracing }
}

/// Writes out every queued log line and stops the log writer (waiting at most a second
/// for a stuck stderr); later lines are lost. Called when the process ends.
pub fn flush_logs() {
    let guard = LOG_WRITER.lock().unwrap_or_else(|e| e.into_inner()).take();
    drop(guard);
}

/// Prints `error` and its causes to stderr, then exits with status 1.
pub fn exit_with_error(program: &str, error: &(dyn std::error::Error + 'static)) -> ! {
    flush_logs();
    eprintln!("{program}: error: {error}");
    // Our errors often quote their cause already: print each new part once.
    let mut shown = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !shown.contains(&text) {
            eprintln!("  caused by: {text}");
        }
        shown = text;
        cause = c.source();
    }
    std::process::exit(1);
}
