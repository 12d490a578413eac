#!/usr/bin/env bash
# ci/guest-tests.sh: end-to-end tests of the vhost-device-iommu daemon
# against the real Linux virtio-iommu driver.
# Owns: for each guest kernel of ci/provision.sh, six boots under QEMU 11,
# the first four with their own daemon (RUST_LOG=debug, --control-socket)
# attached through vhost-user-test-device-pci at 00:03.0 and a VIOT written
# by `vhost-device-iommu viot`:
#   translated  iommu.passthrough=0: driver probe, PROBE (MSI window), attach,
#               VFIO mappings compared with the daemon's domain, translation,
#               UNMAP, a fault injected through the control plane reaching
#               the guest's dmesg, a short MAP/UNMAP benchmark, hot-unplug
#               producing a DETACH;
#   identity-bypass     iommu.passthrough=1 with BYPASS_CONFIG: bypass domain;
#   identity-nobypass   iommu.passthrough=1, --bypass-config off: identity maps
#                       covering the aperture except the MSI window;
#               both with dma-test-device at 00:05.0 doing DMA at guest-physical
#               addresses (dma-identity: straight through);
#   dma         dma-test-device (vfio-user-pci at 00:05.0, endpoint 0x28) whose
#               DMA the daemon translates, driven by ci/guest/dma-test.sh:
#               DMA lands where the guest mapped (guest bytes; host `ctl
#               translate`), faults after UNMAP and on read-only mappings with
#               memory untouched and the fault events in the guest's dmesg
#               (host: every fault delivered), a partial FILL, the
#               map/DMA/unmap/DMA-faults loop with the device's cache on;
#   dma-builtin the same device and guest checks behind QEMU's built-in
#               virtio-iommu-pci (no daemon; the device uses QEMU's DMA_MAP
#               messages), the baseline; except fault-events: QEMU's
#               virtio-iommu offers a device process no way to report a
#               fault, so the guest sees none;
#   nested      no daemon on the host: the guest's own IOMMU is QEMU's
#               built-in virtio-iommu-pci and edu (00:04.0) is bound to
#               vfio-pci; inside, the daemon and nested-vmm (a vhost-user
#               frontend playing a nested guest's driver, with
#               viommu-client's shadow layer on edu's VFIO container, and
#               on an iommufd IOAS where the kernel has /dev/iommu, else
#               SKIP) check that the host IOMMU's holes reach the nested
#               PROBE, and program edu's DMA engine at nested IOVAs: bytes,
#               the DMA failing after UNMAP (and its fault in the guest's
#               dmesg), bypass after DETACH, a MAP/UNMAP latency benchmark
#               (ci/guest/nested-test.sh);
# and, every boot, the daemon's health (no ERROR line, same PID, clean exit)
# and the DMA device's (exit status 0 once QEMU is gone, no WARN/ERROR).
# The host judges the daemon's state through `vhost-device-iommu ctl`
# (ci/hostcheck.py); the guest side is ci/guest/daemon-test.sh, driven in
# lock step over the guest's second serial port.
#
# Topology: the main endpoint is edu at 00:04.0 (endpoint ID = RID 0x20 =
# 32).  q35's root bus (pcie.0) does not support hot-unplug, so the
# translated boot has a second edu behind a pcie-root-port at 00:05.0; it
# is 01:00.0, endpoint ID 0x100 = 256, and is the one unplugged.
#
# Prints one PASS/FAIL line per check and, last, "N passed, M failed"; exits
# non-zero if anything failed.  Logs stay in the log directory (printed)
# when something failed.
#
# Usage: bash ci/guest-tests.sh
# Env:   VDI_GUEST_TIMEOUT  hard timeout per boot in seconds (default 180)
#        VDI_GUEST_LOGDIR   log directory (default: new dir under ${TMPDIR:-/tmp})
#        VDI_GUEST_KEEP_LOGS=1  keep the logs even if everything passed
#        VDI_GUEST_KERNELS  kernel indexes to test (default: all provisioned)
#        VDI_BENCH          MAP+UNMAP pairs of the short guest benchmark (1000)
#        VDI_DMA_LOOPS      map/DMA/unmap/DMA cycles of the stale-cache check (50)
#        VDI_GUEST_MODES    boots to run per kernel (default: all six, in order)
#        VDI_NESTED_BENCH   MAP+UNMAP pairs of the nested benchmark (200)
#        plus the knobs of ci/provision.sh (VDI_ACCEL, VDI_CACHE, ...)

