//! The gRPC API's flow events setting, kept in `<state dir>/flow-events.json` so that a restarted
//! agent keeps it (see [`super::switch`] for when it still holds). Written whenever the API's
//! setting changes, removed when it is reset or dropped.

use std::{
    fs,
    io::ErrorKind,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::switch::{ApiSetting, FlowEventsSwitch};
use crate::{pins, state_file};

const FILE_NAME: &str = "flow-events.json";
/// Bumped when the file's meaning changes; a file of another version is ignored (with a warning).
const VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    version: u32,
    api: ApiSetting,
}

/// Where the API's setting is kept.
#[derive(Debug, Clone)]
pub struct SavedSwitch {
    path: PathBuf,
}

impl SavedSwitch {
    /// The setting file in the state directory `dir`.
    pub fn new(dir: &Path) -> Self {
        Self {
            path: dir.join(FILE_NAME),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The setting an earlier agent saved, if any. A file that cannot be read or parsed is an
    /// error naming it.
    pub fn load(&self) -> Result<Option<ApiSetting>> {
        let bytes = match fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == ErrorKind::NotFound => return Ok(None),
            Err(err) => {
                return Err(err).with_context(|| format!("reading {}", self.path.display()))
            }
        };
        let file: File = serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "{}: not a flow events setting file (remove it, or set flow events again)",
                self.path.display()
            )
        })?;
        if file.version != VERSION {
            bail!(
                "{}: flow events setting file version {}, this agent reads version {VERSION}",
                self.path.display(),
                file.version
            );
        }
        Ok(Some(file.api))
    }

    /// Keeps `switch`'s API setting; removes the file when the API has none.
    pub fn save(&self, switch: &FlowEventsSwitch) -> Result<()> {
        match switch.api_setting() {
            Some(api) => {
                let mut bytes = serde_json::to_vec_pretty(&File {
                    version: VERSION,
                    api,
                })?;
                bytes.push(b'\n');
                state_file::write_atomically(&self.path, &bytes)
            }
            None => pins::remove_if_present(&self.path),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_api_setting_is_kept_until_reset_and_a_bad_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let saved = SavedSwitch::new(dir.path());
        assert_eq!(saved.load().unwrap(), None);
        let mut switch = FlowEventsSwitch::new(true, Some(false));
        switch.set_api(Some(true));
        saved.save(&switch).unwrap();
        assert_eq!(saved.load().unwrap(), switch.api_setting());
        switch.set_api(None);
        saved.save(&switch).unwrap();
        assert_eq!(saved.load().unwrap(), None);
        assert!(!saved.path().exists());
        fs::write(
            saved.path(),
            "{\"version\": 1, \"api\": {\"enabled\": true}}",
        )
        .unwrap();
        let err = format!("{:#}", saved.load().unwrap_err());
        assert!(
            err.contains("flow-events.json: not a flow events setting file"),
            "{err}"
        );
    }
}
