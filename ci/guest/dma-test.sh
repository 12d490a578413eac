#!/bin/sh
# ci/guest/dma-test.sh: guest side of the DMA boots of ci/guest-tests.sh
# and of ci/bench-guest.sh's DMA runs, installed as /etc/vdi/test.
# Owns: running vfio-dma against dma-test-device (a vfio-user PCI function)
# behind whatever virtio-iommu the host attached (the daemon or QEMU's
# built-in one), turning its PASS/FAIL lines into VDI-RESULT lines, and
# checking that the faults it provoked reached the guest's dmesg as
# virtio-iommu fault events.  With vdi.hold=1 the test stops once (HOLD,
# then VDI-WAIT end) for host-side checks, answered over /dev/ttyS1 as in
# daemon-test.sh.
# Kernel command line knobs:
#   vdi.dmadev=BDF    the DMA device (default 0000:00:05.0)
#   vdi.ep=N          its endpoint ID, as the fault messages print it (40)
#   vdi.loops=N       map/DMA/unmap/DMA cycles of the stale-cache check (50)
#   vdi.faults=1      expect virtio-iommu fault events (the daemon reports
#                     them; QEMU's built-in virtio-iommu does not)
#   vdi.hold=1        hold for the host's checks
#   vdi.bench=C,O     instead: benchmark, C map+DMA+unmap cycles and O DMAs
#                     on one mapping (prints VDI-BENCH lines)

DEV=0000:00:05.0
EP=40
LOOPS=50
FAULTS=0
HOLD=0
BENCH=""
read -r cmdline </proc/cmdline
for arg in $cmdline; do
    case "$arg" in
        vdi.dmadev=*) DEV="${arg#vdi.dmadev=}" ;;
        vdi.ep=*) EP="${arg#vdi.ep=}" ;;
        vdi.loops=*) LOOPS="${arg#vdi.loops=}" ;;
        vdi.faults=*) FAULTS="${arg#vdi.faults=}" ;;
        vdi.hold=*) HOLD="${arg#vdi.hold=}" ;;
        vdi.bench=*) BENCH="${arg#vdi.bench=}" ;;
    esac
done

# shellcheck source-path=SCRIPTDIR source=lib.sh
. /etc/vdi/lib.sh

stty -F /dev/ttyS1 -echo 2>/dev/null
exec 3</dev/ttyS1

if [ -n "$BENCH" ]; then
    cycles="${BENCH%,*}"
    ops="${BENCH#*,}"
    # Warm-up (first faults, first translations), then the measured run.
    vfio-dma --device "$DEV" --bench-cycles 200 --bench-ops 200 >/tmp/warmup.out 2>&1
    if vfio-dma --device "$DEV" --bench-cycles "$cycles" --bench-ops "$ops" >/tmp/bench.out 2>&1; then
        cat /tmp/bench.out
        echo "VDI-BENCH $(sed -n 's/^vfio-dma: BENCH .*\(cycles\/s=[0-9.]*\).*/\1/p' /tmp/bench.out)" \
            "$(sed -n 's/^vfio-dma: BENCH .*\(ops\/s=[0-9.]*\).*/\1/p' /tmp/bench.out)" \
            "$(sed -n 's/^vfio-dma: BENCH .*\( map_us=.*\)/\1/p' /tmp/bench.out)"
    else
        cat /tmp/warmup.out /tmp/bench.out
        echo "VDI-BENCH FAIL $(grep -m1 ERROR /tmp/bench.out /tmp/warmup.out)"
    fi
    echo "VDI-DONE"
    exit 0
fi

check_driver_probe

hold_arg=""
[ "$HOLD" = 1 ] && hold_arg=--hold-stdin
# Its output reaches the console as it comes: the host waits for HOLD.
{
    vfio-dma --device "$DEV" --loops "$LOOPS" $hold_arg <&3 2>&1
    echo $? >/tmp/dma.rc
} | tee /tmp/dma.out
sed -n 's/^vfio-dma: \(PASS\|FAIL\) /VDI-RESULT \1 /p' /tmp/dma.out
if ! grep -q '^vfio-dma: OK' /tmp/dma.out; then
    fail dma-run "rc=$(cat /tmp/dma.rc) $(grep -m1 ERROR /tmp/dma.out)"
fi

# The faults vfio-dma provoked, in order: FILL and COPY into the read-only
# page, FILL and CHECKSUM after the UNMAP, the partial FILL.  (The stale
# loop's faults come later; the driver rate-limits its messages.)
if [ "$FAULTS" = 1 ]; then
    want="0x300000 [W]|0x300010 [W]|0x200000 [W]|0x201000 [R]|0x401000 [W]"
    i=0
    while [ $i -lt 50 ] && [ "$(kmsg | grep -c "fault from EP $EP at")" -lt 5 ]; do
        sleep 0.1
        i=$((i + 1))
    done
    got="$(kmsg | grep "fault from EP $EP at" | head -n 5 | sed 's/.* at \(0x[0-9a-f]*\) \[\(.*\)\]$/\1 [\2]/' |
        tr '\n' '|' | sed 's/|$//')"
    if [ "$got" = "$want" ]; then
        pass fault-events "virtio-iommu fault events for EP $EP: $got"
    else
        fail fault-events "expected '$want', dmesg has '$got'"
    fi
fi

if [ "$HOLD" = 1 ]; then
    echo "VDI-WAIT end"
    # shellcheck disable=SC3045  # busybox sh has read -t
    read -r -t 120 reply <&3 && echo "VDI-GO end $reply"
fi
kmsg | grep -iE 'iommu|vfio|fault' | head -n 40 | sed 's/^/VDI-DMESG: /'
echo "VDI-DONE"
