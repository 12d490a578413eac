#!/bin/sh
# ci/guest/sva-fake-test.sh: guest side of the "fake" boots of
# ci/sva-tests.sh, installed as /etc/vdi/test (busybox sh).  The
# virtio-iommu is ci/fake-sva-device.py, which speaks the whole extension
# profile, so the SVA path of viommu_sva runs for real: binding, page
# requests from its emulated PASID DMA engine, MMU-notifier invalidations,
# groups, stop markers, malformed records, a child exiting under an open
# request, unbind order, a stalled request (bounded wait) and, last, an
# INVALIDATE that never completes (the device is marked broken).
# The host side is `fake-sva-device.py drive`, in lock step at each
# "VDI-WAIT <step> key=value..." line; "VDI-DONE" ends the test.
# Kernel command line knobs: vdi.ep=N, vdi.ep2=N (endpoints, default 0x28, 0x29)

EP=0x28
EP2=0x29
read -r cmdline </proc/cmdline
for arg in $cmdline; do
    case "$arg" in
        vdi.ep=*) EP="${arg#vdi.ep=}" ;;
        vdi.ep2=*) EP2="${arg#vdi.ep2=}" ;;
    esac
done

# shellcheck source-path=SCRIPTDIR source=lib.sh
. /etc/vdi/lib.sh

stty -F /dev/ttyS1 -echo 2>/dev/null
exec 3</dev/ttyS1

line="$(kmsg | grep -m1 -E '^viommu_sva virtio[0-9]+: /dev/viommu-sva')"
case "$line" in
    *"ATTACH_TABLE yes, PAGE_REQUEST yes, PASID_ALLOC yes"*) pass sva-probe "$line" ;;
    *) fail sva-probe "probe line '$line'" ;;
esac

# Bounded waits are tested with a stalled request: do not wait 5 s for it.
echo 1000 >/sys/module/viommu_sva/parameters/req_timeout_ms
sva-test fake "$EP" "$EP2" --hold 3

bad="$(kmsg | grep -E 'BUG:|WARNING:|Oops|general protection|refcount_t|event lost' | head -n 5)"
if [ -z "$bad" ]; then
    pass kernel-healthy "no oops, warning or lost event"
else
    fail kernel-healthy "$(echo "$bad" | tr '\n' '|')"
fi
# Removal with a broken device: every request fails fast, the reset is clean.
if rmmod viommu_sva 2>/tmp/rmmod.err && [ ! -e /dev/viommu-sva ]; then
    pass module-unload "rmmod with the device marked broken: device removed"
else
    fail module-unload "rmmod: $(cat /tmp/rmmod.err)"
fi
echo "VDI-WAIT end"
read -r -t 60 reply <&3
kmsg | grep -E 'viommu_sva' | tail -n 25 | sed 's/^/VDI-DMESG: /'
echo "VDI-DONE"
