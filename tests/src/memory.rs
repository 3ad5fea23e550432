//! Memory the benchmarks report: a process's resident set, and the kernel memory of BPF maps
//! (`memlock` of `/proc/<pid>/fdinfo`, what the kernel charges for each map).

use std::{collections::BTreeSet, path::Path};

use aya::maps::loaded_maps;

/// `VmRSS` of `/proc/<pid>/status`, in bytes (`pid` = "self" for this process).
pub fn rss_bytes(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// `memlock` of one fdinfo file, if it describes a BPF map.
fn map_memlock(fdinfo: &Path) -> Option<(u32, u64)> {
    let text = std::fs::read_to_string(fdinfo).ok()?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
    };
    let id: u32 = field("map_id:")?.parse().ok()?;
    let memlock: u64 = field("memlock:")?.parse().ok()?;
    Some((id, memlock))
}

/// Kernel memory of the BPF maps process `pid` holds file descriptors of, in bytes, with their ids.
pub fn maps_held_by(pid: &str) -> (u64, BTreeSet<u32>) {
    let mut total = 0;
    let mut ids = BTreeSet::new();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return (0, ids);
    };
    for fd in fds.flatten() {
        if let Some((id, memlock)) = map_memlock(&fd.path()) {
            if ids.insert(id) {
                total += memlock;
            }
        }
    }
    (total, ids)
}

/// Kernel memory of every map in the system with an id above `after` whose flags include
/// `flags` and that is not in `except`: e.g. the inner maps a process created (they are held by
/// their outer map, not by a descriptor). Maps other processes create meanwhile are counted too.
pub fn maps_created_after(after: u32, flags: u32, except: &BTreeSet<u32>) -> (u64, usize) {
    let mut total = 0;
    let mut count = 0;
    for info in loaded_maps().flatten() {
        if info.id() <= after || except.contains(&info.id()) || info.map_flags() & flags != flags {
            continue;
        }
        let Ok(fd) = info.fd() else { continue };
        use std::os::fd::{AsFd, AsRawFd};
        let raw = fd.as_fd().as_raw_fd();
        if let Some((_, memlock)) = map_memlock(Path::new(&format!("/proc/self/fdinfo/{raw}"))) {
            total += memlock;
            count += 1;
        }
    }
    (total, count)
}

/// The highest map id in the system now.
pub fn last_map_id() -> u32 {
    loaded_maps().flatten().map(|m| m.id()).max().unwrap_or(0)
}
