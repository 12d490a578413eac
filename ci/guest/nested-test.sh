#!/bin/sh
# ci/guest/nested-test.sh: guest side of the `nested` boots of
# ci/guest-tests.sh, installed as /etc/vdi/test (busybox sh).
# Owns: inside a guest whose own IOMMU is QEMU's built-in virtio-iommu,
# with edu at VDI_DEV bound to vfio-pci, per backend (vfio: a type1
# container; iommufd: an IOAS, where the kernel has /dev/iommu): the
# daemon (vhost-device-iommu, glibc-dynamic, libraries in
# /usr/lib/nested) and nested-vmm, which plays the nested guest's driver
# over vhost-user and shadows its IOMMU into edu's container or IOAS
# with viommu-client, then programs edu's DMA engine (see
# nested-vmm/src/main.rs). Checks: the host IOMMU's IOVA holes (read from
# the container or IOAS) in the nested guest's PROBE and a MAP into one
# refused, the DMA at mapped IOVAs, the same DMA
# failing after UNMAP, bypass after DETACH, the fault that failed DMA
# raised in this guest's virtio-iommu (dmesg), the daemon's log, and a
# MAP/UNMAP latency benchmark through the shadow vs. the same ioctls
# issued directly.
# Prints "VDI-RESULT PASS|FAIL|SKIP <check> <detail>" lines and VDI-DONE.
# Knobs on the kernel command line: vdi.dev=BDF (default 0000:00:04.0),
# vdi.bench=N (MAP+UNMAP pairs, default 200).

DEV=0000:00:04.0
BENCH=200
read -r cmdline </proc/cmdline
for arg in $cmdline; do
    case "$arg" in
        vdi.dev=*) DEV="${arg#vdi.dev=}" ;;
        vdi.bench=*) BENCH="${arg#vdi.bench=}" ;;
    esac
done
EP=0x20
DIR=/tmp/nested
export LD_LIBRARY_PATH=/usr/lib/nested

# shellcheck source-path=SCRIPTDIR source=lib.sh
. /etc/vdi/lib.sh

check_driver_probe

echo vfio-pci >"/sys/bus/pci/devices/$DEV/driver_override"
echo "$DEV" >/sys/bus/pci/drivers/vfio-pci/bind 2>/dev/null ||
    echo "$DEV" >/sys/bus/pci/drivers_probe
echo "nested: $DEV driver $(basename "$(readlink "/sys/bus/pci/devices/$DEV/driver")"), group $(basename "$(readlink "/sys/bus/pci/devices/$DEV/iommu_group")")"

DPID=""
start_daemon() { # LOG
    rm -rf "$DIR" && mkdir -p "$DIR"
    RUST_LOG=info vhost-device-iommu --socket-path "$DIR/vhost.sock" \
        --control-socket "$DIR/ctl.sock" --endpoints "$EP" --state-dir "$DIR/state" \
        --client-timeout-ms 10000 >"$1" 2>&1 &
    DPID=$!
    i=0
    while [ $i -lt 200 ]; do
        [ -S "$DIR/vhost.sock" ] && [ -S "$DIR/ctl.sock" ] && return 0
        kill -0 "$DPID" 2>/dev/null || break
        sleep 0.05
        i=$((i + 1))
    done
    return 1
}

stop_daemon() { # BACKEND LOG
    kill -TERM "$DPID" 2>/dev/null
    wait "$DPID"
    rc=$?
    bad="$(grep -m1 -E ' (ERROR|WARN) ' "$2")"
    if [ "$rc" = 0 ] && [ -z "$bad" ]; then
        pass "nested-daemon-$1" "exit status 0, no WARN/ERROR line"
    else
        fail "nested-daemon-$1" "exit status $rc; $bad"
    fi
    sed 's/^/nested-daemon: /' "$2" | tail -n 5
}

for backend in vfio iommufd; do
    if [ $backend = iommufd ] && [ ! -e /dev/iommu ]; then
        why="kernel $(uname -r) has no /dev/iommu (CONFIG_IOMMUFD is not set)"
        for c in nested-constraints nested-dma nested-unmap nested-bypass nested-fault nested-daemon nested-bench; do
            echo "VDI-RESULT SKIP $c-$backend $why"
        done
        continue
    fi
    log="/tmp/daemon-$backend.log"
    if ! start_daemon "$log"; then
        fail "nested-daemon-$backend" "the daemon did not start: $(tail -n 3 "$log" | tr '\n' '|')"
        continue
    fi
    faults_before="$(kmsg | grep -c 'fault from EP')"
    nested-vmm test --backend $backend --device "$DEV" --endpoint "$EP" \
        --socket "$DIR/vhost.sock" --control "$DIR/ctl.sock" >/tmp/nested.out 2>&1
    rc=$?
    cat /tmp/nested.out
    grep -q "^VDI-RESULT" /tmp/nested.out ||
        fail "nested-dma-$backend" "nested-vmm exit status $rc: $(grep -m1 ERROR /tmp/nested.out)"
    # edu's DMA after the UNMAP faulted in this guest's virtio-iommu.
    faults="$(kmsg | grep 'fault from EP' | tail -n +$((faults_before + 1)))"
    if echo "$faults" | grep -q "fault from EP $((EP))"; then
        pass "nested-fault-$backend" "$(echo "$faults" | head -n 1)"
    else
        fail "nested-fault-$backend" "no virtio-iommu fault of EP $((EP)) after the DMA to the unmapped IOVA"
    fi
    stop_daemon $backend "$log"

    start_daemon "$log.bench" || { fail "nested-bench-$backend" "the daemon did not start"; continue; }
    nested-vmm bench "$BENCH" --backend $backend --device "$DEV" --endpoint "$EP" \
        --socket "$DIR/vhost.sock" --control "$DIR/ctl.sock" >/tmp/bench.out 2>&1
    rc=$?
    cat /tmp/bench.out
    line="$(grep -m1 'BENCH' /tmp/bench.out)"
    if [ "$rc" = 0 ] && [ -n "$line" ]; then
        pass "nested-bench-$backend" "${line#nested-vmm: BENCH }"
    else
        fail "nested-bench-$backend" "exit status $rc $(grep -m1 ERROR /tmp/bench.out)"
    fi
    kill -TERM "$DPID" 2>/dev/null
    wait "$DPID"
done

kmsg | grep -iE 'iommu|vfio' | tail -n 20 | sed 's/^/VDI-DMESG: /'
echo "VDI-DONE"
