//! The `switchyard` binary: parse the command line, set up logging, run a subcommand.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use switchyard::app::App;
use switchyard::cli::{Cli, Command};
use switchyard::config::Settings;
use switchyard::loadlab;

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
        Command::MockUpstream(args) => {
            switchyard::telemetry::init_logging(&Default::default())?;
            let mock = loadlab::mock::MockServer::start(args.listen, args.behaviour)
                .await
                .with_context(|| format!("binding {}", args.listen))?;
            tracing::info!(addr = %mock.addr, base_url = %mock.base_url(), "mock upstream listening");
            shutdown_signal().await;
            mock.shutdown().await;
            Ok(())
        }
        Command::Bench(args) => {
            switchyard::app::install_crypto();
            loadlab::bench::run(args).await
        }
    }
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
