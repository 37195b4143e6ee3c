//! Stopping cleanly on SIGTERM or SIGINT.

use tokio::sync::watch;

/// A receiver that turns `true` when the process should stop.
pub type Shutdown = watch::Receiver<bool>;

/// Returns a [`Shutdown`] that fires on the first SIGTERM or SIGINT.
pub fn on_signals() -> std::io::Result<Shutdown> {
    let (tx, rx) = watch::channel(false);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received, stopping"),
            _ = int.recv() => tracing::info!("SIGINT received, stopping"),
        }
        let _ = tx.send(true);
    });
    Ok(rx)
}

/// Waits until `shutdown` fires (or its sender is gone).
pub async fn wait(mut shutdown: Shutdown) {
    while !*shutdown.borrow() {
        if shutdown.changed().await.is_err() {
            return;
        }
    }
}
