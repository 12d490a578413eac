#!/bin/sh
# ci/guest/daemon-test.sh: guest side of ci/guest-tests.sh, installed as
# /etc/vdi/test and run by the guest /init (busybox sh, modules loaded).
# Owns: the in-guest steps against the vhost-device-iommu daemon, in lock
# step with the host: the guest prints "VDI-WAIT <step>" and blocks until the
# host, having checked the daemon's state, writes a line to the guest's
# second serial port (/dev/ttyS1).  Guest-side verdicts are
# "VDI-RESULT PASS|FAIL <check> <detail>" lines, "VDI-DONE" ends the test.
# Kernel command line knobs:
#   vdi.mode=translated|identity   (default translated)
#   vdi.dev=BDF      main endpoint (default 0000:00:04.0)
#   vdi.hpdev=BDF    endpoint the host hot-unplugs (translated mode; none if unset)
#   vdi.bench=N      MAP+UNMAP pairs of the short benchmark (translated mode)
#   vdi.dmadev=BDF   identity mode: dma-test-device, checked with DMA at
#                    guest-physical addresses (vfio-dma --mode phys)

MODE=translated
DEV=0000:00:04.0
HPDEV=""
DMADEV=""
BENCH=1000
read -r cmdline </proc/cmdline
for arg in $cmdline; do
    case "$arg" in
        vdi.mode=*) MODE="${arg#vdi.mode=}" ;;
        vdi.dev=*) DEV="${arg#vdi.dev=}" ;;
        vdi.hpdev=*) HPDEV="${arg#vdi.hpdev=}" ;;
        vdi.bench=*) BENCH="${arg#vdi.bench=}" ;;
        vdi.dmadev=*) DMADEV="${arg#vdi.dmadev=}" ;;
    esac
done

# shellcheck source-path=SCRIPTDIR source=lib.sh
. /etc/vdi/lib.sh

# Host line channel: keep /dev/ttyS1 open for the whole test (closing a tty
# drops its unread input) and do not echo back what the host writes.
stty -F /dev/ttyS1 -echo 2>/dev/null
exec 3</dev/ttyS1
wait_host() { # STEP: announce STEP, wait for the host's go-ahead
    echo "VDI-WAIT $1"
    # shellcheck disable=SC3045  # busybox sh has read -t
    if read -r -t 120 reply <&3; then
        echo "VDI-GO $1 $reply"
    else
        echo "VDI-GO $1 (no answer from the host within 120 s)"
    fi
}

# Binds a PCI device to vfio-pci without opening it: on 6.12 this is what
# gives an ACPI VIOT endpoint its IOMMU group, i.e. probes and attaches it.
bind_vfio() {
    echo vfio-pci >"/sys/bus/pci/devices/$1/driver_override" &&
        echo "$1" >/sys/bus/pci/drivers_probe
    echo "VDI-INFO bind $1: driver=$(basename "$(readlink "/sys/bus/pci/devices/$1/driver")")" \
        "group=$(basename "$(readlink "/sys/bus/pci/devices/$1/iommu_group")")"
}

group_of() { basename "$(readlink "/sys/bus/pci/devices/$1/iommu_group" 2>/dev/null)" 2>/dev/null; }

# 1. The virtio-iommu driver probed the device.
check_driver_probe

# 2. The endpoint's IOMMU group carries the x86 MSI window the daemon
#    reported in its PROBE reply (RESV_MEM, subtype MSI).
check_msi_window() { # BDF
    g="$(group_of "$1")"
    regions="$(tr '\n' ';' <"/sys/kernel/iommu_groups/$g/reserved_regions" 2>/dev/null)"
    case "$regions" in
        *"0x00000000fee00000 0x00000000feefffff msi"*) pass msi-window "$1 group $g: $regions" ;;
        *) fail msi-window "$1 group '$g' reserved regions: '$regions'" ;;
    esac
}

if [ "$MODE" = identity ]; then
    bind_vfio "$DEV"
    g="$(group_of "$DEV")"
    type="$(cat "/sys/kernel/iommu_groups/$g/type" 2>/dev/null)"
    if [ "$type" = identity ]; then
        pass identity-domain "$DEV group $g type $type"
    else
        fail identity-domain "$DEV group '$g' type '$type' (expected identity)"
    fi
    check_msi_window "$DEV"
    # Identity or bypass domain: the device's DMA goes straight through.
    if [ -n "$DMADEV" ]; then
        vfio-dma --mode phys --device "$DMADEV" >/tmp/dma.out 2>&1
        cat /tmp/dma.out
        sed -n 's/^vfio-dma: \(PASS\|FAIL\) /VDI-RESULT \1 /p' /tmp/dma.out
        grep -q '^vfio-dma: \(PASS\|FAIL\) dma-identity' /tmp/dma.out ||
            fail dma-identity "$(grep -m1 ERROR /tmp/dma.out)"
    fi
    wait_host identity
else
    [ -n "$HPDEV" ] && bind_vfio "$HPDEV"
    # 3. VFIO mappings, held while the host compares them with the daemon's
    #    domain, held again after the unmaps (container still open).
    # Its output reaches the console as it comes: the host waits for HOLD.
    {
        vfio-map --device "$DEV" --count 4 --iova 0x10000000 --size 0x2000 \
            --hold-stdin --hold-after-unmap <&3 2>&1
        echo $? >/tmp/map.rc
    } | tee /tmp/map.out
    rc="$(cat /tmp/map.rc)"
    maps=$(grep -c '^vfio-map: MAP ' /tmp/map.out)
    unmaps=$(grep -c '^vfio-map: UNMAP ' /tmp/map.out)
    if [ "$rc" = 0 ] && [ "$maps" = 4 ] && [ "$unmaps" = 4 ]; then
        pass vfio-map "maps=$maps unmaps=$unmaps"
    else
        fail vfio-map "rc=$rc maps=$maps unmaps=$unmaps $(grep -m1 ERROR /tmp/map.out)"
    fi
    check_msi_window "$DEV"

    # 4. No fault or error report from the driver so far.
    bad="$(kmsg | grep -E 'fault from EP|invalid event|virtio_iommu.*(error|fail|timeout)|could not' | head -n 5)"
    if [ -z "$bad" ]; then
        pass no-errors "no fault or error messages before the injected fault"
    else
        fail no-errors "$(echo "$bad" | tr '\n' '|')"
    fi

    # 5. A fault the host injects through the daemon's control plane.
    wait_host fault
    i=0
    while [ $i -lt 50 ] && ! kmsg | grep -q 'fault from EP'; do
        sleep 0.1
        i=$((i + 1))
    done
    kmsg | grep 'fault from EP' | sed 's/^/VDI-FAULT /'

    # 6. Short MAP+UNMAP benchmark (many requests through the daemon).
    check_bench "$DEV" "$BENCH"

    # 7. Hot-unplug of HPDEV by the host.
    if [ -n "$HPDEV" ]; then
        wait_host unplug
        i=0
        while [ $i -lt 50 ] && [ -e "/sys/bus/pci/devices/$HPDEV" ]; do
            sleep 0.1
            i=$((i + 1))
        done
        if [ -e "/sys/bus/pci/devices/$HPDEV" ]; then
            fail unplug-seen "$HPDEV still present"
        else
            pass unplug-seen "$HPDEV removed"
        fi
    fi
fi

wait_host end
kmsg | grep -iE 'iommu|vfio|viot' | sed 's/^/VDI-DMESG: /'
echo "VDI-DONE"
