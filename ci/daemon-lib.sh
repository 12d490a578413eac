#!/usr/bin/env bash
# ci/daemon-lib.sh: shared helpers of the guest runners that use the daemon
# (ci/guest-tests.sh, ci/sva-tests.sh, ci/bench-guest.sh).  Source it after ci/provision.sh.
#
# Owns: building the daemon and dma-test-device binaries (cargo build
# --release, into the repository's target directory, so CARGO_TARGET_DIR is
# respected), starting and stopping one daemon (and DMA device) per guest
# boot, writing the boot's VIOT with `vhost-device-iommu viot`, starting QEMU
# in the background with a hard timeout, and the host->guest line channel
# (the guest's second serial port, /dev/ttyS1, fed through a FIFO).
#
# Functions:
#   vdi_daemon_build                 sets VDI_DAEMON_BIN and VDI_DMA_DEVICE_BIN
#                                    (absolute paths); installs python3 if
#                                    missing (the runners need it)
#   vdi_nested_build                 builds nested-vmm (release); sets
#                                    VDI_NESTED_BIN
#   vdi_nested_files DIR             stages the daemon and nested-vmm,
#                                    stripped, with their shared libraries
#                                    (ldd) and loader into DIR; prints the
#                                    SRC:DST specs of vdi_build_initramfs
#                                    (binaries in /bin, libraries in
#                                    /usr/lib/nested, the loader in /lib64)
#   vdi_daemon_has_ctl               true if the binary has --control-socket
#   vdi_daemon_start LOG SOCK CTL [DAEMON_ARGS...]
#                                    daemon in the background (RUST_LOG=debug,
#                                    or $VDI_RUST_LOG),
#                                    waits for its socket(s); sets VDI_DAEMON_PID.
#                                    CTL "" = no control socket.  The daemon's
#                                    PASID state goes to SOCK's directory.
#   vdi_daemon_stop                  SIGTERM, wait; returns the daemon's status
#   vdi_viot OUT IOMMU_BDF ENDPOINTS writes a VIOT with the daemon binary
#   vdi_dma_device_start LOG SOCK [ARGS...]
#                                    dma-test-device in the background
#                                    (RUST_LOG=info), waits for its vfio-user
#                                    socket; sets VDI_DMA_DEVICE_PID
#   vdi_dma_device_stop              waits up to 10 s for it to exit (it does
#                                    when QEMU disconnects), else SIGTERM;
#                                    returns its status
#   vdi_dma_device_arg SOCK ADDR     prints QEMU's -device argument that
#                                    attaches it (vfio-user-pci, JSON form)
#   vdi_qemu_start TIMEOUT_S CONSOLE DIR QEMU_ARGS...
#                                    QEMU in the background under `timeout`,
#                                    stdout+stderr to CONSOLE; QEMU_ARGS give
#                                    the console (-serial stdio = ttyS0), this
#                                    adds ttyS1 fed from DIR/hostline.in;
#                                    sets VDI_QEMU_PID
#   vdi_qemu_wait                    waits for QEMU; returns its status (124 =
#                                    timed out)
#   vdi_qemu_kill                    ends QEMU (the timeout wrapper) if running
#   vdi_send_guest LINE              writes LINE to the guest's /dev/ttyS1
#   vdi_qemu_pin_vcpus CPUS QMP_SOCK pins QEMU's vCPU threads (found with QMP
#                                    query-cpus-fast) to CPUS (taskset -c)
# Knobs: VDI_DAEMON_CPUS / VDI_QEMU_CPUS: CPU lists (taskset -c) for the
# daemon and dma-test-device / QEMU (default: unpinned); VDI_RUST_LOG: the
# daemon's RUST_LOG.

VDI_LIB_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VDI_DAEMON_PID=""
VDI_DMA_DEVICE_PID=""
VDI_QEMU_PID=""
VDI_HOSTLINE_FD=""

vdi__need_python3() {   # the runners parse JSON with python3
    command -v python3 >/dev/null && return 0
    [[ $EUID -eq 0 ]] || { echo "daemon-lib: python3 is missing; run as root or install it" >&2; return 1; }
    echo "daemon-lib: installing python3" >&2
    DEBIAN_FRONTEND=noninteractive apt-get -qq update >&2 || true
    DEBIAN_FRONTEND=noninteractive apt-get -qq install -y --no-install-recommends python3 >/dev/null
}

