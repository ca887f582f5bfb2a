//! The daemon started in this process, for the programs that embed it (the
//! demo, the attack suite, the fault suite, the benches): start, wait until
//! it is ready, stop it as SIGTERM would, or abort it as `kill -9` would.
//! Readiness is awaited on the daemon's own READY signal, never polled.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::{Buses, DaemonError, Observe, Timestamp, run_on};
use crate::can::CanBus;
use crate::gateway::orchestrator::Notice;
use crate::service::config::Config;

/// Why a spawned daemon did not become ready.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("the daemon stopped before it was ready: {0}")]
    Failed(#[source] DaemonError),
    #[error("the daemon stopped cleanly before it was ready")]
    Stopped,
    #[error("the daemon task panicked or was cancelled before it was ready: {0}")]
    Task(#[source] tokio::task::JoinError),
    #[error("the daemon was not ready within {0:?}")]
    Timeout(Duration),
}

/// A daemon running as a task of this process.
pub struct Spawned {
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), DaemonError>>,
    ready: mpsc::UnboundedReceiver<()>,
}

impl Spawned {
    /// Starts `run_on(config, buses)`; `notices`, if given, gets every
    /// [`Notice`].
    pub fn start<B: CanBus + Send + 'static>(
        config: Config,
        buses: Buses<B>,
        notices: Option<mpsc::UnboundedSender<(Timestamp, Notice)>>,
    ) -> Spawned {
        let (ready_tx, ready) = mpsc::unbounded_channel();
        let observe = Observe {
            notices,
            ready: Some(ready_tx),
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            run_on(&config, buses, observe, async {
                let _ = stopped.await;
            })
            .await
        });
        Spawned { stop, task, ready }
    }

    /// Waits until the daemon is ready. If it stops first, its error.
    pub async fn ready(&mut self, within: Duration) -> Result<(), SpawnError> {
        match tokio::time::timeout(within, self.ready.recv()).await {
            Ok(Some(())) => Ok(()),
            // The daemon dropped its sender: it ended before READY.
            Ok(None) => match (&mut self.task).await {
                Ok(Ok(())) => Err(SpawnError::Stopped),
                Ok(Err(e)) => Err(SpawnError::Failed(e)),
                Err(e) => Err(SpawnError::Task(e)),
            },
            Err(_) => Err(SpawnError::Timeout(within)),
        }
    }

    /// Whether the daemon's task has ended.
    pub fn finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Stops the daemon as SIGTERM does, and returns how it ended.
    pub async fn stop(self) -> Result<(), DaemonError> {
        let _ = self.stop.send(());
        self.task.await?
    }

    /// Kills the daemon as `kill -9` would, as far as one process can: its
    /// task is aborted at whatever await it was in, and no shutdown path
    /// runs. (A real `kill -9` is in the VM lane.)
    pub async fn abort(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}
