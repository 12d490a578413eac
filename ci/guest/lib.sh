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
