//! `tally-api`: usage and entitlements for product teams over HTTP/JSON (PRODUCT.md §11).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

use tally::api::config::ApiConfig;

#[derive(Parser)]
#[command(name = "tally-api", version, about = "Usage and plan limits for product teams, from the numbers that bill")]
struct Cli {
    /// Config file (TOML); every key can also be set as TALLY_<SECTION>_<KEY> (e.g. TALLY_API_LISTEN).
    #[arg(long, global = true, env = "TALLY_API_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve GET /v1/usage, GET /v1/entitlements/{org_id} and /openapi.json on api.listen.
    Serve {
        /// Listen address (overrides api.listen / TALLY_API_LISTEN).
        #[arg(long)]
        listen: Option<String>,
    },
    /// Print the OpenAPI 3 document.
    Openapi,
}

fn main() -> anyhow::Result<()> {
    tally::disable_transparent_huge_pages();
    tally::init_logging("info");
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { listen } => {
            let mut cfg = ApiConfig::load(cli.config.as_deref(), std::env::vars()).context("failed to load config")?;
            if let Some(l) = listen {
                cfg.api.listen = l;
                cfg.validate()?;
            }
            tally::api::serve(cfg)
        }
        Command::Openapi => {
            println!("{}", tally::api::http::OPENAPI);
            Ok(())
        }
    }
}
