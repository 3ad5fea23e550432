//! Files of the agent's state directory (`lb-agent run --state-dir`): what must outlive the agent
//! process but not the node (endpoint registrations, the gRPC API's flow events setting). Each is
//! written whole or not at all, so a crash never leaves half a file.

use std::{
    fs,
    io::Write,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::Path,
};

use anyhow::{Context, Result};

/// Creates the state directory `dir` (mode 0700, parents too) if it does not exist.
pub fn create_dir(dir: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating the state directory {}", dir.display()))
}

/// Replaces `path` with `bytes` atomically: a temporary file beside it (mode 0600), fsync,
/// rename, and a sync of the directory so that the rename is durable.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let temporary = path.with_extension(format!("tmp.{}", std::process::id()));
    let written = (|| {
        let mut out = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temporary)?;
        out.write_all(bytes)?;
        out.sync_all()?;
        fs::rename(&temporary, path)?;
        if let Some(dir) = path.parent() {
            fs::File::open(dir)?.sync_all()?;
        }
        Ok::<_, std::io::Error>(())
    })();
    if written.is_err() {
        let _ = fs::remove_file(&temporary);
    }
    written.with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("a/state");
        create_dir(&state).unwrap();
        let path = state.join("x.json");
        write_atomically(&path, b"one").unwrap();
        write_atomically(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        // No temporary file left behind.
        assert_eq!(fs::read_dir(&state).unwrap().count(), 1);
    }
}
