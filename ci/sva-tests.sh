#!/usr/bin/env bash
# ci/sva-tests.sh: the guest SVA module (guest/sva/) against the daemon and
# the DMA test device.
# Owns: for each guest kernel of ci/provision.sh that a compiler can be had
# for (VDI_KBUILD=1: headers, and gcc-14 unpacked for 7.x), building
# viommu_sva.ko, an initramfs that loads it INSTEAD of virtio_iommu, and
# one boot under QEMU 11 with its own daemon (vhost-user-test-device-pci at
# 00:03.0, --endpoints 0x28,0x29) and dma-test-device at 00:05.0
# (endpoint 0x28) translating through the daemon.
#
# No VIOT is given: viommu_sva is not an IOMMU driver of the kernel (it
# never registers one), so a VIOT endpoint would wait for one forever
# (-EPROBE_DEFER) and the DMA device's driver would never bind.  Its
# PASID-less DMA goes through the daemon's boot bypass.
#
# The guest (ci/guest/sva-test.sh, /bin/sva-test) runs in lock step with
# this runner: at each "VDI-WAIT <step> key=value..." line the runner
# checks the daemon's side (ci/hostcheck.py, through `ctl`, a subscriber
# of the event stream recording to events.jsonl, and the daemon's debug
# log), then answers "go" on the guest's ttyS1.
#
# Checks per kernel: module-build, boot, the guest's VDI-RESULT lines
# (probe, features, PROBE, PASID_ALLOC/FREE, the DMA device, BIND, the SVA
# checks of issue 14: 64 MiB on-demand fill, copy and checksum with some
# pages resident, resident read, read-only and munmapped memory, a child
# exiting with DMA in flight; bounded waits with the daemon stopped;
# kernel health, rmmod), and on the host: the guest's PASIDs in the daemon
# while held and none left at the end, the binding (sva-bound), the
# page-request and response counts of the module against the daemon's
# (fill-counts, totals-counts), the munmap's INVALIDATE (invalidate-munmap),
# the child's teardown (child-gone: nothing left, the store clean, INVALIDATE
# -> DETACH_TABLE -> PASID_FREE), the unbind order (unbind-order), daemon and
# device health, the daemon's clean exit and the host store after it
# (store-clean).  Prints "N passed, M failed, K skipped"; exits non-zero if
# anything failed.
#
# Usage: bash ci/sva-tests.sh
# Env:   VDI_SVA_DMADEV_CMD   command starting another vfio-user DMA device
#                             server instead of dma-test-device; "{sock}" is
#                             replaced by its socket path, "{ctl}" by the
#                             daemon's control socket
#        VDI_SVA_FILL_MIB     size of the on-demand fill (default 64)
#        VDI_SVA_BENCH=1      also run the SVA benchmark in the guest
#                             (VDI_SVA_BENCH_ROUNDS alternated rounds, default 5)
#        VDI_GUEST_TIMEOUT, VDI_GUEST_LOGDIR, VDI_GUEST_KEEP_LOGS,
#        VDI_GUEST_KERNELS    as in ci/guest-tests.sh
#        plus the knobs of ci/provision.sh and ci/daemon-lib.sh

set -euo pipefail

ci_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export VDI_KBUILD=1
# shellcheck source=provision.sh
source "$ci_dir/provision.sh"
# shellcheck source=daemon-lib.sh
source "$ci_dir/daemon-lib.sh"

# The unbind-order checks read the daemon's debug lines of ATTACH_TABLE,
# DETACH_TABLE and the PASID requests, whatever else VDI_RUST_LOG asks for.
export VDI_RUST_LOG="${VDI_RUST_LOG:-debug},viommu::device=debug,vhost_device_iommu::iommu=debug"
timeout_s="${VDI_GUEST_TIMEOUT:-300}"
fill_mib="${VDI_SVA_FILL_MIB:-64}"
bench="${VDI_SVA_BENCH:-0}"
bench_rounds="${VDI_SVA_BENCH_ROUNDS:-5}"
logdir="${VDI_GUEST_LOGDIR:-$(mktemp -d "${TMPDIR:-/tmp}/vdi-sva.XXXXXX")}"
mkdir -p "$logdir"
kernels="${VDI_GUEST_KERNELS:-${!VDI_KERNEL_RELEASES[*]}}"
ep_id=40   # 0x28 = 00:05.0, the DMA test device
ep2_id=41  # 0x29: a second endpoint of the same mm (no device behind it)
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
watch_pid=""
resume_pid=""
dpid=""
cleanup() {
    [[ -n "$dpid" ]] && kill -CONT "$dpid" 2>/dev/null
    vdi_qemu_kill
    vdi_daemon_stop >/dev/null 2>&1 || true
    [[ -n "$dmadev_pid" ]] && kill "$dmadev_pid" 2>/dev/null
    [[ -n "$watch_pid" ]] && kill "$watch_pid" 2>/dev/null
    return 0
}
trap cleanup EXIT

