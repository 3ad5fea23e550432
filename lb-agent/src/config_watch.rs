//! Notices changes of the config file as they happen (inotify on its directory, through
//! `notify`), so an edit reaches the datapath in tens of milliseconds instead of at the next poll.
//!
//! The directory is watched, not the file: editors and tools replace the file (write a new one,
//! rename it over it) and a Kubernetes ConfigMap volume swaps its `..data` symlink, either of which
//! ends a watch on the file itself. Any event in the directory only prompts the agent to compare
//! the file's stamp (modification time, size, inode), so unrelated files cost a `stat`. Events are
//! debounced (the directory quiet for [`QUIET`]) so that a file written in several steps is read
//! once, complete. The agent keeps polling as well (`--config-poll-interval`), for filesystems
//! without inotify (NFS, some FUSE) and in case a watch fails.

use std::{path::Path, time::Duration};

use anyhow::{Context, Result};
use notify_debouncer_mini::{
    new_debouncer, notify::RecommendedWatcher, notify::RecursiveMode, DebounceEventResult,
    Debouncer,
};
use tokio::sync::mpsc;
use tracing::warn;

/// How long the directory must be quiet before a change is reported.
pub const QUIET: Duration = Duration::from_millis(50);

/// A watch on the config file's directory; dropping it stops the watch.
pub struct ConfigWatch {
    _debouncer: Debouncer<RecommendedWatcher>,
    changes: mpsc::UnboundedReceiver<()>,
}

impl ConfigWatch {
    /// Watches the directory holding `config_path`.
    pub fn new(config_path: &Path) -> Result<Self> {
        let dir = match config_path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        let (tx, changes) = mpsc::unbounded_channel();
        let mut debouncer = new_debouncer(QUIET, move |result: DebounceEventResult| match result {
            Ok(_) => {
                // The receiver is gone only when the agent stops.
                let _ = tx.send(());
            }
            Err(err) => warn!("config file watch: {err}; the file is still polled"),
        })
        .context("starting the config file watch")?;
        debouncer
            .watcher()
            .watch(dir, RecursiveMode::NonRecursive)
            .with_context(|| format!("watching {}", dir.display()))?;
        Ok(Self {
            _debouncer: debouncer,
            changes,
        })
    }

    /// Waits until something in the directory changed (cancel-safe).
    pub async fn changed(&mut self) {
        if self.changes.recv().await.is_none() {
            // The watch thread ended: never report again (the poll remains).
            std::future::pending::<()>().await;
        }
    }
}

/// The next change of an optional watch; never resolves without one.
pub async fn next_change(watch: &mut Option<ConfigWatch>) {
    match watch {
        Some(watch) => watch.changed().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file replaced by rename (as editors and `kubectl cp` do) and one written in place both
    /// wake the watch; a quiet directory does not.
    #[tokio::test]
    async fn replacing_or_writing_the_file_is_noticed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lb.yaml");
        std::fs::write(&path, "services: []\n").unwrap();
        let mut watch = Some(ConfigWatch::new(&path).unwrap());
        let wait = Duration::from_secs(5);

        assert!(
            tokio::time::timeout(QUIET * 4, next_change(&mut watch))
                .await
                .is_err(),
            "no change, no wake-up"
        );
        let tmp = dir.path().join(".lb.yaml.tmp");
        std::fs::write(&tmp, "services: []\n# v2\n").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        tokio::time::timeout(wait, next_change(&mut watch))
            .await
            .expect("rename noticed");
        std::fs::write(&path, "services: []\n# v3\n").unwrap();
        tokio::time::timeout(wait, next_change(&mut watch))
            .await
            .expect("write noticed");
    }
}