set -euo pipefail

ci_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=provision.sh
source "$ci_dir/provision.sh"
# shellcheck source=daemon-lib.sh
source "$ci_dir/daemon-lib.sh"

timeout_s="${VDI_GUEST_TIMEOUT:-180}"
bench="${VDI_BENCH:-1000}"
logdir="${VDI_GUEST_LOGDIR:-$(mktemp -d "${TMPDIR:-/tmp}/vdi-guest.XXXXXX")}"
mkdir -p "$logdir"
kernels="${VDI_GUEST_KERNELS:-${!VDI_KERNEL_RELEASES[*]}}"

ep_bdf=00:04.0
ep_id=32
hp_bdf=01:00.0
hp_id=256
fault_addr=0xdead0000
dma_bdf=00:05.0
dma_id=40
dma_loops="${VDI_DMA_LOOPS:-50}"
# The faults vfio-dma provokes before its stale-cache loop (dma-test.sh).
dma_faults=5
modes="${VDI_GUEST_MODES:-translated identity-bypass identity-nobypass dma dma-builtin nested}"
nested_bench="${VDI_NESTED_BENCH:-200}"

passed=0
failed=0
skipped=0
reported=()
result() { # PASS|FAIL|SKIP NAME DETAIL
    printf '%-4s %-40s %s\n' "$1" "$2" "$3"
    reported+=("$2")
    case "$1" in
        PASS) passed=$((passed + 1)) ;;
        SKIP) skipped=$((skipped + 1)) ;;
        *) failed=$((failed + 1)) ;;
    esac
}

cleanup() {
    vdi_qemu_kill
    vdi_dma_device_stop >/dev/null 2>&1 || true
    vdi_daemon_stop >/dev/null 2>&1 || true
}
trap cleanup EXIT

vdi_daemon_build
[[ " $modes " == *" nested "* ]] && vdi_nested_build
has_ctl=yes
vdi_daemon_has_ctl || has_ctl=no

echo "guest-tests: QEMU $VDI_QEMU_VERSION ($VDI_ACCEL), kernels: ${VDI_KERNEL_RELEASES[*]}, daemon $VDI_DAEMON_BIN (control plane: $has_ctl); logs in $logdir"

# --- per-boot state and helpers --------------------------------------------
name=""      # check name prefix, e.g. 6.12/translated
dir=""       # this boot's log directory
console=""
ctl_sock=""
alive=no     # the guest is still following the script
stuck=""     # why not, if it is not
answered=0   # VDI-WAIT steps the host has answered
deadline=0

# check NAME HOSTCHECK_SUBCOMMAND [ARGS...]: a host-side check through ctl.
check() {
    local n="$1" sub="$2" line
    shift 2
    if [[ $has_ctl != yes ]]; then
        result FAIL "$name/$n" "the daemon has no control plane (--control-socket): cannot check"
        return 0
    fi
    line="$(python3 "$ci_dir/hostcheck.py" "$sub" --bin "$VDI_DAEMON_BIN" --ctl "$ctl_sock" "$@" 2>&1 | tail -n 1)"
    verdict "$n" "$line"
}

