//! `badgegate run`: config → start → ready → wait for SIGTERM/SIGINT → drain → exit 0.

use std::path::Path;
use std::process::ExitCode;

use super::{init_tracing, load, with_runtime, LogFormat, EXIT_IO, EXIT_USAGE};
use crate::app::{Agent, StartError};

pub fn run(path: &Path, format: LogFormat) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    init_tracing(&config.agent.log_level, format);
    with_runtime(|| async move {
        let agent = match Agent::start(config).await {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
                eprintln!("badgegate: {e}");
                return ExitCode::from(match e {
                    StartError::Store(_) | StartError::Bind { .. } => EXIT_IO,
                    StartError::Protime(_)
                    | StartError::CrossChex(_)
                    | StartError::Aktion(_)
                    | StartError::Tls(_)
                    | StartError::People(_) => EXIT_USAGE,
                });
            }
        };
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        let watchdog = sd_notify::watchdog_enabled().map(|period| {
            let healthy = agent.health_probe();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(period / 2);
                loop {
                    tick.tick().await;
                    // A store that cannot be written is not alive: let systemd restart us.
                    if healthy() {
                        let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                    }
                }
            })
        });
        wait_for_signal().await;
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        if let Some(w) = watchdog {
            w.abort();
        }
        agent.shutdown().await;
        ExitCode::SUCCESS
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch SIGTERM");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}
