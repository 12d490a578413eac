#!/bin/sh
# ci/guest/sva-test.sh: guest side of ci/sva-tests.sh, installed as
# /etc/vdi/test (busybox sh).  The initramfs loads viommu_sva (guest/sva/)
# instead of virtio_iommu.
# Owns: the in-guest checks of the SVA module against the daemon, as
# "VDI-RESULT PASS|FAIL|SKIP <check> <detail>" lines (most printed by
# /bin/sva-test), in lock step with the host at "VDI-WAIT <step>" (the host
# answers on /dev/ttyS1); "VDI-DONE" ends the test.
# Kernel command line knobs:
#   vdi.ep=N        endpoint ID of the DMA test device (default 0x28 = 00:05.0)
#   vdi.ep2=N       a second endpoint bound to the same mm (default 0x29);
#                   the daemon knows it, no device is behind it
#   vdi.fillmib=N   size of the on-demand fill (default 64)
#   vdi.bench=1     also run the SVA benchmark (vdi.benchrounds=N rounds)

EP=0x28
EP2=0x29
FILL=64
BENCH=0
ROUNDS=5
read -r cmdline </proc/cmdline
for arg in $cmdline; do
    case "$arg" in
        vdi.ep=*) EP="${arg#vdi.ep=}" ;;
        vdi.ep2=*) EP2="${arg#vdi.ep2=}" ;;
        vdi.fillmib=*) FILL="${arg#vdi.fillmib=}" ;;
        vdi.bench=*) BENCH="${arg#vdi.bench=}" ;;
        vdi.benchrounds=*) ROUNDS="${arg#vdi.benchrounds=}" ;;
    esac
done

# shellcheck source-path=SCRIPTDIR source=lib.sh
. /etc/vdi/lib.sh

stty -F /dev/ttyS1 -echo 2>/dev/null
exec 3</dev/ttyS1
wait_host() { # STEP
    echo "VDI-WAIT $1"
    # shellcheck disable=SC3045  # busybox sh has read -t
    if read -r -t 120 reply <&3; then
        echo "VDI-GO $1 $reply"
    else
        echo "VDI-GO $1 (no answer from the host within 120 s)"
    fi
}

# 1. viommu_sva bound the virtio-iommu and created its character device.
line="$(kmsg | grep -m1 -E '^viommu_sva virtio[0-9]+: /dev/viommu-sva')"
if [ -c /dev/viommu-sva ] && [ -n "$line" ] && ! grep -q '^virtio_iommu ' /proc/modules; then
    pass sva-probe "$line"
else
    fail sva-probe "/dev/viommu-sva $(ls -l /dev/viommu-sva 2>&1); probe line '$line'; $(kmsg | grep -m3 viommu_sva | tr '\n' '|')"
fi
kmsg | grep -E '^viommu_sva' | sed 's/^/VDI-DMESG: /'

# 2. Negotiated features, 3. PROBE of the DMA device's endpoint.
sva-test info
sva-test probe-ep "$EP"

# 4. PASID_ALLOC/PASID_FREE round trips; the host compares the daemon's
#    PASIDs while they are held.
sva-test pasid --hold 3

# 5. The DMA test device, if there: bound by viommu_sva's PCI driver.
d=/sys/bus/pci/devices/0000:00:05.0
if [ "$(cat $d/vendor 2>/dev/null):$(cat $d/device 2>/dev/null)" = "0x1234:0xd3a0" ]; then
    kmsg | grep -m1 'DMA test device v' | sed 's/^/VDI-DMESG: /'
    echo "VDI-INFO 00:05.0 driver: $(basename "$(readlink $d/driver)")"
fi
sva-test dmadev "$EP"

# 6. BIND: refused (with the missing feature in dmesg) by today's daemon.
sva-test bind "$EP" | tee /tmp/bind.out
if grep -q '^VDI-RESULT PASS bind-refused' /tmp/bind.out; then
    why="$(kmsg | grep -m1 'BIND refused')"
    case "$why" in
        *"does not offer F_ATTACH_TABLE"*) pass bind-refused-logged "$why" ;;
        *) fail bind-refused-logged "dmesg: '$why'" ;;
    esac
fi

# 7. The SVA checks of issue 14, in lock step with the host, which checks
#    the daemon's side (bindings, events, counters, PASIDs) at each step
#    (SKIP with the reason if the daemon or the DMA test device lacks
#    PASIDs).
sva-test sva "$EP" --ep2 "$EP2" --fill-mib "$FILL" --hold 3
[ "$BENCH" = 1 ] && sva-test bench "$EP" --mib "$FILL" --rounds "$ROUNDS"
# Everything unbound and freed: the host finds no PASID left in the daemon.
wait_host returned

# 8. No oops, warning, lost event or broken device.
bad="$(kmsg | grep -E 'BUG:|WARNING:|Oops|general protection|refcount_t|device marked broken|event lost|no answer within' | head -n 5)"
if [ -z "$bad" ]; then
    pass kernel-healthy "no oops, warning, lost event or timed-out request"
else
    fail kernel-healthy "$(echo "$bad" | tr '\n' '|')"
fi

# 9. Bounded waits: the host stops the daemon (SIGSTOP) under a PROBE, then
#    under an INVALIDATE from the MMU notifier (the device is then marked
#    broken: this comes last).
echo 1000 >/sys/module/viommu_sva/parameters/req_timeout_ms
sva-test stall-probe 0x2a --hold 3
sva-test broken "$EP" --hold 3
bad="$(kmsg | grep -E 'BUG:|WARNING:|Oops|general protection|refcount_t|event lost' | head -n 5)"
if [ -z "$bad" ]; then
    pass kernel-healthy-stalled "no oops, warning or lost event with the daemon stopped"
else
    fail kernel-healthy-stalled "$(echo "$bad" | tr '\n' '|')"
fi

# 10. Module removal is clean, the device marked broken or not (requests
#     fail fast, the reset makes the daemon drop what the guest held).
if rmmod viommu_sva 2>/tmp/rmmod.err && [ ! -e /dev/viommu-sva ] &&
    kmsg | grep -q 'viommu_sva virtio[0-9]*: device removed'; then
    pass module-unload "rmmod: device removed, /dev/viommu-sva gone"
else
    fail module-unload "rmmod: $(cat /tmp/rmmod.err) $(ls /dev/viommu-sva 2>&1)"
fi

wait_host end
kmsg | grep -iE 'viommu|sva|iommu' | tail -n 20 | sed 's/^/VDI-DMESG: /'
echo "VDI-DONE"