# verdict NAME LINE: records a hostcheck.py line ("PASS ..." / "FAIL ...").
verdict() {
    case "$2" in
        "PASS "*) result PASS "$name/$1" "${2#PASS }" ;;
        "FAIL "*) result FAIL "$name/$1" "${2#FAIL }" ;;
        *) result FAIL "$name/$1" "hostcheck.py: ${2:-no output}" ;;
    esac
}

# local_check NAME HOSTCHECK_SUBCOMMAND [ARGS...]: a check without ctl.
local_check() {
    local n="$1" line
    shift
    line="$(python3 "$ci_dir/hostcheck.py" "$@" 2>&1 | tail -n 1)"
    verdict "$n" "$line"
}

ctl_json() { "$VDI_DAEMON_BIN" ctl --control-socket "$ctl_sock" "$@" --json; }

# reach ERE [COUNT]: wait until the guest printed ERE (COUNT times).  Fails
# at once if the guest is blocked in another step's VDI-WAIT (it skipped
# this step: its checks are then reported as not reached, later steps still
# run), and for good (alive=no) if QEMU ended or the boot's time ran out.
reach() {
    local ere="$1" count="${2:-1}" text pending
    [[ $alive == yes ]] || return 1
    while :; do
        text="$(tr -d '\r' <"$console")"
        (($(grep -Ec -- "$ere" <<<"$text" || true) >= count)) && return 0
        pending="$(awk -v a="$answered" '/^VDI-WAIT / { w = $2; n++ } END { if (n > a) print w }' <<<"$text")"
        if [[ -n "$pending" && ! "VDI-WAIT $pending" =~ $ere ]]; then
            echo "     ($name: the guest skipped '$ere', it waits at '$pending')"
            return 1
        fi
        if ! kill -0 "$VDI_QEMU_PID" 2>/dev/null; then
            alive=no
            stuck="QEMU ended before the guest reached '$ere'"
            return 1
        fi
        if (($(date +%s) >= deadline)); then
            alive=no
            stuck="the guest did not reach '$ere' within ${timeout_s}s"
            return 1
        fi
        sleep 0.05
    done
}

# release: end a vfio-map hold; go: answer the guest's current VDI-WAIT.
release() { vdi_send_guest go || { alive=no; stuck="cannot write to the guest's ttyS1"; }; }
go() {
    answered=$((answered + 1))
    release
}

