#!/usr/bin/env bash
# ci/provision.sh: guest-kernel test provisioning for vhost-device-iommu.
#
# Owns: the cache ${XDG_CACHE_HOME:-$HOME/.cache}/vhost-device-iommu (QEMU 11
# from Debian trixie-backports unpacked from its .debs, Debian cloud guest
# kernels, busybox, static guest test programs, per-kernel initramfs), and the
# helper functions below.  It never touches the system's apt sources: Debian
# packages for the guest side are resolved with a private apt configuration
# against an EMPTY dpkg status and unpacked with dpkg-deb -x.  The only change
# to the host is `apt-get install` of missing build tools (gcc, libc6-dev, ...).
#
# Run it:     bash ci/provision.sh          (provisions, prints the variables)
# Source it:  source ci/provision.sh        (provisions in a child bash, then
#             sets the variables and functions below in the calling shell; it
#             also turns on `set -euo pipefail` and inherit_errexit there)
# A warm run (everything already in the cache) makes no network access.
#
# Environment knobs (all optional):
#   VDI_CACHE            cache root (default ${XDG_CACHE_HOME:-$HOME/.cache}/vhost-device-iommu)
#   VDI_REFRESH=1        re-resolve the newest package versions (apt-get update)
#   VDI_DEBIAN_MIRROR    Debian mirror (default http://deb.debian.org/debian)
#   VDI_KERNEL_SPECS     guest kernels as SUITE:SERIES words, SERIES = 6.12 / 7 /
#                        newest (default "bookworm-backports:6.12 trixie-backports:newest")
#   VDI_KEEP_APT=1       keep the private apt lists after a cold run (default:
#                        delete them, ~250 MB; a refresh downloads them again)
#   VDI_ACCEL            tcg | kvm | auto (default auto: KVM only when a test
#                        boot under KVM succeeds; the result is cached per host boot)
#   VDI_KBUILD=1         also provision each guest kernel's headers (and, if
#                        the host lacks it, its compiler) for out-of-tree
#                        modules: ci/kbuild.sh
#
# Variables set after sourcing (everything is an absolute path):
#   VDI_CACHE              cache root
#   VDI_QEMU               qemu-system-x86_64 wrapper (QEMU 11, runs the unpacked
#                          trixie binary through its own ld.so, firmware via -L)
#   VDI_QEMU_VERSION       upstream QEMU version, e.g. 11.1.3
#   VDI_QEMU_DEBVER        Debian package version of qemu-system-x86
#   VDI_ACCEL              kvm or tcg
#   VDI_ACCEL_ARGS         array: ( -machine q35,accel=tcg -cpu max ) or the KVM
#                          equivalent.  Callers that need more -machine options
#                          use "-machine q35,accel=$VDI_ACCEL,..." -cpu "$VDI_CPU".
#   VDI_CPU                max (TCG) or host (KVM)
#   VDI_BUSYBOX            static busybox (Debian busybox-static from trixie)
#   VDI_GUEST_BIN          directory with the static guest programs (vfio-map)
#   VDI_KERNEL_CMDLINE     base kernel command line (console=ttyS0 iommu.passthrough=0 panic=-1)
#   VDI_KERNEL_RELEASES    array: kernel releases (uname -r), one per guest kernel
#   VDI_KERNEL_LABELS      array: short labels (6.12, 7.3, ...)
#   VDI_KERNEL_DEBVERS     array: Debian package versions of the kernels
#   VDI_KERNEL_IMAGES      array: vmlinuz paths
#   VDI_KERNEL_DIRS        array: unpacked kernel dirs (config, modules/<release>/...)
#   VDI_INITRAMFS          array: base initramfs per kernel (busybox, /init, the
#                          default modules, /bin/vfio-map; no test script)
#   VDI_DEFAULT_MODULES    modules loaded by the guest /init (dependencies added
#                          automatically from each module's modinfo)
#   VDI_KBUILD_DIRS        array: per kernel, its kbuild dir (ci/kbuild.sh) or ""
# Functions defined after sourcing:
#   vdi_build_initramfs KERNEL_INDEX OUT [--modules "m1 m2"] [SRC:DST ...]
#       builds OUT (gzip'ed newc cpio) = base initramfs of kernel KERNEL_INDEX
#       (with the given module set instead of VDI_DEFAULT_MODULES; a word
#       that is a path to a .ko file is an out-of-tree module) plus extra
#       files.  The guest /init runs /etc/vdi/test if present, then powers off.
#   vdi_build_module KERNEL_INDEX SRC_DIR   (ci/kbuild.sh) builds an
#       out-of-tree module, prints the directory of the .ko files.
#   vdi_run_qemu TIMEOUT_S LOGFILE QEMU_ARGS...
#       runs $VDI_QEMU with a hard timeout, console (stdout+stderr) to LOGFILE
#       and to stdout; returns QEMU's status (124 = timed out).
#
# Guest side contract (ci/guest/init): /init loads /lib/modules/load-order,
# prints "VDI-GUEST: ..." lines, runs /etc/vdi/test, then `poweroff -f`.
# Kernel cmdline knobs: vdi.nomodules=1, vdi.verbose=1 (keep kernel messages on
# the console), vdi.shell=1 (interactive shell instead of the test).

