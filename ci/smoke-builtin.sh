#!/usr/bin/env bash
# ci/smoke-builtin.sh: smoke test of the guest-kernel provisioning, WITHOUT
# the project's daemon.
# Owns: booting every guest kernel from ci/provision.sh under QEMU 11 with
# QEMU's BUILT-IN virtio-iommu-pci (00:03.0; QEMU builds the ACPI VIOT itself)
# and the edu device as endpoint (00:04.0), judging the guest checks of
# ci/guest/smoke-test.sh, and cross-checking on the host that the IOVA->GPA
# mappings the guest reports reached the device (QEMU virtio_iommu_* trace).
# Prints one PASS/FAIL line per check, a summary per kernel and finally
# "N passed, M failed"; exits non-zero if anything failed.
#
# Usage: bash ci/smoke-builtin.sh
# Env:   VDI_SMOKE_TIMEOUT  hard timeout per boot in seconds (default 300)
#        VDI_SMOKE_LOGDIR   where console logs and traces go (default: a new
#                           directory under ${TMPDIR:-/tmp})
#        VDI_SMOKE_VERBOSE=1  stream the guest consoles
#        VDI_BENCH          MAP+UNMAP pairs of the guest benchmark (default 2000)
#        plus the knobs of ci/provision.sh (VDI_ACCEL, VDI_KERNEL_SPECS, ...)

set -euo pipefail

ci_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=provision.sh
source "$ci_dir/provision.sh"

timeout_s="${VDI_SMOKE_TIMEOUT:-300}"
bench="${VDI_BENCH:-2000}"
logdir="${VDI_SMOKE_LOGDIR:-$(mktemp -d "${TMPDIR:-/tmp}/vdi-smoke.XXXXXX")}"
mkdir -p "$logdir"
endpoint_bdf="0000:00:04.0"
endpoint_rid=$((4 << 3)) # bus 0, device 4, function 0 = QEMU's endpoint ID
guest_checks=(driver-probe vfio-map vfio-map-multipage endpoint-attach bench no-faults)

passed=0
failed=0
result() { # STATUS NAME DETAIL
    printf '%-4s %-28s %s\n' "$1" "$2" "$3"
    if [[ "$1" == PASS ]]; then passed=$((passed + 1)); else failed=$((failed + 1)); fi
}

# Every guest MAP/PAGE (iova, gpa) must lie in a virtio_iommu_map traced by
# QEMU with the same translation, and every guest UNMAP in a traced unmap.
# Prints "ok MAPS UNMAPS" or "bad <first mismatch>".
check_trace() { # CONSOLE TRACE
    awk '
        function hex(s,    i, c, v) {
            sub(/^0x/, "", s); v = 0
            for (i = 1; i <= length(s); i++) {
                c = index("0123456789abcdef", tolower(substr(s, i, 1))) - 1
                if (c < 0) break
                v = v * 16 + c
            }
            return v
        }
        function field(name,    i) {
            for (i = 1; i <= NF; i++) if (index($i, name "=") == 1) return substr($i, length(name) + 2)
            return ""
        }
        FNR == NR {
            if ($1 == "virtio_iommu_map") {
                n++; ms[n] = hex(field("virt_start")); me[n] = hex(field("virt_end")); mp[n] = hex(field("phys_start"))
            } else if ($1 == "virtio_iommu_unmap") {
                u++; us[u] = hex(field("virt_start")); ue[u] = hex(field("virt_end"))
            }
            next
        }
        $1 == "vfio-map:" && ($2 == "MAP" || $2 == "PAGE") {
            iova = hex(field("iova")); gpa = hex(field("gpa")); ok = 0
            for (i = 1; i <= n && !ok; i++) if (ms[i] <= iova && iova <= me[i] && mp[i] + iova - ms[i] == gpa) ok = 1
            if (!ok && !bad) bad = sprintf("no device MAP for iova=%s gpa=%s", field("iova"), field("gpa"))
            maps++
        }
        $1 == "vfio-map:" && $2 == "UNMAP" {
            iova = hex(field("iova")); ok = 0
            for (i = 1; i <= u && !ok; i++) if (us[i] <= iova && iova <= ue[i]) ok = 1
            if (!ok && !bad) bad = sprintf("no device UNMAP for iova=%s", field("iova"))
            unmaps++
        }
        END {
            if (bad) print "bad " bad
            else if (!maps) print "bad the guest reported no mapping"
            else print "ok " maps " " unmaps
        }' "$2" "$1"
}

