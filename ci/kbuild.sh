#!/usr/bin/env bash
# ci/kbuild.sh: out-of-tree kernel-module builds for the CI guest kernels.
# Sourced by ci/provision.sh (never run on its own); uses its helpers.
#
# Owns: $VDI_CACHE/kbuild/<release>_<debver>/ per guest kernel, provisioned
# when VDI_KBUILD=1 (ci/sva-tests.sh sets it):
#   root/      the Debian linux-headers-<release>, linux-headers-<series>-common
#              and linux-kbuild-<series> packages of that exact kernel
#              version, unpacked with dpkg-deb -x (absolute symlinks and the
#              flavour Makefile's absolute include pointed inside root/);
#   tc/        only when the host has no compiler of the kernel's
#              CONFIG_CC_VERSION_TEXT: that gcc, its binutils and the
#              libraries of gcc and of linux-kbuild's tools, unpacked from
#              the kernel's own Debian release, every dynamic executable
#              patched (patchelf) to run through tc/'s ld.so and libraries;
#   kdir, path, cc   the headers directory for make -C, the PATH prefix
#              (empty: host tools) and the compiler's version text;
#   .complete
# and $VDI_CACHE/modules/<release>/<hash>/ (built modules, keyed by the
# sources, the kbuild dir and the compiler).  Warm runs make no network
# access and run no make when the module sources did not change.
#
# Functions (after sourcing ci/provision.sh):
#   vdi_build_module KERNEL_INDEX SRC_DIR    builds SRC_DIR's Kbuild against
#       kernel KERNEL_INDEX (warnings are errors), prints the directory that
#       holds the .ko files (debug info stripped); fails with a message if
#       that kernel has no kbuild (VDI_KBUILD_DIRS[i] is empty).
# Variables: VDI_KBUILD_DIRS (array, one per kernel, "" if not provisioned).

vdi__kbuild_dir() {
    local suite rel debver
    IFS='|' read -r suite rel debver _ _ <<<"$(vdi__kspec "$1")"
    printf '%s\n' "$VDI_CACHE/kbuild/$(vdi__safe "${rel}_${debver}")"
}

# The private apt lists of CODENAME, fetched if a cold run deleted them.
vdi__kbuild_apt_lists() {
    local codename="$1"
    if ! compgen -G "$VDI_CACHE/apt/$codename/state/lists/*_Packages" >/dev/null; then
        vdi__log "apt-get update (private, $codename + $codename-backports) for kernel headers"
        vdi__apt_get "$codename" -qq update
        vdi__kbuild_fetched_lists=1
    fi
}

# Every package (name=version) that `apt-get install -t SUITE PKGS` would
# unpack on an empty system.
vdi__kbuild_closure() {
    local suite="$1"
    shift
    vdi__apt_get "${suite%%-*}" install -s -t "$suite" "$@" |
        awk '$1 == "Inst" { v = $3; gsub(/[()]/, "", v); print $2 "=" v }'
}

# Point every dynamic executable under TREE at the loader and libraries
# unpacked in LIBROOT.
vdi__kbuild_patchelf() {
    local libroot="$1" tree="$2" ldso f rpath
    ldso="$(compgen -G "$libroot/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" ||
        compgen -G "$libroot/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" ||
        compgen -G "$libroot/usr/lib64/ld-linux-x86-64.so.2" || true)"
    [[ -n "$ldso" ]] || vdi__die "no ld-linux-x86-64.so.2 in $libroot"
    rpath="$libroot/usr/lib/x86_64-linux-gnu:$libroot/lib/x86_64-linux-gnu"
    while IFS= read -r -d '' f; do
        [[ "$(head -c 4 "$f" 2>/dev/null)" == $'\x7fELF' ]] || continue
        readelf -l "$f" 2>/dev/null | grep -q 'program interpreter' || continue
        # DT_RPATH (not RUNPATH): it also applies to the libraries' own
        # dependencies, so nothing resolves to the host's older libraries.
        patchelf --set-interpreter "$ldso" --force-rpath --set-rpath "$rpath" "$f"
    done < <(find "$tree" -type f -perm -u+x -print0)
}