# boot KERNEL_INDEX MODE: MODE = translated | identity-bypass | identity-nobypass
#                              | dma | dma-builtin
boot() {
    local i="$1" mode="$2"
    local rel="${VDI_KERNEL_RELEASES[$i]}" label="${VDI_KERNEL_LABELS[$i]}"
    name="$label/$mode"
    dir="$logdir/$label-$mode"
    console="$dir/console.log"
    ctl_sock="$dir/ctl.sock"
    mkdir -p "$dir"
    local sock="$dir/vhost.sock" daemon_log="$dir/daemon.log"
    local failed_before=$failed expected=() daemon_args=() viot_eps cmdline guest_checks
    local daemon=yes dma="" initrd="$logdir/initrd-$i.gz"
    reported=()
    cmdline="$VDI_KERNEL_CMDLINE vdi.dev=0000:$ep_bdf vdi.bench=$bench"
    local topo=(-device "edu,addr=${ep_bdf#00:},id=ep0")
    case "$mode" in
        translated)
            viot_eps="$ep_bdf,$hp_bdf"
            daemon_args=(--endpoints "$ep_id,$hp_id")
            cmdline+=" vdi.mode=translated vdi.hpdev=0000:$hp_bdf"
            # shellcheck disable=SC2054  # commas inside -device arguments are intended
            topo+=(-device pcie-root-port,id=rp0,addr=05.0,chassis=1 -device edu,bus=rp0,addr=00.0,id=ep1)
            guest_checks=(driver-probe msi-window vfio-map no-errors bench unplug-seen)
            expected=(attach endpoint-probe mappings translate unmap fault-inject fault-seen
                bench-requests hot-unplug detach)
            ;;
        identity-*)
            viot_eps="$ep_bdf,$dma_bdf"
            daemon_args=(--endpoints "$ep_id,$dma_id")
            cmdline="${cmdline/iommu.passthrough=0/iommu.passthrough=1} vdi.mode=identity"
            cmdline+=" vdi.dmadev=0000:$dma_bdf"
            dma=daemon
            guest_checks=(driver-probe identity-domain msi-window dma-identity)
            expected=(attach endpoint-probe)
            if [[ $mode == identity-bypass ]]; then
                expected+=(bypass-domain)
            else
                daemon_args+=(--bypass-config off)
                expected+=(identity-maps)
            fi
            ;;
        dma | dma-builtin)
            initrd="$logdir/initrd-dma-$i.gz"
            topo=()
            cmdline="$VDI_KERNEL_CMDLINE vdi.dmadev=0000:$dma_bdf vdi.ep=$dma_id vdi.loops=$dma_loops"
            guest_checks=(driver-probe dma-regs dma-fill dma-copy dma-checksum dma-readonly
                dma-unmapped dma-partial dma-stale)
            if [[ $mode == dma ]]; then
                viot_eps="$dma_bdf"
                daemon_args=(--endpoints "$dma_id")
                cmdline+=" vdi.faults=1 vdi.hold=1"
                dma=daemon
                guest_checks+=(fault-events)
                expected=(attach dma-translate dma-faults)
            else
                daemon=no
                dma=direct
            fi
            ;;
        nested)
            initrd="$logdir/initrd-nested-$i.gz"
            daemon=no
            cmdline="$VDI_KERNEL_CMDLINE vdi.dev=0000:$ep_bdf vdi.bench=$nested_bench"
            guest_checks=(driver-probe)
            local b c
            for b in vfio iommufd; do
                for c in nested-constraints nested-dma nested-unmap nested-bypass nested-fault nested-daemon nested-bench; do
                    guest_checks+=("$c-$b")
                done
            done
            expected=()
            ;;
    esac
    expected=(boot "${guest_checks[@]}" "${expected[@]}")
    [[ $daemon == yes ]] && expected+=(daemon-health daemon-exit)
    [[ -n $dma ]] && expected+=(dma-device-exit)

    echo "--- $name: $rel (timeout ${timeout_s}s)"
    local iommu=(-device virtio-iommu-pci,addr=03.0) dpid=""
    if [[ $daemon == yes ]]; then
        if ! vdi_viot "$dir/viot.bin" 00:03.0 "$viot_eps" 2>"$dir/viot.err"; then
            result FAIL "$name/viot" "vhost-device-iommu viot: $(cat "$dir/viot.err")"
            return 0
        fi
        local ctl_arg=""
        [[ $has_ctl == yes ]] && ctl_arg="$ctl_sock"
        if ! vdi_daemon_start "$daemon_log" "$sock" "$ctl_arg" "${daemon_args[@]}"; then
            result FAIL "$name/daemon-start" "see $daemon_log"
            vdi_daemon_stop >/dev/null 2>&1 || true
            return 0
        fi
        dpid="$VDI_DAEMON_PID"
        # shellcheck disable=SC2054  # commas inside -device arguments are intended
        iommu=(-chardev "socket,id=viommu0,path=$sock"
            -device vhost-user-test-device-pci,chardev=viommu0,virtio-id=23,num_vqs=2,config_size=40,addr=03.0
            -acpitable "file=$dir/viot.bin")
    fi
    local dma_log="$dir/dma-device.log"
    if [[ -n $dma ]]; then
        local dma_args=()
        [[ $dma == daemon ]] && dma_args=(--control-socket "$ctl_sock" --endpoint "$dma_id")
        if ! vdi_dma_device_start "$dma_log" "$dir/dma.sock" "${dma_args[@]}"; then
            result FAIL "$name/dma-device-start" "see $dma_log"
            vdi_dma_device_stop >/dev/null 2>&1 || true
            vdi_daemon_stop >/dev/null 2>&1 || true
            return 0
        fi
        topo+=(-device "$(vdi_dma_device_arg "$dir/dma.sock" "${dma_bdf#00:}")")
    fi
    local t0="$EPOCHREALTIME"
    : >"$console" # reach may look before QEMU's redirection creates it
    deadline=$(($(date +%s) + timeout_s))
    alive=yes
    stuck=""
    answered=0
    # shellcheck disable=SC2054  # commas inside -device/-machine arguments are intended
    vdi_qemu_start "$timeout_s" "$console" "$dir" \
        -machine "q35,accel=$VDI_ACCEL,memory-backend=mem0" -cpu "$VDI_CPU" -smp 2 -m 512M \
        -object memory-backend-memfd,id=mem0,size=512M,share=on \
        -nodefaults -nographic -no-reboot -serial stdio \
        -kernel "${VDI_KERNEL_IMAGES[$i]}" -initrd "$initrd" -append "$cmdline" \
        "${iommu[@]}" "${topo[@]}" \
        -qmp "unix:$dir/qmp.sock,server=on,wait=off"

    if [[ $mode == translated ]]; then
        if reach '^vfio-map: HOLD '; then
            ctl_json stats >"$dir/stats-hold.json" 2>&1 || true
            check attach attached --endpoint "$ep_id" --endpoint "$hp_id"
            check endpoint-probe probe --min 2
            check mappings mappings --console "$console" --endpoint "$ep_id" --save-domain "$dir/domain"
            check translate translate --console "$console" --endpoint "$ep_id"
            release
        fi
        if reach '^vfio-map: HOLD ' 2; then
            check unmap unmapped --console "$console" --endpoint "$ep_id" \
                --domain-file "$dir/domain" --stats-before "$dir/stats-hold.json"
            release
        fi
        if reach '^VDI-WAIT fault$'; then
            check fault-inject fault --endpoint "$ep_id" --address "$fault_addr"
            go
        fi
        if reach '^VDI-WAIT unplug$'; then
            local_check fault-seen fault-seen --console "$console" --endpoint "$ep_id" --address "$fault_addr"
            check bench-requests stat-delta --stats-before "$dir/stats-hold.json" --key map --min "$bench"
            ctl_json stats >"$dir/stats-unplug.json" 2>&1 || true
            local_check hot-unplug unplug --qmp "$dir/qmp.sock" --id ep1
            check detach unplugged --endpoint "$hp_id" --stats-before "$dir/stats-unplug.json"
            go
        fi
    elif [[ $mode == dma ]]; then
        if reach '^vfio-dma: HOLD '; then
            check attach attached --endpoint "$dma_id"
            check dma-translate dma-translate --console "$console" --endpoint "$dma_id"
            release
        fi
    elif [[ $mode == identity-* ]]; then
        if reach '^VDI-WAIT identity$'; then
            check attach attached --endpoint "$ep_id"
            check endpoint-probe probe --min 1
            if [[ $mode == identity-bypass ]]; then
                check bypass-domain bypass --endpoint "$ep_id"
            else
                check identity-maps identity --endpoint "$ep_id"
            fi
            go
        fi
    fi
    if [[ $daemon == yes ]] && reach '^VDI-WAIT end$'; then
        check daemon-health health --pid "$dpid" --log "$daemon_log"
        [[ $mode == dma ]] && check dma-faults dma-faults --expect $((dma_faults + dma_loops))
        go
    fi

    local rc=0
    [[ $alive == yes ]] || vdi_qemu_kill
    vdi_qemu_wait || rc=$?
    local secs
    secs="$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')"
    if [[ $rc -eq 0 ]] && grep -q '^VDI-DONE' <(tr -d '\r' <"$console"); then
        result PASS "$name/boot" "${secs}s, guest test done, powered off cleanly"
    else
        local why="QEMU exit status $rc"
        [[ $rc -eq 124 ]] && why="timed out after ${timeout_s}s"
        [[ -n "$stuck" ]] && why="$stuck; QEMU stopped (status $rc)"
        result FAIL "$name/boot" "$why, guest test did not finish"
    fi
    local line status detail c
    for c in "${guest_checks[@]}"; do
        line="$(tr -d '\r' <"$console" | grep -m1 -E "^VDI-RESULT (PASS|FAIL|SKIP) $c( |\$)" || true)"
        if [[ -n "$line" ]]; then
            read -r _ status _ detail <<<"$line"
            result "$status" "$name/$c" "$detail"
        fi
    done

    if [[ -n $dma ]]; then
        local xrc=0 bad
        vdi_dma_device_stop || xrc=$?
        bad="$(grep -m1 -E '^\[\S+ (WARN|ERROR) ' "$dma_log" || true)"
        if [[ $xrc -eq 0 && -z "$bad" ]]; then
            result PASS "$name/dma-device-exit" "exited with status 0 after QEMU disconnected, no WARN/ERROR line"
        else
            result FAIL "$name/dma-device-exit" "exit status $xrc${bad:+; $bad} (see $dma_log)"
        fi
    fi

    if [[ $daemon == yes ]]; then
        local drc=0 alive_before=no
        kill -0 "$dpid" 2>/dev/null && alive_before=yes
        vdi_daemon_stop || drc=$?
        if [[ $alive_before == yes && $drc -eq 0 ]]; then
            result PASS "$name/daemon-exit" "pid $dpid alive until SIGTERM, exit status 0"
        else
            result FAIL "$name/daemon-exit" "alive before SIGTERM: $alive_before, exit status $drc"
        fi
    fi

    for c in "${expected[@]}"; do
        [[ " ${reported[*]} " == *" $name/$c "* ]] || result FAIL "$name/$c" "not reached (see $console)"
    done
    if [[ $failed -gt $failed_before ]]; then
        echo "     $name: last console lines ($console):"
        tr -d '\r' <"$console" | grep -v '^$' | tail -n 25 | sed 's/^/       /'
        if [[ $daemon == yes ]]; then
            echo "     $name: last daemon log lines ($daemon_log):"
            tail -n 10 "$daemon_log" | sed 's/^/       /'
        fi
        if [[ -n $dma ]]; then
            echo "     $name: last DMA device log lines ($dma_log):"
            tail -n 10 "$dma_log" | sed 's/^/       /'
        fi
    fi
}

for i in $kernels; do
    vdi_build_initramfs "$i" "$logdir/initrd-$i.gz" "$ci_dir/guest/daemon-test.sh:etc/vdi/test"
    vdi_build_initramfs "$i" "$logdir/initrd-dma-$i.gz" "$ci_dir/guest/dma-test.sh:etc/vdi/test"
    if [[ " $modes " == *" nested "* ]]; then
        if [[ -z "${nested_specs+set}" ]]; then
            vdi_nested_files "$logdir/nested-files" >"$logdir/nested-files.txt"
            mapfile -t nested_specs <"$logdir/nested-files.txt"
        fi
        vdi_build_initramfs "$i" "$logdir/initrd-nested-$i.gz" \
            "$ci_dir/guest/nested-test.sh:etc/vdi/test" "${nested_specs[@]}"
    fi
    for mode in $modes; do
        boot "$i" "$mode"
    done
done

if [[ $failed -gt 0 || "${VDI_GUEST_KEEP_LOGS:-0}" == 1 ]]; then
    echo "guest-tests: logs kept in $logdir"
else
    rm -rf "$logdir"
fi
if ((skipped > 0)); then
    echo "$passed passed, $failed failed, $skipped skipped"
else
    echo "$passed passed, $failed failed"
fi
[[ $failed -eq 0 ]]
