//! Pinned maps carried over into maps of another size: an agent started with another
//! `--conntrack-entries`, `--max-services` or `--max-backends` than the pinned state keeps the
//! tracked flows, services, backend ids, Maglev tables and statistics instead of flushing them.
//!
//! The kernel cannot resize a map. Each such map is created anew by the load (not taken from its
//! pin), and [`Resize::start`] copies the pinned map's entries into it before the agent reads
//! anything back. The programs still attached keep using the pinned maps until the new programs
//! replace them on every link; [`Resize::finish`], called once they have, copies the flows the old
//! programs started in between (LRU maps: the entries the new map lacks) and pins the new maps in
//! place of the old ones. Statistics the old programs counted in between are not carried over
//! (the milliseconds from the load to the attach).
//!
//! Shrinking keeps what fits and refuses what would be lost: an array must hold nothing beyond
//! its new size (backend and service ids in use, their tables), a hash map must fit
//! (`SERVICES`, `BACKEND_REPLY`); per-CPU statistics of ids beyond the new size are dropped, and a
//! smaller LRU map (connection tracking) evicts what does not fit, as it would under pressure.
//! A refusal happens before anything pinned changes: the running datapath stays as it is.
//!
//! Transient maps of another definition (`FRAGMENTS`) are not copied: the load creates them empty
//! and [`Resize::finish`] pins them like the resized ones.

use std::{collections::HashSet, path::PathBuf};

use anyhow::{bail, ensure, Context, Result};
use aya::{
    maps::{MapData, MapType},
    Ebpf,
};
use tracing::{info, warn};

use crate::{
    map_batch::{self, Entries},
    pins::{self, PinDir},
};

/// Maps of a load whose pinned predecessors had another size; see the module documentation.
#[derive(Debug)]
pub struct Resize {
    maps: Vec<Carried>,
    recreated: Vec<Recreated>,
}

#[derive(Debug)]
struct Carried {
    name: String,
    pin: PathBuf,
    /// The pinned map the attached programs still use until [`Resize::finish`].
    old: MapData,
    /// Written by the datapath (connection tracking): copied again at the finish.
    lru: bool,
}

/// A transient map of another definition, replaced by the load's empty one.
#[derive(Debug)]
struct Recreated {
    name: String,
    pin: PathBuf,
}

impl Resize {
    /// Copies each pinned map of `names` into the map of the same name `ebpf` created; the maps
    /// `recreated` stay as created (empty).
    pub fn start(
        pins: &PinDir,
        names: &[String],
        recreated: &[String],
        ebpf: &Ebpf,
    ) -> Result<Self> {
        let mut maps = Vec::new();
        for name in names {
            let pin = pins.map(name);
            let old = MapData::from_pin(&pin)
                .with_context(|| format!("opening the pinned {name} ({})", pin.display()))?;
            let new = map_batch::map_data(ebpf, name)?;
            let old_info = old.info()?;
            let (from, to) = (old_info.max_entries(), new.info()?.max_entries());
            let lru = old_info.map_type()? == MapType::LruHash;
            let copied = copy(&old, new)
                .with_context(|| format!("carrying {name} over from {from} to {to} entries"))?;
            info!(map = %name, from, to, copied, "pinned map carried over into its new size");
            maps.push(Carried {
                name: name.clone(),
                pin,
                old,
                lru,
            });
        }
        for name in recreated {
            info!(map = %name, "transient pinned map of another definition: recreated empty");
        }
        let recreated = recreated
            .iter()
            .map(|name| Recreated {
                name: name.clone(),
                pin: pins.map(name),
            })
            .collect();
        Ok(Self { maps, recreated })
    }

    /// Once the new programs are attached everywhere: copies the flows the old programs tracked
    /// since [`Resize::start`] and pins the new maps in place of the old ones.
    pub fn finish(self, ebpf: &Ebpf) -> Result<()> {
        for carried in self.maps {
            let new = map_batch::map_data(ebpf, &carried.name)?;
            if carried.lru {
                let added = copy_missing(&carried.old, new)
                    .with_context(|| format!("carrying the last flows of {} over", carried.name))?;
                if added > 0 {
                    info!(map = %carried.name, added, "entries tracked during the resize carried over");
                }
            }
            repin(ebpf, &carried.name, &carried.pin)?;
        }
        for recreated in self.recreated {
            repin(ebpf, &recreated.name, &recreated.pin)?;
        }
        Ok(())
    }
}

