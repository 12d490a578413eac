#!/usr/bin/env bash
# ci/bench-guest.sh: side-by-side guest benchmark of QEMU's built-in
# virtio-iommu and the vhost-device-iommu daemon.
# Owns: booting the same guest kernel under the same QEMU on this machine
# with (a) `-device virtio-iommu-pci` (QEMU builds the VIOT) and (b) the
# daemon behind vhost-user-test-device-pci (VIOT from `vhost-device-iommu
# viot`), polling on (--poll-us 50) and off (--poll-us 0), in alternating
# rounds (a, b-poll, b-nopoll, a, ...); each boot runs ci/guest/bench-test.sh
# (vfio-map --bench N: N VFIO MAP+UNMAP pairs of 4 KiB after a warm-up).
# Prints pairs/s per run, the median per configuration and the ratios
# daemon/builtin.
# Then device DMA (dma-test-device at 00:05.0 over vfio-user-pci, the same
# binary in both): (c) behind QEMU's built-in virtio-iommu (the device uses
# QEMU's per-mapping DMA_MAP messages) and (d) translated by the daemon
# (the device's viommu-client cache), alternating (c, d, c, ...); each boot
# runs ci/guest/dma-test.sh in bench mode: vfio-dma --bench-cycles C (VFIO
# map + 4 KiB FILL + unmap per cycle) and --bench-ops O (4 KiB FILLs on one
# long-lived mapping), and the mean time of the cycle's map, DMA and unmap.
# Prints cycles/s and ops/s, medians, ranges and ratios.  The DMA figures
# depend on thread placement: docs/benchmarks.md uses
# VDI_QEMU_CPUS=0 VDI_DAEMON_CPUS=1.
# Exits non-zero if a run failed.
#
# Usage: bash ci/bench-guest.sh
# Env:   VDI_BENCH_PAIRS    MAP+UNMAP pairs per run (default 100000)
#        VDI_BENCH_WARMUP   pairs run first and discarded (default 5000)
#        VDI_BENCH_ROUNDS   rounds of the three configurations (default 3)
#        VDI_BENCH_KERNELS  kernel indexes (default: the newest, i.e. the last)
#        VDI_BENCH_SUITES   map, dma or both (default "map dma")
#        VDI_BENCH_DMA      C,O: DMA cycles and DMA ops per run (default 5000,20000)
#        VDI_BENCH_SMP      guest vCPUs (default 1: under TCG a second vCPU thread
#                           plus the daemon oversubscribe a 2-CPU host)
#        VDI_BENCH_POLL_US  --poll-us of daemon-poll (default 50, the daemon's default)
#        VDI_QEMU_CPUS, VDI_DAEMON_CPUS  pin QEMU / the daemon and dma-test-device
#                           (taskset -c lists)
#        VDI_VCPU_CPUS      pin only QEMU's vCPU threads (found through QMP)
#        VDI_BENCH_TIMEOUT  hard timeout per boot in seconds (default 300)
#        VDI_BENCH_LOGDIR   log directory (default: new dir under ${TMPDIR:-/tmp})
#        plus the knobs of ci/provision.sh (VDI_ACCEL, VDI_CACHE, ...)

set -euo pipefail

ci_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=provision.sh
source "$ci_dir/provision.sh"
# shellcheck source=daemon-lib.sh
source "$ci_dir/daemon-lib.sh"

pairs="${VDI_BENCH_PAIRS:-100000}"
warmup="${VDI_BENCH_WARMUP:-5000}"
rounds="${VDI_BENCH_ROUNDS:-3}"
smp="${VDI_BENCH_SMP:-1}"
poll_us="${VDI_BENCH_POLL_US:-50}"
timeout_s="${VDI_BENCH_TIMEOUT:-300}"
kernels="${VDI_BENCH_KERNELS:-$((${#VDI_KERNEL_RELEASES[@]} - 1))}"
logdir="${VDI_BENCH_LOGDIR:-$(mktemp -d "${TMPDIR:-/tmp}/vdi-bench.XXXXXX")}"
mkdir -p "$logdir"
suites="${VDI_BENCH_SUITES:-map dma}"
dma_bench="${VDI_BENCH_DMA:-5000,20000}"

cleanup() {
    vdi_qemu_kill
    vdi_dma_device_stop >/dev/null 2>&1 || true
    vdi_daemon_stop >/dev/null 2>&1 || true
}
trap cleanup EXIT

vdi_daemon_build
VDI_RUST_LOG=info
echo "bench-guest: QEMU $VDI_QEMU_VERSION ($VDI_ACCEL), $(nproc) host CPUs, guest -smp $smp," \
    "$pairs pairs per run after $warmup warm-up pairs, $rounds rounds, daemon-poll = --poll-us $poll_us;" \
    "DMA: $dma_bench cycles,ops per run;" \
    "logs in $logdir"
