#!/usr/bin/env bash
# ci/sva-tests.sh: the guest SVA module (guest/sva/) against the daemon.
# Owns: for each guest kernel of ci/provision.sh that a compiler can be had
# for (VDI_KBUILD=1: headers, and gcc-14 unpacked for 7.x), building
# viommu_sva.ko, an initramfs that loads it INSTEAD of virtio_iommu, and
# one boot under QEMU 11 with its own daemon (vhost-user-test-device-pci at
# 00:03.0, --endpoints 0x28) and, when VDI_SVA_DMADEV_CMD is set, the
# vfio-user DMA test device at 00:05.0 (endpoint 0x28).
#
# No VIOT is given: viommu_sva is not an IOMMU driver of the kernel (it
# never registers one), so a VIOT endpoint would wait for one forever
# (-EPROBE_DEFER) and the DMA device's driver would never bind.  Its
# PASID-less DMA goes through the daemon's boot bypass.
#
# A second boot per kernel replaces the daemon with ci/fake-sva-device.py,
# a scripted device that speaks the whole profile and emulates a PASID DMA
# engine, so that the module's SVA path (ATTACH_TABLE, page requests and
# groups, INVALIDATE from munmap, exit under an open request, DETACH/FREE
# order, bounded waits, a broken device) is tested now, before the daemon
# has it (ci/guest/sva-fake-test.sh; host checks by its `drive` mode).
#
# Checks per kernel: module-build, boot, the guest's VDI-RESULT lines
# (ci/guest/sva-test.sh: probe, features, PROBE, PASID_ALLOC/FREE, BIND
# refused or bound, the SVA checks of issue 14, kernel health, rmmod), the
# guest's PASIDs in the daemon while held and none left at the end
# (`ctl pasids`), daemon health and clean exit.  The SVA checks are SKIP
# (with the reason) until the daemon offers F_ATTACH_TABLE/F_PAGE_REQUEST
# and the DMA device is there.  Prints "N passed, M failed, K skipped";
# exits non-zero if anything failed.
#
# Usage: bash ci/sva-tests.sh
# Env:   VDI_SVA_DMADEV_CMD   command starting the vfio-user DMA test device
#                             server; "{sock}" is replaced by its socket path,
#                             "{ctl}" by the daemon's control socket
#        VDI_SVA_FILL_MIB     size of the on-demand fill (default 64)
#        VDI_SVA_BENCH=1      also run the SVA benchmark in the guest
#        VDI_GUEST_TIMEOUT, VDI_GUEST_LOGDIR, VDI_GUEST_KEEP_LOGS,
#        VDI_GUEST_KERNELS    as in ci/guest-tests.sh
#        plus the knobs of ci/provision.sh

set -euo pipefail

ci_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export VDI_KBUILD=1
# shellcheck source=provision.sh
source "$ci_dir/provision.sh"
# shellcheck source=daemon-lib.sh
source "$ci_dir/daemon-lib.sh"

timeout_s="${VDI_GUEST_TIMEOUT:-300}"
fill_mib="${VDI_SVA_FILL_MIB:-64}"
bench="${VDI_SVA_BENCH:-0}"
logdir="${VDI_GUEST_LOGDIR:-$(mktemp -d "${TMPDIR:-/tmp}/vdi-sva.XXXXXX")}"
mkdir -p "$logdir"
kernels="${VDI_GUEST_KERNELS:-${!VDI_KERNEL_RELEASES[*]}}"
ep_id=40   # 0x28 = 00:05.0
dmadev_bdf=05.0

passed=0
failed=0
skipped=0
result() { # PASS|FAIL|SKIP NAME DETAIL
    printf '%-4s %-40s %s\n' "$1" "$2" "$3"
    case "$1" in
        PASS) passed=$((passed + 1)) ;;
        SKIP) skipped=$((skipped + 1)) ;;
        *) failed=$((failed + 1)) ;;
    esac
}

dmadev_pid=""
cleanup() {
    vdi_qemu_kill
    vdi_daemon_stop >/dev/null 2>&1 || true
    [[ -n "$dmadev_pid" ]] && kill "$dmadev_pid" 2>/dev/null
    return 0
}
trap cleanup EXIT

vdi_daemon_build
echo "sva-tests: QEMU $VDI_QEMU_VERSION ($VDI_ACCEL), kernels: ${VDI_KERNEL_RELEASES[*]}, daemon $VDI_DAEMON_BIN; logs in $logdir"

