//! Supervision of the agent's long-running tasks: each runs forever, so one that ends or panics
//! is a failure the whole agent reports (and exits on), instead of carrying on with stale data.
//!
//! `INFERWATCH_TEST_FAULT=panic:NAME` or `stall:NAME` makes the task NAME panic, or block its
//! worker thread for good, two seconds after start: the fault tests use it to show that a dead
//! task ends the agent and a stuck one turns `/healthz` to 503. Nothing else reads it.

use std::{future::Future, time::Duration};

use tokio::task::JoinSet;

pub(super) struct Supervisor {
    tasks: JoinSet<(&'static str, Result<(), String>)>,
    fault: Option<(String, String)>,
}

impl Supervisor {
    pub(super) fn from_env() -> Self {
        let fault = std::env::var("INFERWATCH_TEST_FAULT")
            .ok()
            .and_then(|f| f.split_once(':').map(|(kind, task)| (kind.to_string(), task.to_string())));
        if let Some((kind, task)) = &fault {
            tracing::warn!("test fault injection: {kind} of task {task} in 2 s (INFERWATCH_TEST_FAULT)");
        }
        Self { tasks: JoinSet::new(), fault }
    }

    /// Supervises `task`, which should never finish: its `Err` says why it did.
    pub(super) fn spawn(
        &mut self,
        name: &'static str,
        task: impl Future<Output = Result<(), String>> + Send + 'static,
    ) {
        let fault = self.fault.as_ref().filter(|(_, t)| t == name).map(|(kind, _)| kind.clone());
        self.tasks.spawn(async move {
            let outcome = match fault {
                None => task.await,
                Some(kind) => {
                    // The task stays alive (not dropped) while the fault holds its thread.
                    tokio::pin!(task);
                    tokio::select! {
                        outcome = &mut task => outcome,
                        () = tokio::time::sleep(Duration::from_secs(2)) => match inject(&kind, name) {
                            Ok(()) => task.await,
                            Err(e) => Err(e),
                        },
                    }
                }
            };
            (name, outcome)
        });
    }

    /// [`Self::spawn`] for a task without a result: its ending at all is the failure.
    pub(super) fn spawn_forever(
        &mut self,
        name: &'static str,
        task: impl Future<Output = ()> + Send + 'static,
    ) {
        self.spawn(name, async move {
            task.await;
            Err("it stopped".to_string())
        });
    }

    /// Waits for the first task to end (or panic), and says which and why.
    pub(super) async fn first_failure(&mut self) -> String {
        let failure = match self.tasks.join_next().await {
            None => return std::future::pending().await,
            Some(Ok((name, Ok(())))) => format!("task {name} ended"),
            Some(Ok((name, Err(why)))) => format!("task {name} failed: {why}"),
            Some(Err(e)) if e.is_panic() => format!("a task panicked: {e}"),
            Some(Err(e)) => format!("a task was cancelled: {e}"),
        };
        tracing::error!("{failure}");
        failure
    }
}

fn inject(kind: &str, name: &str) -> Result<(), String> {
    match kind {
        "panic" => panic!("injected fault: task {name} panics (INFERWATCH_TEST_FAULT)"),
        "stall" => loop {
            // Blocks this worker thread for good, as a task stuck in a loop or a lock would.
            std::thread::sleep(Duration::from_secs(3600));
        },
        other => Err(format!("unknown injected fault {other:?}")),
    }
}