/// Pins the map `name` of `ebpf` at `pin`, in place of what was pinned there.
fn repin(ebpf: &Ebpf, name: &str, pin: &std::path::Path) -> Result<()> {
    pins::remove_if_present(pin)?;
    ebpf.map(name)
        .with_context(|| format!("{name} missing from the object"))?
        .pin(pin)
        .with_context(|| format!("pinning {}", pin.display()))
}

/// Copies the entries of `old` into the empty `new` (same type, key and value, another size);
/// returns how many.
fn copy(old: &MapData, new: &MapData) -> Result<usize> {
    let capacity = new.info()?.max_entries() as usize;
    let entries = map_batch::read_entries(old).context("reading the pinned map")?;
    let slot = |key: &[u8]| u32::from_ne_bytes(key.try_into().expect("4-byte array key")) as usize;
    let in_use = |value: &[u8]| value.iter().any(|b| *b != 0);
    let kind = old.info()?.map_type()?;
    let written = match kind {
        MapType::Array | MapType::ArrayOfMaps => {
            // Empty slots of an array of maps are not read at all; of an array, zeroes.
            let used = entries.filtered(|_, value| in_use(value));
            if let Some(beyond) = (0..used.len())
                .map(|i| slot(used.get(i).0))
                .find(|s| *s >= capacity)
            {
                bail!("slot {beyond} is in use, beyond the new size {capacity}");
            }
            if kind == MapType::ArrayOfMaps {
                copy_inner_maps(&used, new)?;
            } else {
                map_batch::write_entries(new, &used)?;
            }
            used
        }
        MapType::PerCpuArray => {
            let kept = entries.filtered(|key, value| slot(key) < capacity && in_use(value));
            map_batch::write_entries(new, &kept)?;
            kept
        }
        MapType::Hash => {
            ensure!(
                entries.len() <= capacity,
                "{} entries do not fit the new size {capacity}",
                entries.len()
            );
            map_batch::write_entries(new, &entries)?;
            entries
        }
        MapType::LruHash => {
            if entries.len() > capacity {
                warn!(
                    entries = entries.len(),
                    capacity,
                    "more tracked entries than the new size: the least recent are evicted"
                );
            }
            map_batch::write_entries(new, &entries)?;
            entries
        }
        other => bail!("a map of type {other:?} is not resized"),
    };
    Ok(written.len())
}

/// Places the inner maps `used` names (slot → map id) at the same slots of `new`.
fn copy_inner_maps(used: &Entries, new: &MapData) -> Result<()> {
    let inner: Vec<(u32, MapData)> = (0..used.len())
        .map(|i| {
            let (slot, id) = used.get(i);
            let (slot, id) = (
                u32::from_ne_bytes(slot.try_into()?),
                u32::from_ne_bytes(id.try_into()?),
            );
            Ok((
                slot,
                MapData::from_id(id).with_context(|| format!("inner map {id}"))?,
            ))
        })
        .collect::<Result<_>>()?;
    if inner.is_empty() {
        return Ok(());
    }
    let placed: Vec<(u32, &MapData)> = inner.iter().map(|(slot, map)| (*slot, map)).collect();
    map_batch::place_inner_maps(new, &placed)
}

/// Copies the entries of `old` whose keys `new` lacks; returns how many.
fn copy_missing(old: &MapData, new: &MapData) -> Result<usize> {
    let tracked = map_batch::read_entries(new)?;
    let present: HashSet<&[u8]> = (0..tracked.len()).map(|i| tracked.get(i).0).collect();
    let missing = map_batch::read_entries(old)?.filtered(|key, _| !present.contains(key));
    map_batch::write_entries(new, &missing)?;
    Ok(missing.len())
}