name=""
console=""
ctl_sock=""
alive=no
deadline=0

# reach ERE: wait until the guest printed ERE (QEMU alive, time left).
reach() {
    [[ $alive == yes ]] || return 1
    while ! tr -d '\r' <"$console" | grep -Eq -- "$1"; do
        if ! kill -0 "$VDI_QEMU_PID" 2>/dev/null || (($(date +%s) >= deadline)); then
            alive=no
            return 1
        fi
        sleep 0.05
    done
}
go() { vdi_send_guest go || alive=no; }
hostcheck() { # NAME ARGS...: one hostcheck.py verdict
    local n="$1" line
    shift
    line="$(python3 "$ci_dir/hostcheck.py" "$@" --bin "$VDI_DAEMON_BIN" --ctl "$ctl_sock" 2>&1 | tail -n 1)"
    case "$line" in
        "PASS "*) result PASS "$name/$n" "${line#PASS }" ;;
        *) result FAIL "$name/$n" "${line#FAIL }" ;;
    esac
}

boot() { # KERNEL_INDEX KO_DIR
    local i="$1" ko_dir="$2" label="${VDI_KERNEL_LABELS[$i]}"
    local dir="$logdir/$label" failed_before=$failed
    name="$label"
    console="$dir/console.log"
    ctl_sock="$dir/ctl.sock"
    mkdir -p "$dir"
    local sock="$dir/vhost.sock" daemon_log="$dir/daemon.log" devargs=()

    vdi_build_initramfs "$i" "$dir/initrd.gz" --modules "$ko_dir/viommu_sva.ko" \
        "$ci_dir/guest/sva-test.sh:etc/vdi/test"
    if ! vdi_daemon_start "$daemon_log" "$sock" "$ctl_sock" --endpoints "$ep_id"; then
        result FAIL "$name/daemon-start" "see $daemon_log"
        return 0
    fi
    local dpid="$VDI_DAEMON_PID" t0="$EPOCHREALTIME"
    if [[ -n "${VDI_SVA_DMADEV_CMD:-}" ]]; then
        local dsock="$dir/dmadev.sock" cmd="${VDI_SVA_DMADEV_CMD//\{sock\}/$dir/dmadev.sock}"
        cmd="${cmd//\{ctl\}/$ctl_sock}"
        bash -c "$cmd" >"$dir/dmadev.log" 2>&1 &
        dmadev_pid=$!
        for ((k = 0; k < 100; k++)); do [[ -S "$dsock" ]] && break; sleep 0.05; done
        devargs=(-device "{\"driver\":\"vfio-user-pci\",\"socket\":{\"type\":\"unix\",\"path\":\"$dsock\"},\"addr\":\"$dmadev_bdf\"}")
    fi

    echo "--- $name: ${VDI_KERNEL_RELEASES[$i]} (timeout ${timeout_s}s)"
    deadline=$(($(date +%s) + timeout_s))
    alive=yes
    # shellcheck disable=SC2054  # commas inside -device/-machine arguments are intended
    vdi_qemu_start "$timeout_s" "$console" "$dir" \
        -machine "q35,accel=$VDI_ACCEL,memory-backend=mem0" -cpu "$VDI_CPU" -smp 2 -m 1G \
        -object memory-backend-memfd,id=mem0,size=1G,share=on \
        -nodefaults -nographic -no-reboot -serial stdio \
        -kernel "${VDI_KERNEL_IMAGES[$i]}" -initrd "$dir/initrd.gz" \
        -append "$VDI_KERNEL_CMDLINE vdi.ep=$ep_id vdi.fillmib=$fill_mib vdi.bench=$bench" \
        -chardev "socket,id=viommu0,path=$sock" \
        -device vhost-user-test-device-pci,chardev=viommu0,virtio-id=23,num_vqs=2,config_size=40,addr=03.0 \
        "${devargs[@]}"

    local held=no
    if reach '^VDI-WAIT pasids$'; then
        hostcheck pasids-host pasids --console "$console"
        held=yes
        go
    fi
    [[ $held == yes ]] || result FAIL "$name/pasids-host" "the guest never held its PASIDs (see $console)"
    if reach '^VDI-WAIT end$'; then
        hostcheck pasids-returned pasids --none
        python3 "$ci_dir/hostcheck.py" health --bin "$VDI_DAEMON_BIN" --ctl "$ctl_sock" \
            --pid "$dpid" --log "$daemon_log" | tail -n 1 | {
            read -r v d
            echo "$v $d" >"$dir/health"
        }
        go
    else
        result FAIL "$name/pasids-returned" "the guest did not reach the end (see $console)"
    fi

    local rc=0 secs
    [[ $alive == yes ]] || vdi_qemu_kill
    vdi_qemu_wait || rc=$?
    secs="$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')"
    if [[ $rc -eq 0 ]] && tr -d '\r' <"$console" | grep -q '^VDI-DONE'; then
        result PASS "$name/boot" "${secs}s, guest test done, powered off cleanly"
    else
        result FAIL "$name/boot" "QEMU status $rc after ${secs}s, guest test did not finish"
    fi

    local line status check detail
    while read -r line; do
        read -r _ status check detail <<<"$line"
        result "$status" "$name/$check" "$detail"
    done < <(tr -d '\r' <"$console" | grep -E '^VDI-RESULT (PASS|FAIL|SKIP) ')
    tr -d '\r' <"$console" | grep '^VDI-BENCH ' | sed "s/^/     $name: /" || true
    local c
    for c in sva-probe sva-features sva-probe-ep pasid-alloc pasid-range pasid-errno pasid-free \
        pasid-close dma-device sva-bind sva-fill sva-copy sva-checksum sva-munmap sva-child-exit sva-healthy \
        sva-unbind kernel-healthy module-unload; do
        tr -d '\r' <"$console" | grep -Eq "^VDI-RESULT (PASS|FAIL|SKIP) $c( |\$)" ||
            result FAIL "$name/$c" "not reported (see $console)"
    done
    tr -d '\r' <"$console" | grep -Eq '^VDI-RESULT (PASS|FAIL) (bind-refused|bind) ' ||
        result FAIL "$name/bind" "not reported (see $console)"

    if [[ -s "$dir/health" ]]; then
        read -r status detail <"$dir/health"
        [[ $status == PASS ]] || status=FAIL
        result "$status" "$name/daemon-health" "$detail"
    else
        result FAIL "$name/daemon-health" "not checked"
    fi
    local drc=0
    vdi_daemon_stop || drc=$?
    if [[ $drc -eq 0 ]]; then
        result PASS "$name/daemon-exit" "pid $dpid, exit status 0"
    else
        result FAIL "$name/daemon-exit" "exit status $drc"
    fi
    if [[ -n "$dmadev_pid" ]]; then
        kill "$dmadev_pid" 2>/dev/null || true
        wait "$dmadev_pid" 2>/dev/null || true
        dmadev_pid=""
    fi
    if [[ $failed -gt $failed_before ]]; then
        echo "     $name: last console lines ($console):"
        tr -d '\r' <"$console" | grep -v '^$' | tail -n 25 | sed 's/^/       /'
        echo "     $name: last daemon log lines ($daemon_log):"
        tail -n 10 "$daemon_log" | sed 's/^/       /'
    fi
}

