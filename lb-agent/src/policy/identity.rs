//! Numeric identities for label sets (namespace + labels) and for policy CIDRs.
//!
//! **Scheme: a deterministic hash, with a persisted table that settles collisions.** An identity is
//! `MIN + hash(canonical key, attempt) mod SPACE`, with `attempt` the first of 0, 1, 2, ... whose
//! slot is free. The canonical key is the namespace and the labels sorted by key, each length-prefixed
//! (so no choice of label text can make two sets encode alike), hashed with 64-bit FNV-1a and a
//! SplitMix64 finaliser: fixed algorithms, so the numbers never change with the Rust version, the
//! agent version or the node.
//!
//! Why hashing: an identity is the same on every node and after every restart without a cluster-wide
//! allocator, and a lost state file only matters for collisions. Why a table too: with 2^24 workload
//! slots, 1000 label sets collide with probability about 3%, and the loser of a collision gets
//! `attempt` 1. Which set loses depends on which came first, so a restart that saw both at once
//! could swap them. So the agent, adopting pinned policy maps after a restart, first
//! [`IdentityAllocator::reserve`]s for each set the identity its addresses have in the adopted
//! ipcache (`super::enforcer`): a known set keeps its identity while it is in use; only a set that has
//! been gone entirely may come back with another one (and only if its slot was taken meanwhile).
//! [`IdentityAllocator::snapshot`] and [`IdentityAllocator::save`] write the table out for other uses. Sets that
//! arrive together are allocated in canonical order, so two fresh allocators given the same sets agree
//! even when those sets collide.
//!
//! CIDR identities use the same scheme in their own node-local range, keyed by the prefix.

use std::{
    collections::{btree_map, BTreeMap, BTreeSet},
    io,
    net::IpAddr,
    path::Path,
};

use lb_common::policy::identity;
use serde::{Deserialize, Serialize};

use super::model::{Cidr, Labels};

/// What an identity stands for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum IdentityKey {
    /// A workload label set.
    Workload { namespace: String, labels: Labels },
    /// A prefix a rule mentions.
    Cidr(Cidr),
}

impl IdentityKey {
    pub fn workload(namespace: &str, labels: &Labels) -> Self {
        IdentityKey::Workload {
            namespace: namespace.to_string(),
            labels: labels.clone(),
        }
    }

    /// Length-prefixed, labels in key order (a `BTreeMap` iterates sorted).
    fn canonical_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut put = |bytes: &[u8]| {
            out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            out.extend_from_slice(bytes);
        };
        match self {
            IdentityKey::Workload { namespace, labels } => {
                put(b"workload");
                put(namespace.as_bytes());
                for (k, v) in labels {
                    put(k.as_bytes());
                    put(v.as_bytes());
                }
            }
            IdentityKey::Cidr(cidr) => {
                put(b"cidr");
                match cidr.addr() {
                    IpAddr::V4(a) => put(&a.octets()),
                    IpAddr::V6(a) => put(&a.octets()),
                }
                put(&[cidr.prefix_len()]);
            }
        }
        out
    }

    fn range(&self) -> (u32, u32) {
        match self {
            IdentityKey::Workload { .. } => (identity::WORKLOAD_MIN, identity::WORKLOAD_MAX),
            IdentityKey::Cidr(_) => (identity::CIDR_MIN, identity::CIDR_MAX),
        }
    }
}

/// Slot candidate `attempt` for a key in `min..=max`.
fn candidate(key: &IdentityKey, attempt: u32, (min, max): (u32, u32)) -> u32 {
    let mut bytes = key.canonical_bytes();
    bytes.extend_from_slice(&attempt.to_le_bytes());
    let space = (max - min) as u64 + 1;
    min + (mix(fnv1a(&bytes)) % space) as u32
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// SplitMix64's finaliser: spreads FNV's weak low bits over the whole word.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Probes before giving up; reached only if the range is nearly full.
const MAX_ATTEMPTS: u32 = 1024;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("no free identity for {0:?} after {MAX_ATTEMPTS} attempts")]
    Exhausted(IdentityKey),
    #[error("identity state: identity {identity} of {key:?} is outside {min}..={max}")]
    OutOfRange {
        key: IdentityKey,
        identity: u32,
        min: u32,
        max: u32,
    },
    #[error("identity state: identity {0} is given twice")]
    Duplicate(u32),
    #[error("identity state {path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("identity state {path}: {message}")]
    Parse { path: String, message: String },
}

/// The allocations to persist: every identity in use, with what it stands for.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IdentitySnapshot {
    pub identities: Vec<Allocation>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Allocation {
    pub identity: u32,
    pub key: IdentityKey,
}

#[derive(Debug, Clone, Default)]
pub struct IdentityAllocator {
    by_key: BTreeMap<IdentityKey, u32>,
    by_id: BTreeMap<u32, IdentityKey>,
    /// Tests shrink the ranges to force collisions.
    ranges: Option<[(u32, u32); 2]>,
}

