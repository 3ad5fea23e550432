//! Whole-array reads and writes in one `bpf()` call each (`BPF_MAP_UPDATE_BATCH`,
//! `BPF_MAP_LOOKUP_BATCH`), which aya 0.14 does not expose. A Maglev table of M slots is then one
//! syscall instead of M: the difference between seconds and most of a minute for 10k services.

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
    // SAFETY: an all-zero `bpf_attr` is valid (every field is an integer); the batch member is the
    // one this command reads.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    attr.batch.map_fd = map.fd().as_fd().as_raw_fd() as u32;
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
            return Ok(done);
        }
        return Err(err);
    }
    Ok(done)
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
}
