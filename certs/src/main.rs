//! `keyless-certs`: PKI tooling for keyless.
//!
//! `init` writes a complete loopback deployment (three CAs, site keys for the key
//! server, mTLS identities for the key server and one edge, and both configuration
//! files); `inspect` describes the certificates and keys in a PEM file; `revoke` writes
//! the edge CA's CRL.
#![forbid(unsafe_code)]

mod init;
mod inspect;
mod pki;
mod revoke;
#[cfg(test)]
mod testutil;

use std::io;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "keyless-certs", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write a complete loopback deployment: CAs, site keys, key server and edge
    /// identities, origin.toml and edge.toml.
    Init(init::InitArgs),
    /// Revoke edge client certificates: write (or extend) a CRL signed by the edge CA
    /// for the key server's `[tls] client_crl`.
    Revoke(revoke::RevokeArgs),
    /// Describe every certificate and key in a PEM file (never prints key material).
    Inspect {
        /// The PEM file.
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut stdout = io::stdout().lock();
    let result = match &cli.command {
        Command::Init(args) => init::run(args, &mut stdout),
        Command::Inspect { file } => inspect::run(file, &mut stdout),
        Command::Revoke(args) => revoke::run(args, &mut stdout),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keyless-certs: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
