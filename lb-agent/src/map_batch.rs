//! Whole-array reads and writes in one `bpf()` call each (`BPF_MAP_UPDATE_BATCH`,
//! `BPF_MAP_LOOKUP_BATCH`), which aya 0.14 does not expose. A Maglev table of M slots is then one
//! syscall instead of M: the difference between seconds and most of a minute for 10k services.
//! [`read_entries`] and [`write_entries`] do the same for any hash or array map as raw bytes
//! (`crate::resize` copies pinned maps into maps of another size with them).

use std::{
    borrow::Borrow,
    os::fd::{AsFd as _, AsRawFd as _},
};

use anyhow::{ensure, Context, Result};
use aya::{
    maps::{Array, IterableMap as _, MapData},
    Pod,
};
use aya_obj::generated::{bpf_attr, bpf_cmd};

/// One `BPF_MAP_*_BATCH` command on `map`; `count` in, elements processed out.
fn batch(
    command: bpf_cmd,
    map: &MapData,
    keys: *mut u32,
    values: *mut u8,
    out_batch: *mut u32,
    count: u32,
) -> std::io::Result<u32> {
    batch_from(
        command,
        map,
        keys as *mut u8,
        values,
        std::ptr::null_mut(),
        out_batch as *mut u8,
        count,
    )
    .map(|(done, _)| done)
}

/// [`batch`] that goes on from the position `in_batch` (a token the previous call left in its
/// `out_batch`; null: from the start). Also says whether a lookup reached the end of the map (a
/// hash map's lookup returns whole buckets, so fewer elements than `count` do not mean the end).
fn batch_from(
    command: bpf_cmd,
    map: &MapData,
    keys: *mut u8,
    values: *mut u8,
    in_batch: *mut u8,
    out_batch: *mut u8,
    count: u32,
) -> std::io::Result<(u32, bool)> {
    // SAFETY: an all-zero `bpf_attr` is valid (every field is an integer); the batch member is the
    // one this command reads.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    attr.batch.map_fd = map.fd().as_fd().as_raw_fd() as u32;
    attr.batch.in_batch = in_batch as u64;
    attr.batch.keys = keys as u64;
    attr.batch.values = values as u64;
    attr.batch.out_batch = out_batch as u64;
    attr.batch.count = count;
    // SAFETY: `attr` outlives the call; the pointers in it address `count` keys and values (and
    // one batch token) the caller owns for the duration of the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command as libc::c_long,
            &mut attr as *mut bpf_attr,
            std::mem::size_of::<bpf_attr>(),
        )
    };
    // SAFETY: the kernel wrote back the processed count into the same member.
    let done = unsafe { attr.batch.count };
    if ret < 0 {
        let err = std::io::Error::last_os_error();
        // Lookups report the end of the map as ENOENT, with the elements read so far.
        if command == bpf_cmd::BPF_MAP_LOOKUP_BATCH && err.raw_os_error() == Some(libc::ENOENT) {
            return Ok((done, true));
        }
        return Err(err);
    }
    Ok((done, false))
}

/// Writes `values` into slots `0..values.len()` of `array` in one syscall.
pub fn write_array<T: Borrow<MapData>, V: Pod>(array: &Array<T, V>, values: &[V]) -> Result<()> {
    let count = u32::try_from(values.len()).context("too many values")?;
    ensure!(
        count <= array.len(),
        "{count} values for {} slots",
        array.len()
    );
    let mut keys: Vec<u32> = (0..count).collect();
    let written = batch(
        bpf_cmd::BPF_MAP_UPDATE_BATCH,
        array.map(),
        keys.as_mut_ptr(),
        values.as_ptr() as *mut u8,
        std::ptr::null_mut(),
        count,
    )
    .context("BPF_MAP_UPDATE_BATCH")?;
    ensure!(
        written == count,
        "BPF_MAP_UPDATE_BATCH wrote {written} of {count} values"
    );
    Ok(())
}

/// Places each inner map of `entries` at its slot of the map-in-map `outer`, in one syscall. The
/// kernel waits for one RCU grace period per update call (so userspace knows no program still
/// reads a replaced inner map): one for the whole batch instead of one per slot.
pub fn place_inner_maps(outer: &MapData, entries: &[(u32, &MapData)]) -> Result<()> {
    let count = u32::try_from(entries.len()).context("too many inner maps")?;
    let mut keys: Vec<u32> = entries.iter().map(|(slot, _)| *slot).collect();
    // Userspace names an inner map by a descriptor.
    let mut fds: Vec<u32> = entries
        .iter()
        .map(|(_, inner)| inner.fd().as_fd().as_raw_fd() as u32)
        .collect();
    let written = batch(
        bpf_cmd::BPF_MAP_UPDATE_BATCH,
        outer,
        keys.as_mut_ptr(),
        fds.as_mut_ptr() as *mut u8,
        std::ptr::null_mut(),
        count,
    )
    .context("BPF_MAP_UPDATE_BATCH")?;
    ensure!(
        written == count,
        "BPF_MAP_UPDATE_BATCH placed {written} of {count} inner maps"
    );
    Ok(())
}