impl IdentityAllocator {
    pub fn new() -> Self {
        Self::default()
    }

    fn range_of(&self, key: &IdentityKey) -> (u32, u32) {
        match (self.ranges, key) {
            (Some([w, _]), IdentityKey::Workload { .. }) => w,
            (Some([_, c]), IdentityKey::Cidr(_)) => c,
            (None, _) => key.range(),
        }
    }

    pub fn get(&self, key: &IdentityKey) -> Option<u32> {
        self.by_key.get(key).copied()
    }

    pub fn key_of(&self, id: u32) -> Option<&IdentityKey> {
        self.by_id.get(&id)
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// The identity of `key`: the one it has, or the first free hash slot.
    pub fn allocate(&mut self, key: &IdentityKey) -> Result<u32, IdentityError> {
        if let Some(id) = self.get(key) {
            return Ok(id);
        }
        let range = self.range_of(key);
        for attempt in 0..MAX_ATTEMPTS {
            let id = candidate(key, attempt, range);
            if let btree_map::Entry::Vacant(slot) = self.by_id.entry(id) {
                slot.insert(key.clone());
                self.by_key.insert(key.clone(), id);
                return Ok(id);
            }
        }
        Err(IdentityError::Exhausted(key.clone()))
    }

    /// Gives `key` the identity `id` if neither is taken and `id` is in `key`'s range (e.g. the
    /// identity the key had before a restart); returns whether it did.
    pub fn reserve(&mut self, key: &IdentityKey, id: u32) -> bool {
        let (min, max) = self.range_of(key);
        if !(min..=max).contains(&id)
            || self.by_key.contains_key(key)
            || self.by_id.contains_key(&id)
        {
            return false;
        }
        self.by_id.insert(id, key.clone());
        self.by_key.insert(key.clone(), id);
        true
    }

    /// Allocates every key not yet known, in canonical order (so the result does not depend on the
    /// order of `keys`), and returns the identities of all of them.
    pub fn allocate_all<'a>(
        &mut self,
        keys: impl IntoIterator<Item = &'a IdentityKey>,
    ) -> Result<BTreeMap<IdentityKey, u32>, IdentityError> {
        let keys: BTreeSet<&IdentityKey> = keys.into_iter().collect();
        keys.into_iter()
            .map(|k| Ok((k.clone(), self.allocate(k)?)))
            .collect()
    }

    /// Forgets every identity whose key is not in `live`.
    pub fn retain(&mut self, live: &BTreeSet<&IdentityKey>) {
        self.by_key.retain(|k, _| live.contains(k));
        self.by_id.retain(|_, k| live.contains(k));
    }

    pub fn snapshot(&self) -> IdentitySnapshot {
        IdentitySnapshot {
            identities: self
                .by_id
                .iter()
                .map(|(id, key)| Allocation {
                    identity: *id,
                    key: key.clone(),
                })
                .collect(),
        }
    }

    pub fn from_snapshot(snapshot: &IdentitySnapshot) -> Result<Self, IdentityError> {
        let mut this = Self::new();
        this.restore(snapshot)?;
        Ok(this)
    }

    fn restore(&mut self, snapshot: &IdentitySnapshot) -> Result<(), IdentityError> {
        for a in &snapshot.identities {
            let (min, max) = self.range_of(&a.key);
            if !(min..=max).contains(&a.identity) {
                return Err(IdentityError::OutOfRange {
                    key: a.key.clone(),
                    identity: a.identity,
                    min,
                    max,
                });
            }
            if self.by_id.contains_key(&a.identity) || self.by_key.contains_key(&a.key) {
                return Err(IdentityError::Duplicate(a.identity));
            }
            self.by_id.insert(a.identity, a.key.clone());
            self.by_key.insert(a.key.clone(), a.identity);
        }
        Ok(())
    }

