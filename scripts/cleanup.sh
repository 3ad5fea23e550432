#!/usr/bin/env bash
# Removes network namespaces left by killed test, demo or bench runs (prefixes lbt, lbd, lbb followed by
# the pid of a process that no longer exists) and test pins under /sys/fs/bpf/lb-test. Tests do this
# themselves on start; this is for a person tidying a machine.
set -euo pipefail
for ns in $(ip netns list | awk '{print $1}' | grep -E '^lb[tdb][0-9]+-' || true); do
  pid=${ns#lb?}; pid=${pid%%-*}
  if [ ! -d "/proc/$pid" ]; then
    echo "removing stale namespace $ns"
    ip netns del "$ns"
  fi
done
rm -rf /sys/fs/bpf/lb-test
