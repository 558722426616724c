//! The `switchyard` binary: parse the command line, set up logging, run a subcommand.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use switchyard::app::App;
use switchyard::auth::NewKey;
use switchyard::cli::{Cli, Command, ConfigArgs, KeysArgs, KeysCommand};
use switchyard::config::Settings;
use switchyard::limits::BudgetPeriod;
use switchyard::store::Store;

/// jemalloc rather than glibc's allocator: about 11 % fewer instructions per request,
/// and the memory of a burst of streams goes back to the system afterwards (its
/// background thread purges freed pages) instead of staying at the peak. mimalloc was as
/// cheap in CPU but held 40 % more memory per open stream. Measured in
/// docs/BENCHMARKS.md, "Allocator".
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("switchyard: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("switchyard: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => {
            let mut settings = match &args.config.config {
                Some(path) => Settings::load(path)?,
                None => Settings::offline_default(),
            };
            if let Some(listen) = args.listen {
                settings.server.listen = listen;
                if !settings.unauthenticated_listener_allowed() {
                    anyhow::bail!(
                        "auth.mode = \"none\" on the non-loopback listener {listen}: set \
                         auth.allow_none_on_public_listener = true if that is really meant"
                    );
                }
            }
            switchyard::telemetry::init_logging(&settings.log)?;
            if settings.is_simulated_only() {
                tracing::warn!(
                    model = switchyard::config::SIMULATED_MODEL,
                    "no real provider configured: serving the built-in simulated provider; \
                     every answer is SIMULATED (pass --config switchyard.toml to use real providers)"
                );
            }
            let app = App::build(settings).await?;
            let result = app.run(shutdown_signal()).await;
            switchyard::telemetry::otlp::shutdown().await;
            result
        }
        Command::CheckConfig(args) => {
            let path = args
                .config
                .context("no config file given (use --config FILE)")?;
            let settings = Settings::load(&path)?;
            println!(
                "{}: ok ({} providers, {} models)",
                path.display(),
                settings.providers.len(),
                settings.models.len()
            );
            Ok(())
        }
        Command::Migrate(args) => {
            let settings = settings_or_default(&args)?;
            let store = Store::connect(&settings.database).await?;
            println!("database ({}) is up to date", store.backend());
            store.close().await;
            Ok(())
        }
        Command::Keys(args) => keys(args).await,
        // Stdout is the protocol's channel here: nothing else may be written to it.
        Command::MockUpstream(args) if args.mcp_stdio => {
            switchyard_loadlab::mcp::serve_stdio().await
        }
        Command::MockUpstream(args) => {
            switchyard::telemetry::init_logging(&Default::default())?;
            let mock = switchyard_loadlab::mock::MockServer::start(args.listen, args.behaviour)
                .await
                .with_context(|| format!("binding {}", args.listen))?;
            tracing::info!(addr = %mock.addr, base_url = %mock.base_url(), "mock upstream listening");
            shutdown_signal().await;
            mock.shutdown().await;
            Ok(())
        }
        Command::BenchWriter(args) => {
            let settings = settings_or_default(&args.config)?;
            switchyard::store::bench::run(&settings, args.rows).await
        }
        Command::BenchTokens(args) => {
            switchyard::tokens::bench::run(args.mib, &mut std::io::stdout().lock())?;
            Ok(())
        }
        Command::Bench(args) => {
            switchyard::app::install_crypto();
            switchyard_loadlab::bench::run(*args).await
        }
    }
}

/// The config file's settings, or the defaults (and so `./switchyard.db`) without one.
fn settings_or_default(args: &ConfigArgs) -> anyhow::Result<Settings> {
    Ok(match &args.config {
        Some(path) => Settings::load(path)?,
        None => Settings::offline_default(),
    })
}

async fn keys(args: KeysArgs) -> anyhow::Result<()> {
    let settings = settings_or_default(&args.config)?;
    let store = Store::connect(&settings.database)
        .await
        .context("opening the database")?;
    let result = match args.command {
        KeysCommand::Create(create) => {
            let new = NewKey {
                name: create.name,
                models: create.models,
                rpm: create.rpm,
                tpm: create.tpm,
                budget_tokens: create.budget,
                budget_period: BudgetPeriod::parse(&create.budget_period),
            };
            let (secret, row) = switchyard::auth::create_key(&store, &new).await?;
            println!("created {} ({})", row.id, row.name);
            println!("store this key now; it cannot be shown again:");
            println!("{secret}");
            Ok(())
        }
        KeysCommand::List { json } => {
            let keys = store.list_keys().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&keys)?);
            } else {
                println!(
                    "{:<21} {:<20} {:<11} {:<8} {:<10} {:<16} STATUS",
                    "ID", "NAME", "PREFIX", "RPM", "TPM", "BUDGET"
                );
                for k in keys {
                    let budget = k
                        .budget_tokens
                        .map_or("-".into(), |b| format!("{b}/{}", k.budget_period));
                    let opt = |v: Option<i64>| v.map_or("-".into(), |v| v.to_string());
                    println!(
                        "{:<21} {:<20} {:<11} {:<8} {:<10} {:<16} {}",
                        k.id,
                        k.name,
                        format!("{}…", k.prefix),
                        opt(k.rpm),
                        opt(k.tpm),
                        budget,
                        if k.revoked_at.is_some() {
                            "revoked"
                        } else {
                            "active"
                        }
                    );
                }
            }
            Ok(())
        }
        KeysCommand::Revoke { id } => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            if store.revoke_key(&id, now).await? {
                println!(
                    "revoked {id} (running instances stop accepting it within [auth] key_cache_ttl)"
                );
                Ok(())
            } else {
                Err(anyhow::anyhow!("no live key with id {id}"))
            }
        }
    };
    store.close().await;
    result
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
