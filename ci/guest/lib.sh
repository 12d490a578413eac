#!/bin/sh
# ci/guest/lib.sh: helpers shared by the guest-side test scripts, installed
# as /etc/vdi/lib.sh in every initramfs (busybox sh).
# Owns: the "VDI-RESULT PASS|FAIL <check> <detail>" verdict lines, kernel
# messages without timestamps, and the virtio-iommu driver-probe check.

pass() { echo "VDI-RESULT PASS $*"; }
fail() { echo "VDI-RESULT FAIL $*"; }
kmsg() { dmesg | sed 's/^\[[ 0-9.]*\] //'; }

# The virtio-iommu driver probed a device (it logs the input range and page
# mask) and is bound to it.
check_driver_probe() {
    probe="$(kmsg | grep -E '^virtio_iommu virtio[0-9]+: (input address|page mask)' | tr '\n' ' ')"
    viommu=""
    for d in /sys/bus/virtio/drivers/virtio_iommu/virtio*; do
        [ -e "$d" ] && viommu="$(basename "$d")" && break
    done
    if [ -n "$probe" ] && [ -n "$viommu" ]; then
        pass driver-probe "$viommu: $probe"
    else
        fail driver-probe "no virtio_iommu probe message / bound device"
    fi
}

# check_bench DEV PAIRS: PAIRS VFIO MAP+UNMAP pairs of 4 KiB through the IOMMU.
check_bench() {
    vfio-map --device "$1" --iova 0x30000000 --bench "$2" >/tmp/bench.out 2>&1
    rc=$?
    cat /tmp/bench.out
    rate="$(sed -n 's/^vfio-map: BENCH .*pairs\/s=\([0-9.]*\).*/\1/p' /tmp/bench.out)"
    if [ "$rc" = 0 ] && [ -n "$rate" ]; then
        pass bench "pairs=$2 pairs/s=$rate"
    else
        fail bench "rc=$rc $(grep -m1 ERROR /tmp/bench.out)"
    fi
}