    /// Restores the state saved by [`Self::save`]; a missing file is a fresh start.
    pub fn load(path: &Path) -> Result<Self, IdentityError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Self::new()),
            Err(source) => {
                return Err(IdentityError::Io {
                    path: path.display().to_string(),
                    source,
                })
            }
        };
        let snapshot: IdentitySnapshot =
            serde_yaml_ng::from_str(&text).map_err(|e| IdentityError::Parse {
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
        Self::from_snapshot(&snapshot)
    }

    /// Writes the state atomically (a temporary file renamed over the old one).
    pub fn save(&self, path: &Path) -> Result<(), IdentityError> {
        let io_err = |source| IdentityError::Io {
            path: path.display().to_string(),
            source,
        };
        let text = serde_yaml_ng::to_string(&self.snapshot()).expect("snapshot serialises");
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).map_err(io_err)?;
        std::fs::rename(&tmp, path).map_err(io_err)
    }

    #[cfg(test)]
    fn with_ranges(workload: (u32, u32), cidr: (u32, u32)) -> Self {
        Self {
            ranges: Some([workload, cidr]),
            ..Self::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn same_labels_same_identity_across_allocators_in_any_order() {
        let a = IdentityKey::workload("prod", &labels(&[("app", "api"), ("tier", "be")]));
        // Same set, written in the other order.
        let a2 = IdentityKey::workload("prod", &labels(&[("tier", "be"), ("app", "api")]));
        let b = IdentityKey::workload("prod", &labels(&[("app", "web")]));
        let c = IdentityKey::workload("dev", &labels(&[("app", "api"), ("tier", "be")]));
        let cidr = IdentityKey::Cidr("172.17.0.0/16".parse().unwrap());

        let mut one = IdentityAllocator::new();
        let mut two = IdentityAllocator::new();
        let ids1 = one.allocate_all([&a, &b, &c, &cidr]).unwrap();
        let ids2 = two.allocate_all([&cidr, &c, &b, &a2]).unwrap();
        assert_eq!(ids1, ids2);
        assert_eq!(one.get(&a), two.get(&a2));
        // Another namespace is another identity.
        assert_ne!(one.get(&a), one.get(&c));
        // Ranges.
        for key in [&a, &b, &c] {
            let id = one.get(key).unwrap();
            assert!((identity::WORKLOAD_MIN..=identity::WORKLOAD_MAX).contains(&id));
        }
        assert!(identity::is_cidr(one.get(&cidr).unwrap()));
        // Pinned values: the hash is part of the on-node and cross-node contract. If this changes,
        // every node's identities change: don't.
        assert_eq!(candidate(&a, 0, a.range()), one.get(&a).unwrap());
        assert_eq!(
            IdentityAllocator::new().allocate(&b).unwrap(),
            one.get(&b).unwrap()
        );
    }

    #[test]
    fn label_text_cannot_fake_another_set() {
        // Without length prefixes these two would encode alike.
        let x = IdentityKey::workload("a", &labels(&[("b", "c")]));
        let y = IdentityKey::workload("ab", &labels(&[("", "c")]));
        assert_ne!(x.canonical_bytes(), y.canonical_bytes());
    }

    #[test]
    fn collisions_probe_and_the_snapshot_keeps_first_come() {
        // Two slots: every pair collides or not by chance; find a colliding pair.
        let keys: Vec<IdentityKey> = (0..64)
            .map(|i| IdentityKey::workload("ns", &labels(&[("app", &format!("a{i}"))])))
            .collect();
        let range = (1000, 1001);
        let (x, y) = keys
            .iter()
            .flat_map(|x| keys.iter().map(move |y| (x, y)))
            .find(|(x, y)| x < y && candidate(x, 0, range) == candidate(y, 0, range))
            .unwrap();

        // y arrives first and keeps its slot when x arrives later.
        let mut alloc = IdentityAllocator::with_ranges(range, range);
        let y_id = alloc.allocate(y).unwrap();
        let x_id = alloc.allocate(x).unwrap();
        assert_eq!(y_id, candidate(y, 0, range));
        assert_ne!(x_id, y_id);

        // A fresh allocator seeing both at once would give the slot to x (canonical order) ...
        let mut fresh = IdentityAllocator::with_ranges(range, range);
        fresh.allocate_all([x, y]).unwrap();
        assert_eq!(fresh.get(x), Some(y_id));
        // ... but the restored state keeps every identity.
        let mut restored = IdentityAllocator::with_ranges(range, range);
        restored.restore(&alloc.snapshot()).unwrap();
        assert_eq!(
            restored.allocate_all([x, y]).unwrap(),
            alloc.allocate_all([y, x]).unwrap()
        );

        // Full range: a clear error.
        let z = keys.iter().find(|k| *k != x && *k != y).unwrap();
        assert!(matches!(
            alloc.allocate(z),
            Err(IdentityError::Exhausted(_))
        ));
        // Released identities are reused.
        alloc.retain(&[x].into_iter().collect());
        assert_eq!(alloc.len(), 1);
        assert!(alloc.allocate(z).is_ok());
    }

    #[test]
    fn state_file_round_trips_and_bad_state_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("identities.yaml");
        assert!(IdentityAllocator::load(&path).unwrap().is_empty());

        let mut alloc = IdentityAllocator::new();
        let a = IdentityKey::workload("prod", &labels(&[("app", "api")]));
        let c = IdentityKey::Cidr("2001:db8::/32".parse().unwrap());
        alloc.allocate_all([&a, &c]).unwrap();
        alloc.save(&path).unwrap();
        let loaded = IdentityAllocator::load(&path).unwrap();
        assert_eq!(loaded.snapshot(), alloc.snapshot());

        let mut bad = alloc.snapshot();
        bad.identities[0].identity = 7;
        assert!(matches!(
            IdentityAllocator::from_snapshot(&bad),
            Err(IdentityError::OutOfRange { .. })
        ));
        let mut twice = alloc.snapshot();
        twice.identities.push(twice.identities[0].clone());
        assert!(matches!(
            IdentityAllocator::from_snapshot(&twice),
            Err(IdentityError::Duplicate(_))
        ));
    }
}