/// Reads every slot of `array` in one syscall.
pub fn read_array<T: Borrow<MapData>, V: Pod + Default>(array: &Array<T, V>) -> Result<Vec<V>> {
    let count = array.len();
    let mut keys = vec![0u32; count as usize];
    let mut values = vec![V::default(); count as usize];
    let mut next = 0u32;
    let read = batch(
        bpf_cmd::BPF_MAP_LOOKUP_BATCH,
        array.map(),
        keys.as_mut_ptr(),
        values.as_mut_ptr() as *mut u8,
        &mut next,
        count,
    )
    .context("BPF_MAP_LOOKUP_BATCH")?;
    ensure!(
        read == count,
        "BPF_MAP_LOOKUP_BATCH read {read} of {count} values"
    );
    Ok(values)
}

/// The map `name` of `ebpf`, of a type [`read_entries`] and [`write_entries`] handle (hash, LRU
/// hash, array, per-CPU array, array of maps).
pub fn map_data<'a>(ebpf: &'a aya::Ebpf, name: &str) -> Result<&'a MapData> {
    use aya::maps::Map;
    match ebpf
        .map(name)
        .with_context(|| format!("{name} missing from the object"))?
    {
        Map::Array(data)
        | Map::ArrayOfMaps(data)
        | Map::HashMap(data)
        | Map::LruHashMap(data)
        | Map::PerCpuArray(data) => Ok(data),
        _ => anyhow::bail!("{name}: a map of a type not read or written as bytes"),
    }
}

/// Every entry of a hash or array map, as the kernel's bytes: `key_size` bytes per key and
/// `value_stride` per value (a per-CPU map's value holds one 8-byte aligned copy per possible CPU).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entries {
    pub key_size: usize,
    pub value_stride: usize,
    pub keys: Vec<u8>,
    pub values: Vec<u8>,
}