set -euo pipefail
shopt -s inherit_errexit

VDI_CI_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VDI_CACHE="${VDI_CACHE:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/vhost-device-iommu}"
VDI_DEBIAN_MIRROR="${VDI_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
VDI_KERNEL_SPECS="${VDI_KERNEL_SPECS:-bookworm-backports:6.12 trixie-backports:newest}"
VDI_DEFAULT_MODULES="${VDI_DEFAULT_MODULES:-virtio_iommu vfio vfio_iommu_type1 vfio_pci_core vfio_pci}"
VDI_KERNEL_CMDLINE="console=ttyS0 iommu.passthrough=0 panic=-1"
# Module parameters applied by the guest /init (module name, then arguments).
VDI_MODULE_PARAMS="vfio_iommu_type1 allow_unsafe_interrupts=1"
VDI_QEMU_SUITE="trixie-backports"
VDI_QEMU_MIN_VERSION="10.2"   # first upstream QEMU with vhost-user-test-device-pci

# ---------------------------------------------------------------- helpers ---

vdi__t0="${EPOCHREALTIME}"
vdi__log() { printf '[provision %6.1fs] %s\n' "$(vdi__elapsed)" "$*" >&2; }
vdi__die() { printf '[provision] ERROR: %s\n' "$*" >&2; exit 1; }
vdi__elapsed() { awk -v a="$vdi__t0" -v b="${EPOCHREALTIME}" 'BEGIN { printf "%.1f", b - a }'; }
vdi__safe() { printf '%s' "$1" | tr ':/' '__'; }
# shellcheck source=kbuild.sh
source "$VDI_CI_DIR/kbuild.sh"

