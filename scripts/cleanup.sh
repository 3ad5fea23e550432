#!/usr/bin/env bash
# Removes network namespaces left by killed test, demo or bench runs (prefixes lbt, lbd, lbb followed by
# the pid of a process that no longer exists) and the pinned datapaths those runs left under
# /sys/fs/bpf/lbt<pid>-<seq> (removing the pins detaches them). Tests do this themselves on start; this
# is for a person tidying a machine.
set -euo pipefail
for ns in $(ip netns list | awk '{print $1}' | grep -E '^lb[tdb][0-9]+-' || true); do
  pid=${ns#lb?}; pid=${pid%%-*}
  if [ ! -d "/proc/$pid" ]; then
    echo "removing stale namespace $ns"
    ip netns del "$ns"
  fi
done
for dir in /sys/fs/bpf/lbt[0-9]*-*; do
  [ -d "$dir" ] || continue
  pid=${dir#/sys/fs/bpf/lbt}; pid=${pid%%-*}
  if [ ! -d "/proc/$pid" ]; then
    echo "removing stale pins $dir"
    rm -rf "$dir"
  fi
done
