//! The registered endpoints, kept in `<state dir>/endpoints.json` so that they survive the agent:
//! a restarted agent re-attaches (adopts the pinned links of) the endpoints it finds there. Every
//! change is written before it is answered, atomically (`crate::state_file`), so the file always
//! holds a whole registration set.

use std::{
    collections::BTreeMap,
    fs,
    io::ErrorKind,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::{Endpoint, EndpointKey};
use crate::state_file;

/// The default of `lb-agent run --state-dir`.
pub const DEFAULT_STATE_DIR: &str = "/run/lb-agent";
const FILE_NAME: &str = "endpoints.json";
/// Bumped when the file's meaning changes; a file of another version is refused.
const VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    version: u32,
    endpoints: Vec<Endpoint>,
}

/// The registered endpoints and the file that keeps them.
#[derive(Debug)]
pub struct EndpointStore {
    path: PathBuf,
    endpoints: BTreeMap<EndpointKey, Endpoint>,
}

impl EndpointStore {
    /// Reads `dir/endpoints.json` (none yet: no endpoints), creating `dir` (mode 0700) if needed.
    /// A file that cannot be read or parsed is an error naming it: starting without it would
    /// detach the pods' programs.
    pub fn open(dir: &Path) -> Result<Self> {
        state_file::create_dir(dir)?;
        let path = dir.join(FILE_NAME);
        let endpoints = match fs::read(&path) {
            Ok(bytes) => {
                let file: File = serde_json::from_slice(&bytes).with_context(|| {
                    format!(
                        "{}: not an endpoint registration file (remove it to forget the \
                         registrations)",
                        path.display()
                    )
                })?;
                if file.version != VERSION {
                    bail!(
                        "{}: registration file version {}, this agent reads version {VERSION}",
                        path.display(),
                        file.version
                    );
                }
                file.endpoints.into_iter().map(|e| (e.key(), e)).collect()
            }
            Err(err) if err.kind() == ErrorKind::NotFound => BTreeMap::new(),
            Err(err) => return Err(err).with_context(|| format!("reading {}", path.display())),
        };
        Ok(Self { path, endpoints })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Ordered by key.
    pub fn list(&self) -> Vec<Endpoint> {
        self.endpoints.values().cloned().collect()
    }

    pub fn get(&self, key: &EndpointKey) -> Option<&Endpoint> {
        self.endpoints.get(key)
    }

    /// The registration other than `key` that names `host_interface`, if any.
    pub fn using_interface(&self, host_interface: &str, key: &EndpointKey) -> Option<&Endpoint> {
        self.endpoints
            .values()
            .find(|e| e.host_interface == host_interface && e.key() != *key)
    }

    /// Adds or replaces `endpoint` and writes the file; on a write error nothing changes.
    pub fn insert(&mut self, endpoint: Endpoint) -> Result<Option<Endpoint>> {
        let mut next = self.endpoints.clone();
        let previous = next.insert(endpoint.key(), endpoint);
        self.write(&next)?;
        self.endpoints = next;
        Ok(previous)
    }

    /// Removes the endpoint `key` and writes the file; on a write error nothing changes.
    pub fn remove(&mut self, key: &EndpointKey) -> Result<Option<Endpoint>> {
        if !self.endpoints.contains_key(key) {
            return Ok(None);
        }
        let mut next = self.endpoints.clone();
        let removed = next.remove(key);
        self.write(&next)?;
        self.endpoints = next;
        Ok(removed)
    }

    fn write(&self, endpoints: &BTreeMap<EndpointKey, Endpoint>) -> Result<()> {
        let file = File {
            version: VERSION,
            endpoints: endpoints.values().cloned().collect(),
        };
        let mut bytes = serde_json::to_vec_pretty(&file)?;
        bytes.push(b'\n');
        state_file::write_atomically(&self.path, &bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoints::tests::endpoint;

    #[test]
    fn registrations_survive_a_reopen_and_a_bad_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let mut store = EndpointStore::open(&state).unwrap();
        assert!(store.list().is_empty());
        let first = endpoint();
        let mut second = endpoint();
        second.container_id = "ffff".into();
        second.host_interface = "veth2".into();
        assert_eq!(store.insert(first.clone()).unwrap(), None);
        assert_eq!(store.insert(second.clone()).unwrap(), None);
        assert_eq!(store.insert(first.clone()).unwrap(), Some(first.clone()));
        assert_eq!(
            store
                .using_interface("veth2", &first.key())
                .map(Endpoint::key),
            Some(second.key())
        );
        assert_eq!(store.remove(&second.key()).unwrap(), Some(second.clone()));
        assert_eq!(store.remove(&second.key()).unwrap(), None);
        let reopened = EndpointStore::open(&state).unwrap();
        assert_eq!(reopened.list(), [first]);
        // No temporary file left behind.
        assert_eq!(fs::read_dir(&state).unwrap().count(), 1);
        fs::write(reopened.path(), "{\"version\": 1, \"endpoints\": [{}]}").unwrap();
        let err = format!("{:#}", EndpointStore::open(&state).unwrap_err());
        assert!(
            err.contains("endpoints.json: not an endpoint registration file"),
            "{err}"
        );
    }
}