vdi_daemon_build
echo "sva-tests: QEMU $VDI_QEMU_VERSION ($VDI_ACCEL), kernels: ${VDI_KERNEL_RELEASES[*]}, daemon $VDI_DAEMON_BIN; logs in $logdir"

name=""
console=""
ctl_sock=""
dir=""
daemon_log=""
alive=no
deadline=0

go() { vdi_send_guest "${1:-go}" || alive=no; }
# console_has ERE: whether the guest printed a line matching ERE. (Not
# `tr | grep -q`: under pipefail, tr killed by SIGPIPE when grep stops
# early would make a match look like a miss.)
console_has() { grep -Eq -- "$1" < <(tr -d '\r' <"$console"); }
declare -A host_done
hostcheck() { # NAME ARGS...: one hostcheck.py verdict
    local n="$1" line
    shift
    host_done[$n]=1
    line="$(python3 "$ci_dir/hostcheck.py" "$@" 2>&1 | tail -n 1)"
    case "$line" in
        "PASS "*) result PASS "$name/$n" "${line#PASS }" ;;
        *) result FAIL "$name/$n" "${line#FAIL }" ;;
    esac
}
ctlcheck() { # NAME CHECK ARGS...: a hostcheck.py verdict through the control socket
    local n="$1" c="$2"
    shift 2
    hostcheck "$n" "$c" --bin "$VDI_DAEMON_BIN" --ctl "$ctl_sock" "$@"
}
# The daemon, stopped (SIGSTOP) by a "stall" step, runs again.
resume() {
    [[ -n "$resume_pid" ]] || return 0
    wait "$resume_pid" 2>/dev/null || true
    resume_pid=""
    kill -CONT "$dpid" 2>/dev/null || true
}

# step NAME KEY=VALUE...: the host's side of one VDI-WAIT step of the guest.
declare -A kv
step() {
    local st="$1" f
    shift
    kv=()
    for f in "$@"; do [[ $f == *=* ]] && kv[${f%%=*}]="${f#*=}"; done
    # Any step after a stall finds the daemon running again (a check must
    # not ask a stopped daemon).
    [[ $st == resume ]] || resume
    case "$st" in
        pasids)
            ctlcheck pasids-host pasids --console "$console"
            held=yes
            ;;
        bound)
            ctlcheck sva-bound sva-bound --pasid "${kv[pasid]}" --domain "${kv[domain]}" \
                --eps "${kv[ep]},${kv[ep2]}" --addr-width "${kv[addr_width]}" --events "$dir/events.jsonl"
            ;;
        fill-start)
            python3 "$ci_dir/hostcheck.py" stats-save --bin "$VDI_DAEMON_BIN" --ctl "$ctl_sock" \
                --out "$dir/stats-fill.json" >/dev/null
            ;;
        fill-done)
            ctlcheck fill-counts pr-counts --before "$dir/stats-fill.json" --guest "$*" \
                --exact-groups $((fill_mib * 256))
            ;;
        totals)
            ctlcheck totals-counts pr-counts --guest "$*"
            ;;
        munmap)
            hostcheck invalidate-munmap invalidated --events "$dir/events.jsonl" \
                --pasid "${kv[pasid]}" --addr "${kv[addr]}" --len "${kv[len]}"
            ;;
        child-gone)
            ctlcheck child-gone child-gone --pasid "${kv[pasid]}" --parent "${kv[parent]}" \
                --endpoint "$ep_id" --events "$dir/events.jsonl" --log "$daemon_log"
            ;;
        unbound)
            ctlcheck unbind-order unbound --pasid "${kv[pasid]}" --eps "${kv[ep2]},${kv[ep]}" \
                --events "$dir/events.jsonl" --log "$daemon_log"
            ;;
        stall)
            # Stop the daemon for ms: the guest's requests must give up on
            # their own, bounded (resumed at the next step or after ms).
            kill -STOP "$dpid"
            sleep "$(awk -v ms="${kv[ms]}" 'BEGIN { printf "%.3f", ms / 1000 }')" &
            resume_pid=$!
            ;;
        resume) resume ;;
        returned)
            ctlcheck pasids-returned pasids --none
            ;;
        end)
            python3 "$ci_dir/hostcheck.py" health --bin "$VDI_DAEMON_BIN" --ctl "$ctl_sock" \
                --pid "$dpid" --log "$daemon_log" | tail -n 1 >"$dir/health"
            ended=yes
            ;;
        *) result FAIL "$name/host-step" "unknown step '$st' from the guest" ;;
    esac
    go
}