# Host tools needed to build the guest side.  Installed only when missing.
vdi__host_prereqs() {
    local missing=()
    command -v gcc >/dev/null || missing+=(gcc)
    command -v objcopy >/dev/null || missing+=(binutils)
    command -v xz >/dev/null || missing+=(xz-utils)
    command -v gzip >/dev/null || missing+=(gzip)
    command -v flock >/dev/null || missing+=(util-linux)
    command -v timeout >/dev/null || missing+=(coreutils)
    [[ -e /usr/include/linux/vfio.h ]] || missing+=(linux-libc-dev)
    [[ -e /usr/lib/x86_64-linux-gnu/libc.a ]] || missing+=(libc6-dev)
    if [[ "${VDI_KBUILD:-0}" == 1 ]]; then   # ci/kbuild.sh
        command -v make >/dev/null || missing+=(make)
        command -v patchelf >/dev/null || missing+=(patchelf)
        [[ -e /usr/lib/x86_64-linux-gnu/libelf.so.1 ]] || missing+=(libelf1)
    fi
    # The trixie keys came with bookworm's debian-archive-keyring 2023.3+deb12u1.
    [[ -e /usr/share/keyrings/debian-archive-keyring.gpg &&
        -e /usr/share/keyrings/debian-archive-trixie-stable.gpg ]] || missing+=(debian-archive-keyring)
    if ((${#missing[@]})); then
        [[ $EUID -eq 0 ]] || vdi__die "missing host packages (${missing[*]}); run as root or install them"
        vdi__log "installing host packages: ${missing[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get -qq update || vdi__log "apt-get update had errors; trying the install anyway"
        DEBIAN_FRONTEND=noninteractive apt-get -qq install -y --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

# A private apt root per Debian codename (suites CODENAME and CODENAME-backports).
vdi__apt_conf() {
    local codename="$1" root="$VDI_CACHE/apt/$1"
    if [[ ! -e "$root/apt.conf" ]]; then
        mkdir -p "$root"/{etc/apt.conf.d,etc/preferences.d,etc/sources.list.d,state/lists/partial,cache/archives/partial}
        : >"$root/state/status"
        local key=/usr/share/keyrings/debian-archive-keyring.gpg
        cat >"$root/etc/sources.list" <<EOF
deb [signed-by=$key] $VDI_DEBIAN_MIRROR $codename main
deb [signed-by=$key] $VDI_DEBIAN_MIRROR $codename-backports main
EOF
        cat >"$root/apt.conf" <<EOF
Dir::State "$root/state";
Dir::State::status "$root/state/status";
Dir::Cache "$root/cache";
Dir::Etc::SourceList "$root/etc/sources.list";
Dir::Etc::SourceParts "$root/etc/sources.list.d";
Dir::Etc::Preferences "$root/etc/preferences";
Dir::Etc::PreferencesParts "$root/etc/preferences.d";
Dir::Etc::Parts "$root/etc/apt.conf.d";
APT::Architecture "amd64";
APT::Architectures { "amd64"; };
APT::Install-Recommends "false";
APT::Install-Suggests "false";
APT::Sandbox::User "root";
Acquire::Languages "none";
Acquire::GzipIndexes "false";
Acquire::Retries "3";
EOF
    fi
    printf '%s\n' "$root/apt.conf"
}
vdi__apt_get() { local c="$1"; shift; APT_CONFIG="$(vdi__apt_conf "$c")" apt-get -q "$@"; }
vdi__apt_cache() { local c="$1"; shift; APT_CONFIG="$(vdi__apt_conf "$c")" apt-cache "$@"; }
vdi__packages_file() {   # the downloaded Packages index of one suite
    local f
    f="$(compgen -G "$VDI_CACHE/apt/${1%%-*}/state/lists/*_dists_${1}_main_binary-amd64_Packages" || true)"
    f="${f%%$'\n'*}"
    [[ -n "$f" ]] || vdi__die "no package index for suite $1"
    printf '%s\n' "$f"
}
# "PACKAGE VERSION" of every package in a suite whose name matches an ERE.
vdi__suite_packages() {
    awk -v re="$2" 'BEGIN { RS = ""; FS = "\n" }
        { p = ""; v = ""
          for (i = 1; i <= NF; i++) {
              if ($i ~ /^Package: /) p = substr($i, 10)
              else if ($i ~ /^Version: /) v = substr($i, 10) }
          if (p ~ re) print p, v }' "$(vdi__packages_file "$1")"
}

# ------------------------------------------------------------- resolution ---

# Resolve the newest versions and write $VDI_CACHE/versions.env.
vdi__resolve() {
    local codenames=(trixie) spec suite
    for spec in $VDI_KERNEL_SPECS; do
        suite="${spec%%:*}"
        [[ " ${codenames[*]} " == *" ${suite%%-*} "* ]] || codenames+=("${suite%%-*}")
    done
    local c
    for c in "${codenames[@]}"; do
        vdi__log "apt-get update (private, $c + $c-backports)"
        vdi__apt_get "$c" -qq update
    done

    local qemu_debver busybox_debver
    qemu_debver="$(vdi__apt_get trixie install -s -t "$VDI_QEMU_SUITE" qemu-system-x86 |
        awk '$1 == "Inst" && $2 == "qemu-system-x86" { gsub(/[()]/, "", $3); print $3 }')"
    [[ -n "$qemu_debver" ]] || vdi__die "cannot resolve qemu-system-x86 in $VDI_QEMU_SUITE"
    busybox_debver="$(vdi__apt_cache trixie show --no-all-versions busybox-static | awk '/^Version: / { print $2; exit }')"

    local out="$VDI_CACHE/versions.env.new" n=0
    {
        printf 'VDI_QEMU_DEBVER=%q\n' "$qemu_debver"
        printf 'VDI_BUSYBOX_DEBVER=%q\n' "$busybox_debver"
        for spec in $VDI_KERNEL_SPECS; do
            vdi__resolve_kernel "${spec%%:*}" "${spec#*:}" "$n"
            n=$((n + 1))
        done
        printf 'VDI_KERNEL_COUNT=%q\n' "$n"
        printf 'VDI_RESOLVED_SPECS=%q\n' "$VDI_KERNEL_SPECS"
    } >"$out"
    mv "$out" "$VDI_CACHE/versions.env"
}

# Pick the newest cloud-amd64 kernel of SUITE whose release matches SERIES and
# print its pinned description (release, version, the packages to unpack).
vdi__resolve_kernel() {
    local suite="$1" series="$2" idx="$3" series_re
    case "$series" in
        newest) series_re='[0-9]+\.[0-9]+' ;;
        *) series_re="${series//./\\.}" ;;
    esac
    local rel
    rel="$(vdi__suite_packages "$suite" "^linux-image-${series_re}(\\.[0-9]+)*\\+deb[0-9.]+-cloud-amd64(-unsigned)?\$" |
        awk '{ sub(/^linux-image-/, "", $1); sub(/-unsigned$/, "", $1); print $1 }' | sort -uV | tail -n1)"
    [[ -n "$rel" ]] || vdi__die "no cloud-amd64 kernel matching '$series' in $suite"
    # Old layout (<= 6.12): one linux-image-REL-unsigned package has vmlinuz and
    # modules.  New layout (trixie-backports 6.17+): linux-binary-unsigned-REL
    # (vmlinuz) + linux-modules-REL + linux-base-REL (config, modules.order).
    local pkgs=() p
    if [[ -n "$(vdi__suite_packages "$suite" "^linux-image-${rel//+/\\+}-unsigned\$")" ]]; then
        pkgs=("linux-image-$rel-unsigned")
    else
        for p in "linux-binary-unsigned-$rel" "linux-modules-$rel" "linux-base-$rel"; do
            [[ -n "$(vdi__suite_packages "$suite" "^${p//+/\\+}\$")" ]] || vdi__die "$suite lacks $p"
            pkgs+=("$p")
        done
    fi
    local debver
    debver="$(vdi__suite_packages "$suite" "^${pkgs[0]//+/\\+}\$" | awk '{ print $2 }' | sort -V | tail -n1)"
    local label
    label="$(printf '%s' "$rel" | sed -E 's/^([0-9]+\.[0-9]+).*/\1/')"
    printf 'VDI_KSPEC_%d=%q\n' "$idx" "$suite|$rel|$debver|$label|${pkgs[*]}"
}

# ------------------------------------------------------------------ QEMU ---

vdi__qemu_dir() { printf '%s\n' "$VDI_CACHE/qemu/$(vdi__safe "$VDI_QEMU_DEBVER")"; }

vdi__ensure_qemu() {
    local dir root debs
    dir="$(vdi__qemu_dir)"
    [[ -e "$dir/.complete" ]] && return 0
    vdi__log "QEMU $VDI_QEMU_DEBVER: resolving + downloading the package set (empty dpkg status)"
    rm -rf "$dir"
    root="$dir/root"
    debs="$dir/debs"
    mkdir -p "$root" "$debs/partial"
    vdi__apt_get trixie -qq -y -d -t "$VDI_QEMU_SUITE" \
        -o Dir::Cache::archives="$debs" install "qemu-system-x86=$VDI_QEMU_DEBVER" >/dev/null
    local n=0 f
    for f in "$debs"/*.deb; do
        dpkg-deb -x "$f" "$root"
        n=$((n + 1))
    done
    vdi__log "QEMU: unpacked $n packages ($(du -sh "$debs" | cut -f1) of .debs)"
    rm -rf "$debs" "$root"/usr/share/{doc,man,locale,lintian,bug}
    vdi__relink_absolute "$root"

    local ldso libs moddir
    ldso="$(compgen -G "$root/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" || true)"
    [[ -n "$ldso" ]] || vdi__die "no ld-linux-x86-64.so.2 in the unpacked QEMU set"
    libs="$root/usr/lib/x86_64-linux-gnu:$root/lib/x86_64-linux-gnu:$root/usr/lib/x86_64-linux-gnu/pulseaudio"
    moddir="$root/usr/lib/x86_64-linux-gnu/qemu"
    mkdir -p "$dir/bin"
    cat >"$dir/bin/qemu-system-x86_64" <<EOF
#!/bin/sh
# Generated by ci/provision.sh: runs QEMU $VDI_QEMU_DEBVER unpacked from Debian
# $VDI_QEMU_SUITE through its own dynamic loader, libraries and firmware.
QEMU_MODULE_DIR='$moddir'
export QEMU_MODULE_DIR
exec '$ldso' --library-path '$libs' --argv0 qemu-system-x86_64 \\
    '$root/usr/bin/qemu-system-x86_64' \\
    -L '$root/usr/share/qemu' -L '$root/usr/share/seabios' -L '$root/usr/lib/ipxe/qemu' "\$@"
EOF
    chmod +x "$dir/bin/qemu-system-x86_64"

    local help
    help="$("$dir/bin/qemu-system-x86_64" -device help 2>&1)" || vdi__die "QEMU does not start: $help"
    local d
    for d in vhost-user-test-device-pci virtio-iommu-pci edu; do
        grep -q "\"$d\"" <<<"$help" || vdi__die "QEMU $VDI_QEMU_DEBVER lacks -device $d"
    done
    "$dir/bin/qemu-system-x86_64" --version >"$dir/version.full"
    sed -n 1p "$dir/version.full" >"$dir/version"
    touch "$dir/.complete"
    vdi__log "QEMU: $(cat "$dir/version"), -device help lists vhost-user-test-device-pci"
}

# dpkg-deb -x keeps absolute symlinks (e.g. /usr/share/qemu/bios-256k.bin ->
# /usr/share/seabios/bios-256k.bin); point them inside the unpacked tree.
vdi__relink_absolute() {
    local root="$1" link target
    while IFS= read -r -d '' link; do
        target="$(readlink "$link")"
        [[ "$target" == /* ]] || continue
        ln -sfn "$(realpath -m --relative-to="$(dirname "$link")" "$root$target")" "$link"
    done < <(find "$root" -type l -print0)
}

# --------------------------------------------------------------- busybox ---

vdi__busybox_path() { printf '%s\n' "$VDI_CACHE/busybox/$(vdi__safe "$VDI_BUSYBOX_DEBVER")/busybox"; }

vdi__ensure_busybox() {
    local bb tmp
    bb="$(vdi__busybox_path)"
    [[ -x "$bb" ]] && return 0
    vdi__log "busybox-static $VDI_BUSYBOX_DEBVER: downloading"
    tmp="$(mktemp -d "$VDI_CACHE/tmp.XXXXXX")"
    (cd "$tmp" && vdi__apt_get trixie -qq download "busybox-static=$VDI_BUSYBOX_DEBVER" >/dev/null)
    dpkg-deb -x "$tmp"/busybox-static_*.deb "$tmp/x"
    mkdir -p "$(dirname "$bb")"
    cp "$tmp/x/usr/bin/busybox" "$bb.tmp"
    mv "$bb.tmp" "$bb"
    rm -rf "$tmp"
}

# --------------------------------------------------------------- kernels ---

# Fields of VDI_KSPEC_<i>: suite|release|debver|label|packages
vdi__kspec() { local v="VDI_KSPEC_$1"; printf '%s\n' "${!v}"; }
vdi__kernel_dir() {
    local suite rel debver
    IFS='|' read -r suite rel debver _ _ <<<"$(vdi__kspec "$1")"
    printf '%s\n' "$VDI_CACHE/kernels/$(vdi__safe "${rel}_${debver}")"
}

vdi__ensure_kernel() {
    local i="$1" suite rel debver label pkgs dir tmp p
    IFS='|' read -r suite rel debver label pkgs <<<"$(vdi__kspec "$i")"
    dir="$(vdi__kernel_dir "$i")"
    [[ -e "$dir/.complete" ]] && return 0
    vdi__log "kernel $rel ($debver, $suite): downloading $pkgs"
    rm -rf "$dir"
    tmp="$(mktemp -d "$VDI_CACHE/tmp.XXXXXX")"
    local args=()
    for p in $pkgs; do args+=("$p=$debver"); done
    (cd "$tmp" && vdi__apt_get "${suite%%-*}" -qq download "${args[@]}" >/dev/null)
    for p in "$tmp"/*.deb; do dpkg-deb -x "$p" "$tmp/x"; done
    mkdir -p "$dir/modules"
    local img moddir
    img="$(compgen -G "$tmp/x/boot/vmlinuz-$rel" || compgen -G "$tmp/x/usr/lib/modules/$rel/vmlinuz*" || true)"
    [[ -n "$img" ]] || vdi__die "no vmlinuz in $pkgs"
    cp "$img" "$dir/vmlinuz"
    moddir="$(compgen -G "$tmp/x/lib/modules/$rel" || compgen -G "$tmp/x/usr/lib/modules/$rel" || true)"
    [[ -n "$moddir" ]] || vdi__die "no modules directory in $pkgs"
    cp "$(compgen -G "$tmp/x/boot/config-$rel" || printf '%s' "$moddir/config")" "$dir/config"
    rm -f "$moddir"/vmlinuz* "$moddir"/System.map "$moddir"/config
    mv "$moddir" "$dir/modules/$rel"
    printf '%s\n' "$rel" >"$dir/release"
    printf '%s\n' "$debver" >"$dir/debver"
    printf '%s\n' "$label" >"$dir/label"
    rm -rf "$tmp"
    touch "$dir/.complete"
    vdi__log "kernel $rel: $(du -sh "$dir" | cut -f1) unpacked"
}

# Print "file.ko" lines in load order for the given modules plus their
# dependencies (read from each module's .modinfo "depends=").  Decompresses
# the modules (.ko.xz/.ko.zst/.ko.gz) into OUTDIR, since busybox insmod can't.
vdi__modules_closure() {
    local kdir="$1" outdir="$2" rel mroot
    shift 2
    rel="$(cat "$kdir/release")"
    mroot="$kdir/modules/$rel"
    local -A seen=()
    local order=()
    vdi__visit_module() {
        local name="${1//-/_}" path="" base file deps d
        if [[ "$1" == */*.ko && -f "$1" ]]; then   # out-of-tree module
            path="$1"
            name="$(basename "$1" .ko)"
            name="${name//-/_}"
        fi
        [[ -n "${seen[$name]:-}" ]] && return 0
        seen[$name]=1
        if [[ -z "$path" ]]; then
            if grep -Eq "/${1//[-_]/[-_]}\\.ko(\\.(xz|zst|gz))?\$" "$mroot/modules.builtin" 2>/dev/null; then
                return 0   # built in
            fi
            path="$(find "$mroot" -regextype posix-extended \
                -regex ".*/${name//_/[-_]}\\.ko(\\.(xz|zst|gz))?" -print -quit)"
        fi
        [[ -n "$path" ]] || vdi__die "module $name not found in $rel"
        base="$(basename "$path")"
        file="${base%%.ko*}.ko"
        case "$path" in
            *.xz) xz -dc "$path" >"$outdir/$file" ;;
            *.zst) zstd -qdc "$path" >"$outdir/$file" ;;
            *.gz) gzip -dc "$path" >"$outdir/$file" ;;
            *) cp "$path" "$outdir/$file" ;;
        esac
        objcopy -O binary --only-section=.modinfo "$outdir/$file" "$outdir/.modinfo"
        deps="$(tr '\0' '\n' <"$outdir/.modinfo" | sed -n 's/^depends=//p' | tr ',' ' ')"
        rm -f "$outdir/.modinfo"
        printf '%s: %s\n' "$file" "$deps" >>"$outdir/modules.dep"
        for d in $deps; do vdi__visit_module "$d"; done
        order+=("$file")
    }
    local m
    for m in "$@"; do vdi__visit_module "$m"; done
    printf '%s\n' "${order[@]}"
}