echo "smoke-builtin: QEMU $VDI_QEMU_VERSION ($VDI_ACCEL), kernels: ${VDI_KERNEL_RELEASES[*]}; logs in $logdir"
summaries=()
for i in "${!VDI_KERNEL_RELEASES[@]}"; do
    rel="${VDI_KERNEL_RELEASES[$i]}"
    label="${VDI_KERNEL_LABELS[$i]}"
    initrd="$logdir/smoke-$rel.cpio.gz"
    console="$logdir/smoke-$rel.console"
    trace="$logdir/smoke-$rel.trace"
    failed_before=$failed
    vdi_build_initramfs "$i" "$initrd" "$ci_dir/guest/smoke-test.sh:etc/vdi/test"

    echo "--- $label: booting $rel (timeout ${timeout_s}s)"
    t0="$EPOCHREALTIME"
    rc=0
    # shellcheck disable=SC2054  # commas inside -device arguments are intended
    qemu_args=(
        "${VDI_ACCEL_ARGS[@]}" -m 512M -smp 2
        -nodefaults -nographic -serial stdio -no-reboot
        -kernel "${VDI_KERNEL_IMAGES[$i]}" -initrd "$initrd"
        -append "$VDI_KERNEL_CMDLINE vdi.dev=$endpoint_bdf vdi.bench=$bench"
        -device virtio-iommu-pci,addr=03.0
        -device edu,addr=04.0
        -trace enable=virtio_iommu_attach -trace enable=virtio_iommu_map
        -trace enable=virtio_iommu_unmap -D "$trace"
    )
    if [[ "${VDI_SMOKE_VERBOSE:-0}" == 1 ]]; then
        vdi_run_qemu "$timeout_s" "$console.raw" "${qemu_args[@]}" || rc=$?
    else
        vdi_run_qemu "$timeout_s" "$console.raw" "${qemu_args[@]}" >/dev/null || rc=$?
    fi
    secs="$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')"
    tr -d '\r' <"$console.raw" >"$console"
    rm -f "$console.raw"

    if [[ $rc -eq 0 ]] && grep -q '^VDI-DONE' "$console"; then
        result PASS "$label/boot" "$rel, ${secs}s, powered off cleanly"
    else
        why="QEMU exit status $rc"
        [[ $rc -eq 124 ]] && why="timed out after ${timeout_s}s"
        grep -q '^VDI-DONE' "$console" || why="$why, guest test did not finish"
        result FAIL "$label/boot" "$why"
    fi

    for check in "${guest_checks[@]}"; do
        line="$(grep -m1 -E "^VDI-RESULT (PASS|FAIL) $check( |\$)" "$console" || true)"
        if [[ -z "$line" ]]; then
            result FAIL "$label/$check" "not reported by the guest"
        else
            read -r _ status _ detail <<<"$line"
            result "$status" "$label/$check" "$detail"
        fi
    done

    if grep -Eq "^virtio_iommu_attach domain=[0-9]+ endpoint=$endpoint_rid\$" "$trace" 2>/dev/null; then
        result PASS "$label/host-trace-attach" "QEMU saw ATTACH of endpoint $endpoint_rid ($endpoint_bdf)"
    else
        result FAIL "$label/host-trace-attach" "no virtio_iommu_attach for endpoint $endpoint_rid in $trace"
    fi
    read -r verdict rest <<<"$(check_trace "$console" "$trace" 2>/dev/null || echo "bad trace unreadable")"
    if [[ "$verdict" == ok ]]; then
        read -r nmaps nunmaps <<<"$rest"
        result PASS "$label/host-trace-maps" "$nmaps guest MAP/PAGE and $nunmaps UNMAP lines match QEMU's trace"
    else
        result FAIL "$label/host-trace-maps" "$rest"
    fi

    probed=no attached=no
    grep -q '^VDI-RESULT PASS driver-probe' "$console" && probed=yes
    grep -q '^VDI-RESULT PASS endpoint-attach' "$console" && attached=yes
    rate="$(awk '$1 == "vfio-map:" && $2 == "BENCH" { sub(/.*pairs\/s=/, "", $0); print; exit }' "$console")"
    summaries+=("$label ($rel): boot ${secs}s, driver probed: $probed, endpoint attached: $attached, MAP lines: $(grep -c '^vfio-map: MAP ' "$console" || true), bench: ${rate:-n/a} pairs/s")
    if [[ $failed -gt $failed_before ]]; then
        echo "--- $label: last console lines ($console):"
        tail -n 40 "$console" | sed 's/^/    /'
    fi
done

echo "--- summary"
printf '%s\n' "${summaries[@]}"
echo "$passed passed, $failed failed"
[[ $failed -eq 0 ]]