impl Entries {
    pub fn len(&self) -> usize {
        self.keys.len() / self.key_size
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The `i`th key and value.
    pub fn get(&self, i: usize) -> (&[u8], &[u8]) {
        (
            &self.keys[i * self.key_size..(i + 1) * self.key_size],
            &self.values[i * self.value_stride..(i + 1) * self.value_stride],
        )
    }

    /// The entries for which `keep` holds.
    pub fn filtered(&self, mut keep: impl FnMut(&[u8], &[u8]) -> bool) -> Entries {
        let mut kept = Entries {
            keys: Vec::new(),
            values: Vec::new(),
            ..*self
        };
        for i in 0..self.len() {
            let (key, value) = self.get(i);
            if keep(key, value) {
                kept.keys.extend_from_slice(key);
                kept.values.extend_from_slice(value);
            }
        }
        kept
    }
}

/// Elements read per `BPF_MAP_LOOKUP_BATCH` call: more than any hash bucket holds (a smaller count
/// than a bucket's entries fails with ENOSPC).
const READ_CHUNK: usize = 8192;

/// Every entry of `map` (a hash, LRU hash, array or per-CPU array), a chunk per syscall. An array
/// reads as all its slots, keyed by index.
pub fn read_entries(map: &MapData) -> Result<Entries> {
    let info = map.info().context("map info")?;
    let key_size = info.key_size() as usize;
    let value_size = info.value_size() as usize;
    let per_cpu = matches!(
        info.map_type().context("map type")?,
        aya::maps::MapType::PerCpuArray
            | aya::maps::MapType::PerCpuHash
            | aya::maps::MapType::LruPerCpuHash
    );
    let value_stride = if per_cpu {
        let cpus = aya::util::nr_cpus().map_err(|(path, err)| anyhow::anyhow!("{path}: {err}"))?;
        value_size.next_multiple_of(8) * cpus
    } else {
        value_size
    };
    let mut entries = Entries {
        key_size,
        value_stride,
        keys: Vec::new(),
        values: Vec::new(),
    };
    // Batch tokens: a bucket number for hash maps, a key for arrays.
    let (mut token_in, mut token_out) = (vec![0u8; key_size.max(8)], vec![0u8; key_size.max(8)]);
    let mut first = true;
    loop {
        let mut keys = vec![0u8; READ_CHUNK * key_size];
        let mut values = vec![0u8; READ_CHUNK * value_stride];
        let read = batch_from(
            bpf_cmd::BPF_MAP_LOOKUP_BATCH,
            map,
            keys.as_mut_ptr(),
            values.as_mut_ptr(),
            if first {
                std::ptr::null_mut()
            } else {
                token_in.as_mut_ptr()
            },
            token_out.as_mut_ptr(),
            READ_CHUNK as u32,
        );
        let (read, end) = read.context("BPF_MAP_LOOKUP_BATCH")?;
        let read = read as usize;
        entries.keys.extend_from_slice(&keys[..read * key_size]);
        entries
            .values
            .extend_from_slice(&values[..read * value_stride]);
        if end {
            return Ok(entries);
        }
        std::mem::swap(&mut token_in, &mut token_out);
        first = false;
    }
}

/// Every entry of the hash map `map` as `(K, V)` (a chunk per syscall, see [`read_entries`]).
pub fn read_hash<K: Pod, V: Pod>(map: &MapData) -> Result<Vec<(K, V)>> {
    let entries = read_entries(map)?;
    ensure!(
        entries.key_size == std::mem::size_of::<K>()
            && entries.value_stride == std::mem::size_of::<V>(),
        "key or value size differs from the map's"
    );
    Ok((0..entries.len())
        .map(|i| {
            let (key, value) = entries.get(i);
            // SAFETY: `K` and `V` are plain data of exactly these sizes (checked above); the
            // bytes may be unaligned.
            unsafe {
                (
                    std::ptr::read_unaligned(key.as_ptr() as *const K),
                    std::ptr::read_unaligned(value.as_ptr() as *const V),
                )
            }
        })
        .collect())
}

/// Writes `entries` into `map` (of the same key and value sizes), in one syscall. Fails on the
/// first entry the map refuses (a full hash map: E2BIG; an index beyond an array).
pub fn write_entries(map: &MapData, entries: &Entries) -> Result<()> {
    if entries.is_empty() {
        return Ok(());
    }
    let count = u32::try_from(entries.len()).context("too many entries")?;
    let mut keys = entries.keys.clone();
    let mut values = entries.values.clone();
    let (written, _) = batch_from(
        bpf_cmd::BPF_MAP_UPDATE_BATCH,
        map,
        keys.as_mut_ptr(),
        values.as_mut_ptr(),
        std::ptr::null_mut(),
        std::ptr::null_mut(),
        count,
    )
    .context("BPF_MAP_UPDATE_BATCH")?;
    ensure!(
        written == count,
        "BPF_MAP_UPDATE_BATCH wrote {written} of {count} entries"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs root (creates a map); skipped otherwise.
    #[test]
    fn writes_and_reads_a_whole_array_in_one_call() {
        let Ok(array) = Array::<MapData, u32>::create(1021, 0) else {
            eprintln!("skipped: cannot create BPF maps (not root?)");
            return;
        };
        let values: Vec<u32> = (0..1021).map(|i| i * 7 + 1).collect();
        write_array(&array, &values).unwrap();
        for i in [0u32, 1, 500, 1020] {
            assert_eq!(array.get(&i, 0).unwrap(), values[i as usize]);
        }
        assert_eq!(read_array(&array).unwrap(), values);
        assert!(write_array(&array, &vec![1; 1022]).is_err());
    }

    /// Needs root (creates maps); skipped otherwise. More entries than one read chunk, into a
    /// bigger map, then refused by a smaller one.
    #[test]
    fn copies_every_entry_of_a_hash_map_as_bytes() {
        use aya::maps::HashMap;
        let Ok(mut from) = HashMap::<MapData, u32, u64>::create(20_000, 0) else {
            eprintln!("skipped: cannot create BPF maps (not root?)");
            return;
        };
        for key in 0..10_000u32 {
            from.insert(key, u64::from(key) * 3 + 1, 0).unwrap();
        }
        let entries = read_entries(from.map()).unwrap();
        assert_eq!(
            (entries.len(), entries.key_size, entries.value_stride),
            (10_000, 4, 8)
        );
        let to = HashMap::<MapData, u32, u64>::create(40_000, 0).unwrap();
        write_entries(to.map(), &entries).unwrap();
        for key in [0u32, 1, 8191, 8192, 9999] {
            assert_eq!(to.get(&key, 0).unwrap(), u64::from(key) * 3 + 1);
        }
        assert_eq!(to.keys().count(), 10_000);
        let small = HashMap::<MapData, u32, u64>::create(5_000, 0).unwrap();
        assert!(write_entries(small.map(), &entries).is_err());
    }

    /// Needs root; skipped otherwise. A per-CPU value is one 8-byte aligned copy per possible CPU.
    #[test]
    fn reads_per_cpu_values_whole() {
        use aya::maps::PerCpuArray;
        let Ok(array) = PerCpuArray::<MapData, u32>::create(3, 0) else {
            eprintln!("skipped: cannot create BPF maps (not root?)");
            return;
        };
        let cpus = aya::util::nr_cpus().unwrap();
        let entries = read_entries(array.map()).unwrap();
        assert_eq!((entries.len(), entries.value_stride), (3, 8 * cpus));
    }
}