# fake_boot KERNEL_INDEX KO_DIR: the module against ci/fake-sva-device.py
fake_boot() {
    local i="$1" ko_dir="$2" label="${VDI_KERNEL_LABELS[$i]}"
    local dir="$logdir/$label-fake" failed_before=$failed
    name="$label/fake"
    console="$dir/console.log"
    mkdir -p "$dir"
    local sock="$dir/vhost.sock" ctl="$dir/fake-ctl.sock" fake_pid drv_pid t0="$EPOCHREALTIME"

    vdi_build_initramfs "$i" "$dir/initrd.gz" --modules "$ko_dir/viommu_sva.ko" \
        "$ci_dir/guest/sva-fake-test.sh:etc/vdi/test"
    rm -f "$sock" "$ctl"
    python3 "$ci_dir/fake-sva-device.py" serve --socket "$sock" --control "$ctl" \
        --log "$dir/requests.jsonl" --endpoints "$ep_id,$((ep_id + 1))" >"$dir/fake.log" 2>&1 &
    fake_pid=$!
    for ((k = 0; k < 100; k++)); do [[ -S "$sock" && -S "$ctl" ]] && break; sleep 0.05; done
    echo "--- $name: ${VDI_KERNEL_RELEASES[$i]} against ci/fake-sva-device.py (timeout ${timeout_s}s)"
    # shellcheck disable=SC2054  # commas inside -device/-machine arguments are intended
    vdi_qemu_start "$timeout_s" "$console" "$dir" \
        -machine "q35,accel=$VDI_ACCEL,memory-backend=mem0" -cpu "$VDI_CPU" -smp 2 -m 512M \
        -object memory-backend-memfd,id=mem0,size=512M,share=on \
        -nodefaults -nographic -no-reboot -serial stdio \
        -kernel "${VDI_KERNEL_IMAGES[$i]}" -initrd "$dir/initrd.gz" \
        -append "$VDI_KERNEL_CMDLINE vdi.ep=$ep_id vdi.ep2=$((ep_id + 1))" \
        -chardev "socket,id=viommu0,path=$sock" \
        -device vhost-user-test-device-pci,chardev=viommu0,virtio-id=23,num_vqs=2,config_size=40,addr=03.0
    python3 "$ci_dir/fake-sva-device.py" drive --control "$ctl" --console "$console" \
        --hostline "$dir/hostline.in" --timeout "$timeout_s" >"$dir/driver.out" 2>&1 &
    drv_pid=$!
    local rc=0 secs
    vdi_qemu_wait || rc=$?
    wait "$drv_pid" || true
    kill "$fake_pid" 2>/dev/null || true
    wait "$fake_pid" 2>/dev/null || true
    secs="$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')"
    if [[ $rc -eq 0 ]] && tr -d '\r' <"$console" | grep -q '^VDI-DONE'; then
        result PASS "$name/boot" "${secs}s, guest test done, powered off cleanly"
    else
        result FAIL "$name/boot" "QEMU status $rc after ${secs}s, guest test did not finish"
    fi
    local line status check detail c
    while read -r status check detail; do
        case "$status" in PASS | FAIL) result "$status" "$name/$check" "$detail" ;; esac
    done <"$dir/driver.out"
    while read -r line; do
        read -r _ status check detail <<<"$line"
        result "$status" "$name/$check" "$detail"
    done < <(tr -d '\r' <"$console" | grep -E '^VDI-RESULT (PASS|FAIL|SKIP) ')
    for c in sva-probe fake-bind attach-table fake-dma-fill fake-latency fake-dma-read fake-readonly \
        invalidate-munmap fake-munmap page-groups page-resp-once fake-events exit-order \
        fake-child-exit unbind-order fake-unbind fake-timeout fake-state-clean fake-broken \
        kernel-healthy module-unload; do
        { tr -d '\r' <"$console" | grep -Eq "^VDI-RESULT (PASS|FAIL|SKIP) $c( |\$)"; } ||
            grep -Eq "^(PASS|FAIL) $c( |\$)" "$dir/driver.out" ||
            result FAIL "$name/$c" "not reported (see $console, $dir/driver.out)"
    done
    if [[ $failed -gt $failed_before ]]; then
        echo "     $name: last console lines ($console):"
        tr -d '\r' <"$console" | grep -v '^$' | tail -n 25 | sed 's/^/       /'
        echo "     $name: driver ($dir/driver.out), fake device ($dir/fake.log):"
        tail -n 5 "$dir/driver.out" "$dir/fake.log" | sed 's/^/       /'
    fi
}

for i in $kernels; do
    label="${VDI_KERNEL_LABELS[$i]}"
    if [[ -z "${VDI_KBUILD_DIRS[$i]:-}" ]]; then
        result SKIP "$label/module-build" "no kbuild for ${VDI_KERNEL_RELEASES[$i]}"
        continue
    fi
    if ! ko_dir="$(vdi_build_module "$i" "$ci_dir/../guest/sva" 2>"$logdir/build-$label.log")"; then
        result FAIL "$label/module-build" "$(tail -n 3 "$logdir/build-$label.log" | tr '\n' ' ')"
        continue
    fi
    result PASS "$label/module-build" "viommu_sva.ko for ${VDI_KERNEL_RELEASES[$i]} ($(tail -n 1 "${VDI_KBUILD_DIRS[$i]}/cc" | cut -d' ' -f1)), no warning"
    boot "$i" "$ko_dir"
    fake_boot "$i" "$ko_dir"
done

if [[ $failed -gt 0 || "${VDI_GUEST_KEEP_LOGS:-0}" == 1 ]]; then
    echo "sva-tests: logs kept in $logdir"
else
    rm -rf "$logdir"
fi
echo "$passed passed, $failed failed, $skipped skipped"
[[ $failed -eq 0 ]]
