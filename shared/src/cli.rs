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
}

/// Logs to stderr at the level of `KEYLESS_LOG` (default `info`). rustls' own
/// messages are kept to errors unless `KEYLESS_LOG` names `rustls`: its warnings are
/// about what single clients send (e.g. an IP address as SNI) and would log a line per
/// connection; our handshake logs already say why a handshake failed.
pub fn init_logging(format: LogFormat) {
    const DEFAULT: &str = "info";
    let spec = std::env::var("KEYLESS_LOG").unwrap_or_else(|_| DEFAULT.to_owned());
    let spec = if spec.contains("rustls") {
        spec
    } else {
        format!("{spec},rustls=error")
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&spec)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{DEFAULT},rustls=error")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Prints `error` and its causes to stderr, then exits with status 1.
pub fn exit_with_error(program: &str, error: &(dyn std::error::Error + 'static)) -> ! {
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
