#!/bin/sh
# ci/guest/smoke-test.sh: guest side of ci/smoke-builtin.sh, installed as
# /etc/vdi/test in the smoke initramfs and run by the guest /init (busybox sh,
# modules already loaded).
# Owns: the in-guest checks against an IOMMU that translates the endpoint
# VDI_DEV (default 0000:00:04.0): virtio-iommu driver probe, endpoint attach,
# VFIO type1 mappings (vfio-map), MAP/UNMAP benchmark, no fault reports.
# Prints "VDI-RESULT PASS|FAIL <check> <detail>" per check and "VDI-DONE" at
# the end; everything else is informational.
# Knobs on the kernel command line: vdi.dev=BDF (endpoint, default
# 0000:00:04.0), vdi.bench=N (MAP+UNMAP pairs of the benchmark, default 2000).

DEV="${VDI_DEV:-0000:00:04.0}"
BENCH="${VDI_BENCH:-2000}"
read -r cmdline </proc/cmdline
for arg in $cmdline; do
    case "$arg" in
        vdi.dev=*) DEV="${arg#vdi.dev=}" ;;
        vdi.bench=*) BENCH="${arg#vdi.bench=}" ;;
    esac
done

# shellcheck source-path=SCRIPTDIR source=lib.sh
. /etc/vdi/lib.sh

# 1. The virtio-iommu driver probed the device.
check_driver_probe

# 2. VFIO type1 mappings (this also binds $DEV to vfio-pci, which on 6.12 is
#    what creates its IOMMU group and attaches it).
vfio-map --device "$DEV" --count 4 --iova 0x10000000 --size 0x1000 >/tmp/map.out 2>&1
rc=$?
cat /tmp/map.out
maps=$(grep -c '^vfio-map: MAP ' /tmp/map.out)
unmaps=$(grep -c '^vfio-map: UNMAP ' /tmp/map.out)
if [ "$rc" = 0 ] && [ "$maps" = 4 ] && [ "$unmaps" = 4 ]; then
    pass vfio-map "maps=$maps unmaps=$unmaps"
else
    fail vfio-map "rc=$rc maps=$maps unmaps=$unmaps $(grep -m1 ERROR /tmp/map.out)"
fi

# 3. One multi-page mapping (4 pages, one MAP line + 3 PAGE lines).
vfio-map --device "$DEV" --count 1 --iova 0x20000000 --size 0x4000 >/tmp/map4.out 2>&1
rc=$?
cat /tmp/map4.out
pages=$(grep -c '^vfio-map: PAGE ' /tmp/map4.out)
if [ "$rc" = 0 ] && [ "$pages" = 3 ] && grep -q '^vfio-map: UNMAP iova=0x20000000 size=0x4000' /tmp/map4.out; then
    pass vfio-map-multipage "pages=4"
else
    fail vfio-map-multipage "rc=$rc extra-pages=$pages $(grep -m1 ERROR /tmp/map4.out)"
fi

# 4. The endpoint is attached to the virtio-iommu: it has an IOMMU group and
#    its sysfs "iommu" link points at the virtio-iommu's PCI function.
group="$(basename "$(readlink "/sys/bus/pci/devices/$DEV/iommu_group" 2>/dev/null)" 2>/dev/null)"
iommu="$(basename "$(readlink "/sys/bus/pci/devices/$DEV/iommu" 2>/dev/null)" 2>/dev/null)"
viommu_pci=""
[ -n "$viommu" ] && viommu_pci="$(basename "$(dirname "$(readlink -f "/sys/bus/virtio/devices/$viommu")")")"
added="$(kmsg | grep -m1 "$DEV: Adding to iommu group")"
if [ -n "$group" ] && [ -n "$iommu" ] && [ "$iommu" = "$viommu_pci" ] &&
    [ -e "/sys/class/iommu/$iommu/devices/$DEV" ]; then
    pass endpoint-attach "group=$group iommu=$iommu type=$(cat "/sys/kernel/iommu_groups/$group/type" 2>/dev/null) dmesg='$added'"
else
    fail endpoint-attach "group='$group' iommu='$iommu' virtio-iommu='$viommu_pci'"
fi

# 5. MAP+UNMAP benchmark.
check_bench "$DEV" "$BENCH"

# 6. No fault / error reports from the virtio-iommu driver or the IOMMU core.
faults="$(kmsg | grep -E 'fault from EP|invalid event|could not add event|virtio_iommu.*(error|fail)|DMAR.*fault|IO_PAGE_FAULT' | head -n 5)"
if [ -z "$faults" ]; then
    pass no-faults "no fault messages"
else
    fail no-faults "$(echo "$faults" | tr '\n' '|')"
fi

kmsg | grep -iE 'iommu|vfio|viot' | sed 's/^/VDI-DMESG: /'
echo "VDI-DONE"