vdi_daemon_build() {
    local target
    vdi__need_python3
    (cd "$VDI_LIB_REPO" && cargo build --release --quiet -p vhost-device-iommu -p dma-test-device) >&2
    target="$(cd "$VDI_LIB_REPO" && cargo metadata --format-version 1 --no-deps |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
    VDI_DAEMON_BIN="$target/release/vhost-device-iommu"
    VDI_DMA_DEVICE_BIN="$target/release/dma-test-device"
    [[ -x "$VDI_DAEMON_BIN" ]] || { echo "daemon-lib: no binary at $VDI_DAEMON_BIN" >&2; return 1; }
    [[ -x "$VDI_DMA_DEVICE_BIN" ]] || { echo "daemon-lib: no binary at $VDI_DMA_DEVICE_BIN" >&2; return 1; }
}

vdi_nested_build() {
    local target
    (cd "$VDI_LIB_REPO" && cargo build --release --quiet -p nested-vmm) >&2
    target="$(dirname "$(dirname "$VDI_DAEMON_BIN")")"
    VDI_NESTED_BIN="$target/release/nested-vmm"
    [[ -x "$VDI_NESTED_BIN" ]] || { echo "daemon-lib: no binary at $VDI_NESTED_BIN" >&2; return 1; }
}

vdi_nested_files() {
    local dir="$1" bin lib name loader=""
    mkdir -p "$dir/bin" "$dir/lib"
    for bin in "$VDI_DAEMON_BIN" "$VDI_NESTED_BIN"; do
        name="$(basename "$bin")"
        objcopy --strip-debug "$bin" "$dir/bin/$name"
        printf '%s\n' "$dir/bin/$name:bin/$name"
        while read -r lib; do
            case "$lib" in
                */ld-linux-x86-64.so.2) loader="$lib" ;;
                /*) cp -L "$lib" "$dir/lib/$(basename "$lib")" ;;
            esac
        done < <(ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }')
    done
    [[ -n "$loader" ]] || { echo "daemon-lib: no dynamic loader in ldd's output" >&2; return 1; }
    cp -L "$loader" "$dir/ld-linux-x86-64.so.2"
    printf '%s\n' "$dir/ld-linux-x86-64.so.2:lib64/ld-linux-x86-64.so.2"
    for lib in "$dir"/lib/*; do
        printf '%s\n' "$lib:usr/lib/nested/$(basename "$lib")"
    done
}

vdi_daemon_has_ctl() {
    "$VDI_DAEMON_BIN" --help 2>/dev/null | grep -q -- '--control-socket'
}

vdi_daemon_start() {
    local log="$1" sock="$2" ctl="$3" k
    shift 3
    local args=(--socket-path "$sock")
    [[ -n "$ctl" ]] && args+=(--control-socket "$ctl")
    # Keep the daemon's host-wide PASID state (default /var/lib/...) out of
    # the host: a private state directory next to the socket, if supported.
    if "$VDI_DAEMON_BIN" --help 2>/dev/null | grep -q -- '--state-dir'; then
        args+=(--state-dir "$(dirname "$sock")/pasid-state")
    fi
    rm -f "$sock" "$ctl"
    local pin=()
    [[ -n "${VDI_DAEMON_CPUS:-}" ]] && pin=(taskset -c "$VDI_DAEMON_CPUS")
    RUST_LOG="${VDI_RUST_LOG:-debug}" "${pin[@]}" "$VDI_DAEMON_BIN" "${args[@]}" "$@" >"$log" 2>&1 &
    VDI_DAEMON_PID=$!
    for ((k = 0; k < 200; k++)); do
        if [[ -S "$sock" && (-z "$ctl" || -S "$ctl") ]]; then
            return 0
        fi
        kill -0 "$VDI_DAEMON_PID" 2>/dev/null || break
        sleep 0.05
    done
    echo "daemon-lib: the daemon did not create its socket(s) (log $log):" >&2
    tail -n 5 "$log" >&2
    return 1
}

vdi_daemon_stop() {
    local pid="$VDI_DAEMON_PID" rc=0
    [[ -n "$pid" ]] || return 0
    VDI_DAEMON_PID=""
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" || rc=$?
    return "$rc"
}

vdi_dma_device_start() {
    local log="$1" sock="$2" k
    shift 2
    rm -f "$sock"
    local pin=()
    [[ -n "${VDI_DAEMON_CPUS:-}" ]] && pin=(taskset -c "$VDI_DAEMON_CPUS")
    RUST_LOG="${VDI_DMA_RUST_LOG:-info}" "${pin[@]}" "$VDI_DMA_DEVICE_BIN" --socket-path "$sock" "$@" >"$log" 2>&1 &
    VDI_DMA_DEVICE_PID=$!
    for ((k = 0; k < 200; k++)); do
        [[ -S "$sock" ]] && return 0
        kill -0 "$VDI_DMA_DEVICE_PID" 2>/dev/null || break
        sleep 0.05
    done
    echo "daemon-lib: dma-test-device did not create its socket (log $log):" >&2
    tail -n 5 "$log" >&2
    return 1
}

vdi_dma_device_stop() {
    local pid="$VDI_DMA_DEVICE_PID" rc=0 k
    [[ -n "$pid" ]] || return 0
    VDI_DMA_DEVICE_PID=""
    for ((k = 0; k < 200; k++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.05
    done
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" || rc=$?
    return "$rc"
}

vdi_dma_device_arg() {
    printf '{"driver":"vfio-user-pci","socket":{"type":"unix","path":"%s"},"addr":"%s"}\n' "$1" "$2"
}

vdi_viot() {
    "$VDI_DAEMON_BIN" viot --iommu-bdf "$2" --endpoints "$3" -o "$1"
}

vdi_qemu_start() {
    local t="$1" console="$2" dir="$3"
    shift 3
    rm -f "$dir/hostline.in" "$dir/hostline.out"
    mkfifo "$dir/hostline.in" "$dir/hostline.out"
    # Read-write opens never block and keep the FIFOs open if QEMU dies, so
    # a write to the guest cannot hang the runner.
    exec {VDI_HOSTLINE_FD}<>"$dir/hostline.in"
    exec {VDI_HOSTLINE_OUT_FD}<>"$dir/hostline.out"
    local pin=()
    [[ -n "${VDI_QEMU_CPUS:-}" ]] && pin=(taskset -c "$VDI_QEMU_CPUS")
    "${pin[@]}" timeout --kill-after=5 "$t" "$VDI_QEMU" "$@" -serial "pipe:$dir/hostline" \
        </dev/null >"$console" 2>&1 &
    VDI_QEMU_PID=$!
}

vdi__close_hostline() {
    if [[ -n "$VDI_HOSTLINE_FD" ]]; then
        exec {VDI_HOSTLINE_FD}>&- {VDI_HOSTLINE_OUT_FD}>&-
        VDI_HOSTLINE_FD=""
    fi
}

vdi_qemu_wait() {
    local pid="$VDI_QEMU_PID" rc=0
    [[ -n "$pid" ]] || return 0
    wait "$pid" || rc=$?
    VDI_QEMU_PID=""
    vdi__close_hostline
    return "$rc"
}

vdi_qemu_kill() {
    [[ -n "$VDI_QEMU_PID" ]] || return 0
    kill -TERM "$VDI_QEMU_PID" 2>/dev/null || true
    vdi_qemu_wait || true
}

vdi_send_guest() {
    [[ -n "$VDI_HOSTLINE_FD" ]] || return 1
    printf '%s\n' "$1" >&"$VDI_HOSTLINE_FD"
}

vdi_qemu_pin_vcpus() {
    local cpus="$1" qmp="$2" tid
    for tid in $(python3 - "$qmp" <<'PY'
import json, socket, sys, time
deadline = time.monotonic() + 10
while True:
    try:
        s = socket.socket(socket.AF_UNIX)
        s.connect(sys.argv[1])
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit("no QMP socket " + sys.argv[1])
        time.sleep(0.05)
f = s.makefile("rw")
f.readline()
for cmd in ("qmp_capabilities", "query-cpus-fast"):
    f.write(json.dumps({"execute": cmd}) + "\n")
    f.flush()
    while True:
        r = json.loads(f.readline())
        if "return" in r or "error" in r:
            break
print(" ".join(str(c["thread-id"]) for c in r.get("return", [])))
PY
    ); do
        taskset -pc "$cpus" "$tid" >/dev/null
    done
}
