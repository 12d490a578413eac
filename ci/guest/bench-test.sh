#!/bin/sh
# ci/guest/bench-test.sh: guest side of ci/bench-guest.sh, installed as
# /etc/vdi/test and run by the guest /init (busybox sh, modules loaded).
# Owns: one benchmark run in the guest: vfio-map --bench WARMUP (discarded),
# then vfio-map --bench N, against whatever virtio-iommu the host attached
# (QEMU's built-in one or the daemon).  Prints the vfio-map lines and
# "VDI-BENCH pairs/s=R" (or "VDI-BENCH FAIL <why>"), then "VDI-DONE".
# Kernel command line knobs: vdi.dev=BDF (default 0000:00:04.0),
# vdi.bench=N (default 20000), vdi.warmup=N (default 2000).

DEV=0000:00:04.0
BENCH=20000
WARMUP=2000
read -r cmdline </proc/cmdline
for arg in $cmdline; do
    case "$arg" in
        vdi.dev=*) DEV="${arg#vdi.dev=}" ;;
        vdi.bench=*) BENCH="${arg#vdi.bench=}" ;;
        vdi.warmup=*) WARMUP="${arg#vdi.warmup=}" ;;
    esac
done

if vfio-map --device "$DEV" --iova 0x30000000 --bench "$WARMUP" >/tmp/warmup.out 2>&1 &&
    vfio-map --device "$DEV" --iova 0x30000000 --bench "$BENCH" >/tmp/bench.out 2>&1; then
    cat /tmp/bench.out
    echo "VDI-BENCH $(sed -n 's/^vfio-map: BENCH .*\(pairs\/s=[0-9.]*\).*/\1/p' /tmp/bench.out)"
else
    cat /tmp/warmup.out /tmp/bench.out 2>/dev/null
    echo "VDI-BENCH FAIL $(cat /tmp/warmup.out /tmp/bench.out 2>/dev/null | grep -m1 ERROR)"
fi
echo "VDI-DONE"