# ----------------------------------------------------------- guest files ---

vdi__guest_bin_dir() {
    # The guest programs may include the SVA module's user interface.
    printf '%s\n' "$VDI_CACHE/guest-bin/$( (gcc -dumpfullversion; cat "$VDI_CI_DIR"/guest/*.c \
        "$VDI_CI_DIR"/../guest/sva/viommu-sva.h) | sha256sum | cut -c1-16)"
}

vdi__ensure_guest_bins() {
    local dir src
    dir="$(vdi__guest_bin_dir)"
    [[ -e "$dir/.complete" ]] && return 0
    mkdir -p "$dir"
    for src in "$VDI_CI_DIR"/guest/*.c; do
        vdi__log "gcc -static $(basename "$src")"
        gcc -static -O2 -Wall -Wextra -o "$dir/$(basename "$src" .c)" "$src"
    done
    touch "$dir/.complete"
}

# vdi_build_initramfs KERNEL_INDEX OUT [--modules "m1 m2"] [SRC:DST ...]
vdi_build_initramfs() (
    set -euo pipefail
    local idx="$1" out="$2"
    shift 2
    local modules="$VDI_DEFAULT_MODULES"
    if [[ "${1:-}" == --modules ]]; then
        modules="$2"
        shift 2
    fi
    local kdir stage
    kdir="${VDI_KERNEL_DIRS[$idx]:-$(vdi__kernel_dir "$idx")}"
    stage="$(mktemp -d "${TMPDIR:-/tmp}/vdi-initramfs.XXXXXX")"
    trap 'rm -rf "$stage"' EXIT
    mkdir -p "$stage"/{bin,sbin,dev,proc,sys,tmp,run,etc/vdi,lib/modules}
    cp "${VDI_BUSYBOX:-$(vdi__busybox_path)}" "$stage/bin/busybox"
    install -m 0755 "$VDI_CI_DIR/guest/init" "$stage/init"
    install -m 0644 "$VDI_CI_DIR/guest/lib.sh" "$stage/etc/vdi/lib.sh"
    cp "${VDI_GUEST_BIN:-$(vdi__guest_bin_dir)}"/* "$stage/bin/"
    rm -f "$stage/bin/.complete"
    # shellcheck disable=SC2086  # word splitting of the module list is intended
    vdi__modules_closure "$kdir" "$stage/lib/modules" $modules |
        while read -r file; do
            local name="${file%.ko}" params
            params="$(awk -v m="${name//-/_}" '$1 == m { $1 = ""; sub(/^ /, ""); print }' <<<"$VDI_MODULE_PARAMS")"
            printf '%s %s\n' "$file" "$params"
        done >"$stage/lib/modules/load-order"
    local spec
    for spec in "$@"; do
        [[ "$spec" == *:* ]] || { echo "vdi_build_initramfs: expected SRC:DST, got $spec" >&2; exit 1; }
        mkdir -p "$stage/$(dirname "${spec#*:}")"
        cp -a "${spec%%:*}" "$stage/${spec#*:}"
    done
    mkdir -p "$(dirname "$out")"
    (cd "$stage" && find . -mindepth 1 | LC_ALL=C sort |
        "$stage/bin/busybox" cpio -o -H newc -R 0:0 2>/dev/null) | gzip -6 >"$out.tmp"
    mv "$out.tmp" "$out"
)

vdi__ensure_initramfs() {
    local i="$1" kdir key out
    kdir="$(vdi__kernel_dir "$i")"
    key="$( (cat "$kdir/release" "$kdir/debver"; echo "$VDI_DEFAULT_MODULES $VDI_MODULE_PARAMS"
        vdi__busybox_path; vdi__guest_bin_dir; cat "$VDI_CI_DIR/guest/init" "$VDI_CI_DIR/guest/lib.sh" "${BASH_SOURCE[0]}") |
        sha256sum | cut -c1-16)"
    out="$VDI_CACHE/initramfs/$(cat "$kdir/release")-$key.cpio.gz"
    if [[ ! -e "$out" ]]; then
        vdi__log "initramfs for $(cat "$kdir/release")"
        vdi_build_initramfs "$i" "$out"
    fi
    printf '%s\n' "$out"
}

# vdi_run_qemu TIMEOUT_S LOGFILE QEMU_ARGS...
vdi_run_qemu() {
    local t="$1" log="$2" rc
    shift 2
    # QEMU's status (through timeout: 124 = timed out), not tee's.
    if timeout --kill-after=10 "$t" "$VDI_QEMU" "$@" </dev/null 2>&1 | tee "$log"; then
        rc=0
    else
        rc="${PIPESTATUS[0]}"
    fi
    return "$rc"
}

# ----------------------------------------------------------------- accel ---

# KVM is used only if a real test boot under KVM reaches the guest /init
# (kvm-pvm exposes /dev/kvm but fails stock kernels with an emulation error).
vdi__probe_accel() {
    case "${VDI_ACCEL:-auto}" in
        tcg | kvm) printf '%s\n' "$VDI_ACCEL"; return 0 ;;
        auto) ;;
        *) vdi__die "VDI_ACCEL must be tcg, kvm or auto" ;;
    esac
    if [[ ! -r /dev/kvm || ! -w /dev/kvm ]]; then
        echo tcg
        return 0
    fi
    local boot stamp
    boot="$(cat /proc/sys/kernel/random/boot_id 2>/dev/null || echo unknown)"
    stamp="$VDI_CACHE/accel/$boot-$(vdi__safe "$VDI_QEMU_DEBVER")"
    if [[ ! -e "$stamp" ]]; then
        # QEMU pauses (does not exit) on a KVM internal error: poll and kill.
        mkdir -p "$VDI_CACHE/accel"
        local log="$VDI_CACHE/accel/probe.log" pid result=tcg k
        : >"$log"
        timeout --kill-after=5 30 "$(vdi__qemu_dir)/bin/qemu-system-x86_64" \
            -machine q35,accel=kvm -cpu host -m 256M -nodefaults -nographic -serial stdio -no-reboot \
            -kernel "$(vdi__kernel_dir 0)/vmlinuz" -initrd "$1" \
            -append "$VDI_KERNEL_CMDLINE vdi.probe=1" </dev/null >"$log" 2>&1 &
        pid=$!
        for ((k = 0; k < 300; k++)); do
            if grep -q 'VDI-PROBE-OK' "$log"; then
                result=kvm
                break
            fi
            grep -qiE 'internal error|emulation failure|kvm.*(fail|error)' "$log" && break
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        vdi__log "KVM probe boot: $result ($(sed 's/\x1b\[[0-9;?]*[a-zA-Z]//g' "$log" |
            grep -m1 -oiE 'VDI-PROBE-OK|KVM internal error.*|[^ ]*(error|fail).*' | cut -c1-70))"
        echo "$result" >"$stamp"
    fi
    cat "$stamp"
}

# ------------------------------------------------------------------ main ---

vdi__artifacts_complete() {
    [[ -e "$VDI_CACHE/versions.env" ]] || return 1
    # shellcheck source=/dev/null
    source "$VDI_CACHE/versions.env"
    [[ "${VDI_RESOLVED_SPECS:-}" == "$VDI_KERNEL_SPECS" ]] || return 1
    [[ -e "$(vdi__qemu_dir)/.complete" && -x "$(vdi__busybox_path)" ]] || return 1
    local i
    for ((i = 0; i < VDI_KERNEL_COUNT; i++)); do
        [[ -e "$(vdi__kernel_dir "$i")/.complete" ]] || return 1
    done
}

vdi_provision() {
    mkdir -p "$VDI_CACHE"
    exec 9>"$VDI_CACHE/.lock"
    flock 9
    vdi__host_prereqs
    local mode=warm
    if [[ "${VDI_REFRESH:-0}" == 1 ]] || ! vdi__artifacts_complete; then
        mode=cold
        vdi__resolve
        # shellcheck source=/dev/null
        source "$VDI_CACHE/versions.env"
    fi
    local qv
    qv="$(printf '%s' "$VDI_QEMU_DEBVER" | sed -E 's/^[0-9]+://; s/[+~-].*//')"
    [[ "$(printf '%s\n%s\n' "$VDI_QEMU_MIN_VERSION" "$qv" | sort -V | head -n1)" == "$VDI_QEMU_MIN_VERSION" ]] ||
        vdi__die "QEMU $qv < $VDI_QEMU_MIN_VERSION has no user-creatable vhost-user-test-device-pci"
    vdi__ensure_qemu
    vdi__ensure_busybox
    vdi__ensure_guest_bins
    local i rels=() labels=() debvers=() images=() dirs=() initrds=() kbuilds=() kdir kb
    vdi__kbuild_fetched_lists=0
    for ((i = 0; i < VDI_KERNEL_COUNT; i++)); do
        vdi__ensure_kernel "$i"
        [[ "${VDI_KBUILD:-0}" == 1 ]] && vdi__ensure_kbuild "$i"
        kb="$(vdi__kbuild_dir "$i")"
        [[ -e "$kb/.complete" ]] || kb=""
        kbuilds+=("$kb")
        kdir="$(vdi__kernel_dir "$i")"
        rels+=("$(cat "$kdir/release")")
        labels+=("$(cat "$kdir/label")")
        debvers+=("$(cat "$kdir/debver")")
        images+=("$kdir/vmlinuz")
        dirs+=("$kdir")
        initrds+=("$(vdi__ensure_initramfs "$i")")
    done
    local accel cpu
    accel="$(vdi__probe_accel "${initrds[0]}")"
    cpu=max
    [[ "$accel" == kvm ]] && cpu=host

    local env="$VDI_CACHE/env.sh"
    {
        echo "# Generated by ci/provision.sh; source ci/provision.sh instead of this file."
        printf 'VDI_CACHE=%q\n' "$VDI_CACHE"
        printf 'VDI_QEMU=%q\n' "$(vdi__qemu_dir)/bin/qemu-system-x86_64"
        printf 'VDI_QEMU_DEBVER=%q\n' "$VDI_QEMU_DEBVER"
        printf 'VDI_QEMU_VERSION=%q\n' "$qv"
        printf 'VDI_ACCEL=%q\n' "$accel"
        printf 'VDI_CPU=%q\n' "$cpu"
        printf 'VDI_ACCEL_ARGS=(-machine %q -cpu %q)\n' "q35,accel=$accel" "$cpu"
        printf 'VDI_BUSYBOX=%q\n' "$(vdi__busybox_path)"
        printf 'VDI_GUEST_BIN=%q\n' "$(vdi__guest_bin_dir)"
        printf 'VDI_KERNEL_CMDLINE=%q\n' "$VDI_KERNEL_CMDLINE"
        printf 'VDI_DEFAULT_MODULES=%q\n' "$VDI_DEFAULT_MODULES"
        printf 'VDI_KERNEL_RELEASES=(%s)\n' "$(printf '%q ' "${rels[@]}")"
        printf 'VDI_KERNEL_LABELS=(%s)\n' "$(printf '%q ' "${labels[@]}")"
        printf 'VDI_KERNEL_DEBVERS=(%s)\n' "$(printf '%q ' "${debvers[@]}")"
        printf 'VDI_KERNEL_IMAGES=(%s)\n' "$(printf '%q ' "${images[@]}")"
        printf 'VDI_KERNEL_DIRS=(%s)\n' "$(printf '%q ' "${dirs[@]}")"
        printf 'VDI_INITRAMFS=(%s)\n' "$(printf '%q ' "${initrds[@]}")"
        printf 'VDI_KBUILD_DIRS=(%s)\n' "$(printf '%q ' "${kbuilds[@]}")"
    } >"$env.tmp"
    mv "$env.tmp" "$env"
    mkdir -p "$VDI_CACHE/bin"
    ln -sfn "$(vdi__qemu_dir)/bin/qemu-system-x86_64" "$VDI_CACHE/bin/qemu-system-x86_64"
    local f
    for f in "$VDI_CACHE"/initramfs/*.cpio.gz; do   # drop stale base initramfs
        [[ " ${initrds[*]} " == *" $f "* ]] || rm -f "$f"
    done
    if [[ ("$mode" == cold || "$vdi__kbuild_fetched_lists" == 1) && "${VDI_KEEP_APT:-0}" != 1 ]]; then
        rm -rf "$VDI_CACHE/apt"
    fi
    vdi__log "provisioning done ($mode) in $(vdi__elapsed)s: QEMU $qv, kernels ${rels[*]}, accel $accel"
}

if [[ "${BASH_SOURCE[0]}" != "$0" ]]; then
    # Sourced: provision in a child bash (errexit is not reliable in a subshell
    # tested with ||), passing the knobs even if they are not exported.
    env VDI_CACHE="$VDI_CACHE" VDI_REFRESH="${VDI_REFRESH:-0}" VDI_DEBIAN_MIRROR="$VDI_DEBIAN_MIRROR" \
        VDI_KERNEL_SPECS="$VDI_KERNEL_SPECS" VDI_DEFAULT_MODULES="$VDI_DEFAULT_MODULES" \
        VDI_ACCEL="${VDI_ACCEL:-auto}" VDI_KBUILD="${VDI_KBUILD:-0}" VDI_KEEP_APT="${VDI_KEEP_APT:-0}" \
        bash "${BASH_SOURCE[0]}" --quiet || return 1
    # shellcheck source=/dev/null
    source "$VDI_CACHE/env.sh"
    # shellcheck source=/dev/null
    source "$VDI_CACHE/versions.env"
else
    vdi_provision
    [[ "${1:-}" == --quiet ]] || cat "$VDI_CACHE/env.sh"
fi