# follow: answer the guest's VDI-WAIT steps until it is done, QEMU is gone
# or the deadline passed.
follow() {
    local seen=0 n line
    while [[ $alive == yes ]]; do
        [[ -e $console ]] || { sleep 0.05; continue; }
        mapfile -t waits < <(tr -d '\r' <"$console" | grep -E '^VDI-WAIT ')
        n=${#waits[@]}
        while ((seen < n)); do
            line="${waits[seen]}"
            seen=$((seen + 1))
            # shellcheck disable=SC2086  # the step's words
            step ${line#VDI-WAIT }
        done
        console_has '^VDI-DONE' && break
        if ! kill -0 "$VDI_QEMU_PID" 2>/dev/null || (($(date +%s) >= deadline)); then
            alive=no
            break
        fi
        sleep 0.05
    done
    resume
}

boot() { # KERNEL_INDEX KO_DIR
    local i="$1" ko_dir="$2" label="${VDI_KERNEL_LABELS[$i]}"
    local failed_before=$failed
    name="$label"
    dir="$logdir/$label"
    console="$dir/console.log"
    ctl_sock="$dir/ctl.sock"
    daemon_log="$dir/daemon.log"
    mkdir -p "$dir"
    local sock="$dir/vhost.sock" dsock="$dir/dmadev.sock" devargs=()

    vdi_build_initramfs "$i" "$dir/initrd.gz" --modules "$ko_dir/viommu_sva.ko" \
        "$ci_dir/guest/sva-test.sh:etc/vdi/test"
    if ! vdi_daemon_start "$daemon_log" "$sock" "$ctl_sock" --endpoints "$ep_id,$ep2_id"; then
        result FAIL "$name/daemon-start" "see $daemon_log"
        return 0
    fi
    dpid="$VDI_DAEMON_PID"
    local t0="$EPOCHREALTIME"
    python3 "$ci_dir/hostcheck.py" watch --ctl "$ctl_sock" --out "$dir/events.jsonl" \
        >"$dir/watch.log" 2>&1 &
    watch_pid=$!
    if [[ -n "${VDI_SVA_DMADEV_CMD:-}" ]]; then
        local cmd="${VDI_SVA_DMADEV_CMD//\{sock\}/$dsock}"
        cmd="${cmd//\{ctl\}/$ctl_sock}"
        bash -c "$cmd" >"$dir/dmadev.log" 2>&1 &
        dmadev_pid=$!
        for ((k = 0; k < 100; k++)); do [[ -S "$dsock" ]] && break; sleep 0.05; done
    elif vdi_dma_device_start "$dir/dmadev.log" "$dsock" --control-socket "$ctl_sock" \
        --endpoint "00:$dmadev_bdf"; then
        dmadev_pid="$VDI_DMA_DEVICE_PID"
    else
        result FAIL "$name/dmadev-start" "see $dir/dmadev.log"
    fi
    devargs=(-device "$(vdi_dma_device_arg "$dsock" "$dmadev_bdf")")

    echo "--- $name: ${VDI_KERNEL_RELEASES[$i]} (timeout ${timeout_s}s)"
    deadline=$(($(date +%s) + timeout_s))
    alive=yes
    held=no
    ended=no
    host_done=()
    # shellcheck disable=SC2054  # commas inside -device/-machine arguments are intended
    vdi_qemu_start "$timeout_s" "$console" "$dir" \
        -machine "q35,accel=$VDI_ACCEL,memory-backend=mem0" -cpu "$VDI_CPU" -smp 2 -m 1G \
        -object memory-backend-memfd,id=mem0,size=1G,share=on \
        -nodefaults -nographic -no-reboot -serial stdio \
        -kernel "${VDI_KERNEL_IMAGES[$i]}" -initrd "$dir/initrd.gz" \
        -append "$VDI_KERNEL_CMDLINE vdi.ep=$ep_id vdi.ep2=$ep2_id vdi.fillmib=$fill_mib vdi.bench=$bench vdi.benchrounds=$bench_rounds" \
        -chardev "socket,id=viommu0,path=$sock" \
        -device vhost-user-test-device-pci,chardev=viommu0,virtio-id=23,num_vqs=2,config_size=40,addr=03.0 \
        "${devargs[@]}"

    follow
    [[ $held == yes ]] || result FAIL "$name/pasids-host" "the guest never held its PASIDs (see $console)"
    [[ -n "${host_done[pasids-returned]:-}" ]] ||
        result FAIL "$name/pasids-returned" "the guest never asked for it (see $console)"
    [[ $ended == yes ]] || result FAIL "$name/end" "the guest did not reach the end (see $console)"

    local rc=0 secs
    [[ $alive == yes ]] || vdi_qemu_kill
    vdi_qemu_wait || rc=$?
    secs="$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')"
    if [[ $rc -eq 0 ]] && console_has '^VDI-DONE'; then
        result PASS "$name/boot" "${secs}s, guest test done, powered off cleanly"
    else
        result FAIL "$name/boot" "QEMU status $rc after ${secs}s, guest test did not finish"
    fi

    local line status check detail c
    while read -r line; do
        read -r _ status check detail <<<"$line"
        result "$status" "$name/$check" "$detail"
    done < <(tr -d '\r' <"$console" | grep -E '^VDI-RESULT (PASS|FAIL|SKIP) ')
    tr -d '\r' <"$console" | grep '^VDI-BENCH ' | sed "s/^/     $name: /" || true
    for c in sva-probe sva-features sva-probe-ep pasid-alloc pasid-range pasid-errno pasid-free \
        pasid-close dma-device bind sva-bind sva-fill sva-copy sva-checksum sva-resident \
        sva-readonly sva-munmap sva-cow sva-mprotect sva-dontneed sva-thp-munmap sva-child-exit \
        sva-healthy sva-unbind kernel-healthy sva-timeout \
        sva-broken kernel-healthy-stalled module-unload; do
        console_has "^VDI-RESULT (PASS|FAIL|SKIP) $c( |\$)" ||
            result FAIL "$name/$c" "not reported (see $console)"
    done
    # The host's checks at the guest's steps (a skipped SVA run has none).
    if console_has '^VDI-RESULT PASS sva-bind '; then
        for c in sva-bound fill-counts invalidate-munmap child-gone totals-counts unbind-order; do
            [[ -n "${host_done[$c]:-}" ]] || result FAIL "$name/$c" "the guest never asked for it (see $console)"
        done
    fi

    if [[ -s "$dir/health" ]]; then
        read -r status detail <"$dir/health"
        [[ $status == PASS ]] || status=FAIL
        result "$status" "$name/daemon-health" "$detail"
    else
        result FAIL "$name/daemon-health" "not checked"
    fi
    local drc=0
    if [[ -n "$dmadev_pid" ]]; then
        # It exits by itself once QEMU is gone.
        if [[ -z "${VDI_SVA_DMADEV_CMD:-}" ]]; then
            vdi_dma_device_stop || drc=$?
        else
            kill "$dmadev_pid" 2>/dev/null || true
            wait "$dmadev_pid" 2>/dev/null || drc=$?
        fi
        dmadev_pid=""
        if [[ -z "${VDI_SVA_DMADEV_CMD:-}" ]]; then
            if [[ $drc -eq 0 ]] && ! grep -q ' ERROR ' "$dir/dmadev.log"; then
                result PASS "$name/dmadev-exit" "exit status 0 after QEMU left, no ERROR line"
            else
                result FAIL "$name/dmadev-exit" "exit status $drc; $(grep -m1 ' ERROR ' "$dir/dmadev.log")"
            fi
        fi
    fi
    drc=0
    vdi_daemon_stop || drc=$?
    if [[ $drc -eq 0 ]]; then
        result PASS "$name/daemon-exit" "pid $dpid, exit status 0"
    else
        result FAIL "$name/daemon-exit" "exit status $drc"
    fi
    dpid=""
    hostcheck store-clean store-clean --bin "$VDI_DAEMON_BIN" --state-dir "$dir/pasid-state"
    if [[ -n "$watch_pid" ]]; then
        kill "$watch_pid" 2>/dev/null || true
        wait "$watch_pid" 2>/dev/null || true
        watch_pid=""
    fi
    if [[ $failed -gt $failed_before ]]; then
        echo "     $name: last console lines ($console):"
        tr -d '\r' <"$console" | grep -v '^$' | tail -n 25 | sed 's/^/       /'
        echo "     $name: last daemon log lines ($daemon_log):"
        tail -n 10 "$daemon_log" | sed 's/^/       /'
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
done

if [[ $failed -gt 0 || "${VDI_GUEST_KEEP_LOGS:-0}" == 1 ]]; then
    echo "sva-tests: logs kept in $logdir"
else
    rm -rf "$logdir"
fi
echo "$passed passed, $failed failed, $skipped skipped"
[[ $failed -eq 0 ]]