echo "bench-guest: load average before: $(cut -d' ' -f1-3 /proc/loadavg);" \
    "pinning: QEMU ${VDI_QEMU_CPUS:-any}, vCPUs ${VDI_VCPU_CPUS:-any}, daemon and device ${VDI_DAEMON_CPUS:-any}"

# run KERNEL_INDEX CONFIG ROUND: one boot; prints pairs/s or "FAIL ...".
run() {
    local i="$1" config="$2" round="$3" dir
    dir="$logdir/${VDI_KERNEL_LABELS[$i]}-$config-$round"
    mkdir -p "$dir"
    # shellcheck disable=SC2054  # commas inside -device/-machine arguments are intended
    local initrd="$logdir/initrd-$i.gz"
    local append="$VDI_KERNEL_CMDLINE vdi.dev=0000:00:04.0 vdi.bench=$pairs vdi.warmup=$warmup"
    if [[ $config == dma-* ]]; then
        initrd="$logdir/initrd-dma-$i.gz"
        append="$VDI_KERNEL_CMDLINE vdi.dmadev=0000:00:05.0 vdi.bench=$dma_bench"
    fi
    local args=(
        -machine "q35,accel=$VDI_ACCEL,memory-backend=mem0" -cpu "$VDI_CPU" -smp "$smp" -m 512M
        -object memory-backend-memfd,id=mem0,size=512M,share=on
        -nodefaults -nographic -no-reboot -serial stdio
        -kernel "${VDI_KERNEL_IMAGES[$i]}" -initrd "$initrd" -append "$append"
    )
    case "$config" in
        builtin) args+=(-device "virtio-iommu-pci,addr=03.0") ;;
        dma-builtin)
            vdi_dma_device_start "$dir/dma-device.log" "$dir/dma.sock" ||
                { echo "FAIL dma-test-device did not start"; return 0; }
            args+=(-device "virtio-iommu-pci,addr=03.0" -device "$(vdi_dma_device_arg "$dir/dma.sock" 05.0)")
            ;;
        dma-daemon)
            vdi_viot "$dir/viot.bin" 00:03.0 00:05.0
            vdi_daemon_start "$dir/daemon.log" "$dir/vhost.sock" "$dir/ctl.sock" --endpoints 40 ||
                { echo "FAIL daemon did not start"; return 0; }
            vdi_dma_device_start "$dir/dma-device.log" "$dir/dma.sock" \
                --control-socket "$dir/ctl.sock" --endpoint 00:05.0 ||
                { echo "FAIL dma-test-device did not start"; return 0; }
            # shellcheck disable=SC2054
            args+=(-chardev "socket,id=viommu0,path=$dir/vhost.sock"
                -device vhost-user-test-device-pci,chardev=viommu0,virtio-id=23,num_vqs=2,config_size=40,addr=03.0
                -acpitable "file=$dir/viot.bin" -device "$(vdi_dma_device_arg "$dir/dma.sock" 05.0)")
            ;;
        daemon-*)
            local poll="$poll_us"
            [[ $config == daemon-nopoll ]] && poll=0
            vdi_viot "$dir/viot.bin" 00:03.0 00:04.0
            vdi_daemon_start "$dir/daemon.log" "$dir/vhost.sock" "" --endpoints 32 --poll-us "$poll" ||
                { echo "FAIL daemon did not start"; return 0; }
            # shellcheck disable=SC2054
            args+=(-chardev "socket,id=viommu0,path=$dir/vhost.sock"
                -device vhost-user-test-device-pci,chardev=viommu0,virtio-id=23,num_vqs=2,config_size=40,addr=03.0
                -acpitable "file=$dir/viot.bin")
            ;;
    esac
    [[ $config == dma-* ]] || args+=(-device "edu,addr=04.0")
    [[ -n "${VDI_VCPU_CPUS:-}" ]] && args+=(-qmp "unix:$dir/qmp.sock,server=on,wait=off")
    local rc=0
    vdi_qemu_start "$timeout_s" "$dir/console.log" "$dir" "${args[@]}"
    if [[ -n "${VDI_VCPU_CPUS:-}" ]] && ! vdi_qemu_pin_vcpus "$VDI_VCPU_CPUS" "$dir/qmp.sock" 2>"$dir/pin.err"; then
        echo "FAIL could not pin the vCPU threads: $(cat "$dir/pin.err")"
        vdi_qemu_kill
        vdi_dma_device_stop >/dev/null 2>&1 || true
        vdi_daemon_stop >/dev/null 2>&1 || true
        return 0
    fi
    vdi_qemu_wait || rc=$?
    vdi_dma_device_stop >/dev/null 2>&1 || true
    vdi_daemon_stop >/dev/null 2>&1 || true
    local line
    line="$(tr -d '\r' <"$dir/console.log" | grep -m1 '^VDI-BENCH ' || true)"
    case "$line" in
        "VDI-BENCH pairs/s="*) echo "${line#VDI-BENCH pairs/s=}" ;;
        "VDI-BENCH cycles/s="*) # "cycles/s=A ops/s=B map_us=M dma_us=D unmap_us=U" -> "A B M D U"
            sed 's/[a-z_/]*=//g; s/^VDI-BENCH //' <<<"$line" ;;
        "") echo "FAIL no result (QEMU status $rc, see $dir/console.log)" ;;
        *) echo "FAIL ${line#VDI-BENCH }" ;;
    esac
}

median() { sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

range() { sort -g | awk 'NR == 1 { lo = $1 } { hi = $1 } END { print lo "-" hi }'; }

# report LABEL CONFIG UNIT VALUES: median and range of one configuration.
report() {
    local med="n/a" rng="none"
    if [[ -n "$4" ]]; then
        med="$(tr ' ' '\n' <<<"$4" | grep . | median)"
        rng="$(tr ' ' '\n' <<<"$4" | grep . | range)"
    fi
    printf '%-6s median   %-14s %s %s  (range %s; runs: %s)\n' "$1" "$2" "$med" "$3" "$rng" "${4:-none}"
    echo "$med" >"$logdir/median-$2-${3//\//_}"
}

# ratio LABEL A B UNIT: median of A / median of B.
ratio() {
    local a b
    a="$(cat "$logdir/median-$2-${4//\//_}")" b="$(cat "$logdir/median-$3-${4//\//_}")"
    [[ $a == n/a || $b == n/a ]] && return 0
    printf '%-6s ratio    %-14s %s (%s)\n' "$1" "$2/$3" "$(awk -v a="$a" -v b="$b" 'BEGIN { printf "%.3f", a / b }')" "$4"
}

failures=0
for i in $kernels; do
    label="${VDI_KERNEL_LABELS[$i]}"
    vdi_build_initramfs "$i" "$logdir/initrd-$i.gz" "$ci_dir/guest/bench-test.sh:etc/vdi/test"
    vdi_build_initramfs "$i" "$logdir/initrd-dma-$i.gz" "$ci_dir/guest/dma-test.sh:etc/vdi/test"
    echo "--- kernel $label (${VDI_KERNEL_RELEASES[$i]})"
    for suite in $suites; do
        case "$suite" in
            map) configs=(builtin daemon-poll daemon-nopoll) ;;
            dma) configs=(dma-builtin dma-daemon) ;;
            *) echo "bench-guest: unknown suite '$suite'" >&2; exit 2 ;;
        esac
        declare -A results=()
        for ((r = 1; r <= rounds; r++)); do
            for c in "${configs[@]}"; do
                v="$(run "$i" "$c" "$r")"
                if [[ "$v" == FAIL* ]]; then
                    printf '%-6s round %d  %-14s %s\n' "$label" "$r" "$c" "$v"
                    failures=$((failures + 1))
                elif [[ $suite == map ]]; then
                    printf '%-6s round %d  %-14s %s pairs/s\n' "$label" "$r" "$c" "$v"
                    results[$c]+="$v "
                else
                    read -r cyc ops map dma unmap <<<"$v"
                    printf '%-6s round %d  %-14s %s cycles/s  %s ops/s  (cycle: map %s us, DMA %s us, unmap %s us)\n' \
                        "$label" "$r" "$c" "$cyc" "$ops" "$map" "$dma" "$unmap"
                    results[$c.cycles]+="$cyc "
                    results[$c.ops]+="$ops "
                    results[$c.map]+="$map "
                    results[$c.dma]+="$dma "
                    results[$c.unmap]+="$unmap "
                fi
            done
        done
        if [[ $suite == map ]]; then
            for c in "${configs[@]}"; do report "$label" "$c" pairs/s "${results[$c]:-}"; done
            for c in daemon-poll daemon-nopoll; do ratio "$label" "$c" builtin pairs/s; done
        else
            for c in "${configs[@]}"; do
                report "$label" "$c" cycles/s "${results[$c.cycles]:-}"
                report "$label" "$c" ops/s "${results[$c.ops]:-}"
                for p in map dma unmap; do report "$label" "$c" "us/$p" "${results[$c.$p]:-}"; done
            done
            ratio "$label" dma-daemon dma-builtin cycles/s
            ratio "$label" dma-daemon dma-builtin ops/s
        fi
        unset results
    done
done
echo "bench-guest: load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
if ((failures)); then
    echo "bench-guest: $failures run(s) failed; logs in $logdir"
    exit 1
fi
rm -rf "$logdir"