vdi__ensure_kbuild() {
    local i="$1" suite rel debver codename series dir tmp cc_text cc p
    IFS='|' read -r suite rel debver _ _ <<<"$(vdi__kspec "$i")"
    dir="$(vdi__kbuild_dir "$i")"
    [[ -e "$dir/.complete" ]] && return 0
    codename="${suite%%-*}"
    series="${rel%-cloud-amd64}"
    cc_text="$(sed -n 's/^CONFIG_CC_VERSION_TEXT="\(.*\)"$/\1/p' "$(vdi__kernel_dir "$i")/config")"
    cc="${cc_text%% *}"   # x86_64-linux-gnu-gcc-12
    [[ "$cc" =~ ^x86_64-linux-gnu-gcc-([0-9]+)$ ]] || vdi__die "kernel $rel: unexpected compiler '$cc_text'"
    local gcc_major="${BASH_REMATCH[1]}"

    vdi__log "kbuild for $rel ($debver): headers${cc:+, compiler $cc}"
    rm -rf "$dir"
    tmp="$(mktemp -d "$VDI_CACHE/tmp.XXXXXX")"
    vdi__kbuild_apt_lists "$codename"
    local pkgs=("linux-headers-$rel=$debver" "linux-headers-$series-common=$debver"
        "linux-kbuild-$series=$debver")
    (cd "$tmp" && vdi__apt_get "$codename" -qq download "${pkgs[@]}" >/dev/null)
    mkdir -p "$tmp/root"
    for p in "$tmp"/*.deb; do dpkg-deb -x "$p" "$tmp/root"; done
    rm -f "$tmp"/*.deb
    vdi__relink_absolute "$tmp/root"
    local kdir="$tmp/root/usr/src/linux-headers-$rel"
    [[ -f "$kdir/Makefile" ]] || vdi__die "linux-headers-$rel has no Makefile"
    # "include /usr/src/linux-headers-<series>-common/Makefile", and since
    # 6.13 "KBUILD_OUTPUT=/usr/src/linux-headers-<release>"
    sed -i -E "s#(^|[ =])/usr/src/#\1$dir/root/usr/src/#g" "$kdir/Makefile"

    local path=""
    if ! command -v "$cc" >/dev/null; then
        # The compiler the kernel was built with, from the kernel's own
        # release, with the libraries linux-kbuild's tools need.
        command -v patchelf >/dev/null || vdi__die "patchelf is missing (vdi__host_prereqs)"
        local closure
        mapfile -t closure < <(vdi__kbuild_closure "$suite" "gcc-$gcc_major" "linux-kbuild-$series=$debver")
        ((${#closure[@]})) || vdi__die "cannot resolve gcc-$gcc_major in $codename"
        vdi__log "toolchain for $rel: ${#closure[@]} packages of $codename (gcc-$gcc_major, binutils, libraries)"
        mkdir -p "$tmp/debs" "$tmp/tc"
        (cd "$tmp/debs" && vdi__apt_get "$codename" -qq download "${closure[@]}" >/dev/null)
        for p in "$tmp"/debs/*.deb; do dpkg-deb -x "$p" "$tmp/tc"; done
        rm -rf "$tmp/debs"
        vdi__relink_absolute "$tmp/tc"
        path="$dir/tc/usr/bin"
    fi

    mkdir -p "$(dirname "$dir")"
    mv "$tmp" "$dir"
    if [[ -n "$path" ]]; then
        # Patched in place: the loader and rpath are absolute paths.
        vdi__kbuild_patchelf "$dir/tc" "$dir/tc"
        # linux-kbuild's tools (fixdep, modpost, objtool, ...) are built for
        # that release too: they run with the same libraries.
        vdi__kbuild_patchelf "$dir/tc" "$dir/root/usr/lib"
    fi
    printf '%s\n' "$dir/root/usr/src/linux-headers-$rel" >"$dir/kdir"
    printf '%s\n' "$path" >"$dir/path"
    printf '%s\n' "$cc_text" >"$dir/cc"
    local got
    got="$(PATH="${path:+$path:}$PATH" "$cc" --version | head -n 1)" ||
        vdi__die "$cc does not run"
    vdi__log "kbuild for $rel: $(du -sh "$dir" | cut -f1), $got"
    touch "$dir/.complete"
}

# vdi_build_module KERNEL_INDEX SRC_DIR
vdi_build_module() (
    set -euo pipefail
    local i="$1" src="$2" kb kdir path key out tmp
    kb="${VDI_KBUILD_DIRS[$i]:-}"
    [[ -n "$kb" && -e "$kb/.complete" ]] ||
        { echo "vdi_build_module: no kbuild for kernel $i (provision with VDI_KBUILD=1)" >&2; exit 1; }
    kdir="$(cat "$kb/kdir")"
    path="$(cat "$kb/path")"
    key="$( (printf '%s\n' "$kb"; cat "$kb/cc"; cd "$src" &&
        find . -type f \( -name '*.[ch]' -o -name Kbuild -o -name Makefile \) -print0 |
        LC_ALL=C sort -z | xargs -0 sha256sum) | sha256sum | cut -c1-16)"
    out="$VDI_CACHE/modules/$(basename "$kdir" | sed 's/^linux-headers-//')/$key"
    if [[ ! -e "$out/.complete" ]]; then
        tmp="$(mktemp -d "${TMPDIR:-/tmp}/vdi-kmod.XXXXXX")"
        trap 'rm -rf "$tmp"' EXIT
        cp -a "$src/." "$tmp/"
        # BTF for modules needs pahole and the kernel's BTF: not wanted here.
        if ! PATH="${path:+$path:}$PATH" make -s -C "$kdir" M="$tmp" \
            CONFIG_DEBUG_INFO_BTF_MODULES= KCFLAGS=-Werror modules >"$tmp/build.log" 2>&1; then
            cat "$tmp/build.log" >&2
            exit 1
        fi
        if grep -qi 'warning' "$tmp/build.log"; then
            cat "$tmp/build.log" >&2
            echo "vdi_build_module: warnings (see above)" >&2
            exit 1
        fi
        mkdir -p "$out"
        local ko
        for ko in "$tmp"/*.ko; do
            objcopy --strip-debug "$ko" "$out/$(basename "$ko")"
        done
        touch "$out/.complete"
    fi
    printf '%s\n' "$out"
)
