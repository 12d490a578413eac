#!/usr/bin/env bash
# ci/bench-shadow.sh: guest MAP and UNMAP completion latency with
# viommu-client's shadow layer applying them to the host, against the
# same host calls issued directly (docs/benchmarks.md, "Shadow layer").
# Owns two measurements, each printed as nested-vmm's BENCH lines:
#   host   on this machine: a release daemon and `nested-vmm bench N
#          --backend null`: the nested guest's request, the daemon, the
#          event, the shadow and the acknowledgement, with no kernel call
#          (the shadow's own cost); VDI_BENCH_ROUNDS rounds;
#   guest  the `nested` boots of ci/guest-tests.sh with
#          VDI_NESTED_BENCH=N: inside a TCG guest, the shadow applying them
#          to edu's VFIO container (and iommufd, where the kernel has it),
#          and the same VFIO_IOMMU_MAP_DMA/UNMAP_DMA issued directly.
# Usage: bash ci/bench-shadow.sh [host|guest|all]   (default all)
# Env:   VDI_BENCH         pairs per run (default 2000 on the host, 500 in the guest)
#        VDI_BENCH_ROUNDS  host rounds (default 3)
#        plus the knobs of ci/guest-tests.sh (VDI_GUEST_KERNELS, ...)

set -euo pipefail

ci_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
what="${1:-all}"

if [[ $what == host || $what == all ]]; then
    repo="$(dirname "$ci_dir")"
    (cd "$repo" && cargo build --release --quiet -p vhost-device-iommu -p nested-vmm)
    target="$(cd "$repo" && cargo metadata --format-version 1 --no-deps |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
    dir="$(mktemp -d "${TMPDIR:-/tmp}/vdi-bench-shadow.XXXXXX")"
    RUST_LOG=warn "$target/release/vhost-device-iommu" --socket-path "$dir/vhost.sock" \
        --control-socket "$dir/ctl.sock" --endpoints 0x20 --state-dir "$dir/state" \
        --client-timeout-ms 10000 >"$dir/daemon.log" 2>&1 &
    dpid=$!
    trap 'kill "$dpid" 2>/dev/null || true; wait "$dpid" 2>/dev/null || true; rm -rf "$dir"' EXIT
    for ((k = 0; k < 200; k++)); do
        [[ -S "$dir/vhost.sock" && -S "$dir/ctl.sock" ]] && break
        sleep 0.05
    done
    echo "bench-shadow: host ($(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg))"
    for ((r = 0; r < ${VDI_BENCH_ROUNDS:-3}; r++)); do
        "$target/release/nested-vmm" bench "${VDI_BENCH:-2000}" --backend null \
            --socket "$dir/vhost.sock" --control "$dir/ctl.sock" | grep BENCH
    done
fi

if [[ $what == guest || $what == all ]]; then
    echo "bench-shadow: guest (nested boots of ci/guest-tests.sh)"
    VDI_GUEST_MODES=nested VDI_NESTED_BENCH="${VDI_BENCH:-500}" bash "$ci_dir/guest-tests.sh" |
        grep -E 'nested-bench|passed,'
fi
