#!/usr/bin/env bash
# Builds the Debian packages of keyless-edge, keyless-origin and keyless-certs with plain
# dpkg-deb, from binaries cargo has already built, laid out as each crate's
# [package.metadata.deb] (cargo-deb) describes: its assets, the systemd unit
# <crate>/debian/<package>.service, the maintainer scripts of <crate>/debian/ with
# #DEBHELPER# replaced by the systemd snippets cargo-deb would insert
# (packaging/autoscripts/), conffiles, md5sums and a copyright file.
#
#   packaging/build-debs.sh [--profile release|debug] [--out DIR] [--target-dir DIR]
#                           [--compress xz|gzip|none] [--no-strip] [PACKAGE...]
#
# --profile     which target/<profile>/ binaries to package (default release)
# --out         where the .deb files go (default <target-dir>/debian, as cargo-deb)
# --target-dir  cargo's target directory (default $CARGO_TARGET_DIR or ./target)
# --compress    dpkg-deb compression (default xz, as cargo-deb; gzip for debug)
# --no-strip    keep debug information (binaries are stripped by default, as cargo-deb)
# PACKAGE       keyless-edge, keyless-origin, keyless-certs (default: all three)
#
# It builds nothing with cargo: run `cargo build --release --locked -p keyless-edge
# -p keyless-origin -p keyless-certs` first. Prints the path of each package built.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
autoscripts="$root/packaging/autoscripts"

profile=release
out=""
target_dir="${CARGO_TARGET_DIR:-$root/target}"
compress=""
strip_binaries=1
packages=()

die() {
    echo "build-debs.sh: $*" >&2
    exit 1
}

while [ $# -gt 0 ]; do
    case "$1" in
        --profile) profile="${2:?--profile needs a value}"; shift 2 ;;
        --out) out="${2:?--out needs a value}"; shift 2 ;;
        --target-dir) target_dir="${2:?--target-dir needs a value}"; shift 2 ;;
        --compress) compress="${2:?--compress needs a value}"; shift 2 ;;
        --no-strip) strip_binaries=0; shift ;;
        -h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
        keyless-edge | keyless-origin | keyless-certs) packages+=("$1"); shift ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done
case "$profile" in
    release | debug) ;;
    *) die "--profile is release or debug, not $profile" ;;
esac
if [ -z "$compress" ]; then
    if [ "$profile" = release ]; then compress=xz; else compress=gzip; fi
fi
case "$compress" in
    xz | gzip | none) ;;
    *) die "--compress is xz, gzip or none, not $compress" ;;
esac
[ ${#packages[@]} -gt 0 ] || packages=(keyless-edge keyless-origin keyless-certs)
[ -n "$out" ] || out="$target_dir/debian"
command -v dpkg-deb >/dev/null || die "dpkg-deb is required (package dpkg)"

mkdir -p "$out"
out="$(cd "$out" && pwd)"
arch="$(dpkg --print-architecture)"
work="$(mktemp -d "${TMPDIR:-/tmp}/keyless-debs.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# The value of `key = "..."` in TOML table `table` of `file` (single-line strings only,
# which is what the crates' manifests use).
toml_string() {
    local file="$1" table="$2" key="$3"
    awk -v table="[$table]" -v key="$key" '
        /^\[/ { inside = ($0 == table); next }
        inside && $0 ~ "^" key "[ \t]*=[ \t]*\"" {
            sub("^[^=]*=[ \t]*\"", ""); sub("\"[ \t]*(#.*)?$", ""); print; exit
        }' "$file"
}

# The whole line `key = ...` of TOML table `table` (for the inline tables and arrays).
toml_line() {
    local file="$1" table="$2" key="$3"
    awk -v table="[$table]" -v key="$key" '
        /^\[/ { inside = ($0 == table); next }
        inside && $0 ~ "^" key "[ \t]*=" { print; exit }' "$file"
}

# The assets of [package.metadata.deb], one "source<TAB>dest<TAB>mode" line each (the
# manifests write one asset per line, as arrays of three strings).
toml_assets() {
    local file="$1"
    awk '
        /^\[/ { inside = ($0 == "[package.metadata.deb]"); next }
        inside && /^assets[ \t]*=[ \t]*\[/ { list = 1; next }
        list && /^\]/ { exit }
        list && /^[ \t]*\[/ {
            n = 0; line = $0
            while (match(line, /"[^"]*"/)) {
                v[++n] = substr(line, RSTART + 1, RLENGTH - 2)
                line = substr(line, RSTART + RLENGTH)
            }
            if (n != 3) { print "malformed asset line: " $0 > "/dev/stderr"; exit 1 }
            print v[1] "\t" v[2] "\t" v[3]
        }' "$file"
}

workspace_version="$(toml_string "$root/Cargo.toml" workspace.package version)"
[ -n "$workspace_version" ] || die "no [workspace.package] version in $root/Cargo.toml"

# Runtime dependencies on shared libraries: dpkg-shlibdeps when present (dpkg-dev, what
# cargo-deb's $auto uses), else from the binary's NEEDED entries and a table of the
# libraries our binaries link (an unknown one is an error, never a silent omission).
shlib_depends() {
    local pkgdir="$1" binary="$2"
    if command -v dpkg-shlibdeps >/dev/null; then
        (cd "$work" && dpkg-shlibdeps -O "$binary") | sed -n 's/^shlibs:Depends=//p'
        return
    fi
    command -v readelf >/dev/null || die "need dpkg-shlibdeps (dpkg-dev) or readelf (binutils)"
    local lib deps=()
    for lib in $(readelf -d "$binary" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
        case "$lib" in
            libc.so.6 | libm.so.6 | libpthread.so.0 | libdl.so.2 | librt.so.1 | ld-linux*) deps+=("libc6 (>= 2.34)") ;;
            libgcc_s.so.1) deps+=("libgcc-s1 (>= 4.2)") ;;
            libssl.so.3 | libcrypto.so.3) deps+=("libssl3 (>= 3.0.0)") ;;
            *) die "$pkgdir: $binary needs $lib, which build-debs.sh cannot map to a package" ;;
        esac
    done
    printf '%s\n' "${deps[@]}" | sort -u | paste -sd, - | sed 's/,/, /g'
}

# Expands one snippet of packaging/autoscripts/ as cargo-deb does, wrapped in its markers.
autoscript() {
    local snippet="$1" unit="$2" action="${3:-}"
    echo "# Automatically added by packaging/build-debs.sh (the snippet cargo-deb inserts)"
    sed -e "s/#UNITFILE#/$unit/g" -e "s/#UNITFILES#/$unit/g" \
        -e "s/#RESTART_ACTION#/$action/g" "$autoscripts/$snippet"
    echo "# End automatically added section"
}

build_package() {
    local pkg="$1" crate manifest stage desc ext section priority depends maintainer
    local copyright license scripts_dir units_line unit="" version
    crate="${pkg#keyless-}"
    manifest="$root/$crate/Cargo.toml"
    [ -f "$manifest" ] || die "$manifest not found"
    stage="$work/debian/$pkg"
    mkdir -p "$stage/DEBIAN"

    desc="$(toml_string "$manifest" package description)"
    license="$(toml_string "$root/Cargo.toml" workspace.package license)"
    maintainer="$(toml_string "$manifest" package.metadata.deb maintainer)"
    copyright="$(toml_string "$manifest" package.metadata.deb copyright)"
    ext="$(toml_string "$manifest" package.metadata.deb extended-description)"
    section="$(toml_string "$manifest" package.metadata.deb section)"
    priority="$(toml_string "$manifest" package.metadata.deb priority)"
    depends="$(toml_string "$manifest" package.metadata.deb depends)"
    scripts_dir="$(toml_string "$manifest" package.metadata.deb maintainer-scripts)"
    units_line="$(toml_line "$manifest" package.metadata.deb systemd-units)"
    [ -n "$maintainer" ] || die "$manifest: no [package.metadata.deb] maintainer"
    version="$workspace_version-1"

    # Assets: target/release/ means the binaries of the chosen profile (as in cargo-deb).
    local src dest mode built binaries=()
    while IFS=$'\t' read -r src dest mode; do
        built=0
        case "$src" in
            target/release/*)
                src="$target_dir/$profile/${src#target/release/}"
                built=1
                local flag=""
                [ "$profile" = debug ] || flag=" --$profile"
                [ -f "$src" ] || die "$src is not built (cargo build$flag -p $pkg)"
                ;;
            /*) ;;
            *) src="$root/$crate/$src" ;;
        esac
        [ -f "$src" ] || die "$manifest: asset $src does not exist"
        case "$dest" in
            */) dest="$dest$(basename "$src")" ;;
        esac
        install -D -m "$mode" "$src" "$stage/$dest"
        [ "$built" = 0 ] || binaries+=("$dest")
    done < <(toml_assets "$manifest")
    [ ${#binaries[@]} -gt 0 ] || die "$manifest: no target/release/ asset"

    if [ "$strip_binaries" = 1 ]; then
        if command -v strip >/dev/null; then
            local b
            for b in "${binaries[@]}"; do strip --strip-unneeded "$stage/$b"; done
        else
            echo "build-debs.sh: strip not found, packaging unstripped binaries" >&2
        fi
    fi

    # The systemd unit, found as cargo-deb finds it: <maintainer-scripts>/<package>.service.
    if [ -n "$units_line" ]; then
        [ -n "$scripts_dir" ] || die "$manifest: systemd-units needs maintainer-scripts"
        # Only this combination's snippets are reproduced here; say so rather than differ.
        if ! [[ "$units_line" =~ ^systemd-units[[:space:]]*=[[:space:]]*\{[[:space:]]*enable[[:space:]]*=[[:space:]]*true,[[:space:]]*start[[:space:]]*=[[:space:]]*false[[:space:]]*\}$ ]]; then
            die "$manifest: build-debs.sh implements systemd-units = { enable = true, start = false } only, not: $units_line"
        fi
        unit="$pkg.service"
        [ -f "$root/$crate/${scripts_dir%/}/$unit" ] || die "$root/$crate/${scripts_dir%/}/$unit not found"
        install -D -m 644 "$root/$crate/${scripts_dir%/}/$unit" "$stage/lib/systemd/system/$unit"
    fi

    # copyright, as cargo-deb writes it.
    mkdir -p "$stage/usr/share/doc/$pkg"
    {
        echo "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/"
        echo "Upstream-Name: $pkg"
        echo "Copyright: $copyright"
        echo "License: $license"
    } >"$stage/usr/share/doc/$pkg/copyright"
    chmod 644 "$stage/usr/share/doc/$pkg/copyright"

    # Maintainer scripts: the crate's, with #DEBHELPER# replaced by the unit's snippets
    # (enable = true, start = false, restart-after-upgrade: cargo-deb's defaults otherwise).
    local script frag
    for script in preinst postinst prerm postrm; do
        frag="$work/$pkg.$script.snippets"
        : >"$frag"
        if [ -n "$unit" ]; then
            case "$script" in
                postinst)
                    autoscript postinst-systemd-enable "$unit" >>"$frag"
                    autoscript postinst-systemd-restartnostart "$unit" try-restart >>"$frag"
                    ;;
                prerm) autoscript prerm-systemd-restart "$unit" >>"$frag" ;;
                postrm)
                    autoscript postrm-systemd "$unit" >>"$frag"
                    autoscript postrm-systemd-reload-only "$unit" >>"$frag"
                    ;;
            esac
        fi
        local user_script=""
        [ -z "$scripts_dir" ] || user_script="$root/$crate/${scripts_dir%/}/$script"
        if [ -n "$user_script" ] && [ -f "$user_script" ]; then
            grep -qx '#DEBHELPER#' "$user_script" || die "$user_script has no #DEBHELPER# line"
            awk -v frag="$frag" '
                $0 == "#DEBHELPER#" { while ((getline l < frag) > 0) print l; next }
                { print }' "$user_script" >"$stage/DEBIAN/$script"
        elif [ -s "$frag" ]; then
            { echo "#!/bin/sh"; echo "set -e"; cat "$frag"; } >"$stage/DEBIAN/$script"
        else
            continue
        fi
        chmod 755 "$stage/DEBIAN/$script"
    done

    # conffiles: the listed conf-files and every file under /etc (as debhelper does).
    : >"$work/$pkg.conffiles"
    if [ -d "$stage/etc" ]; then
        (cd "$stage" && find etc -type f | sed 's|^|/|') >>"$work/$pkg.conffiles"
    fi
    local listed
    listed="$(toml_line "$manifest" package.metadata.deb conf-files | grep -o '"[^"]*"' | tr -d '"' || true)"
    for f in $listed; do
        [ -f "$stage$f" ] || die "$manifest: conf-file $f is not among the assets"
        echo "$f" >>"$work/$pkg.conffiles"
    done
    sort -u "$work/$pkg.conffiles" >"$stage/DEBIAN/conffiles"
    [ -s "$stage/DEBIAN/conffiles" ] || rm "$stage/DEBIAN/conffiles"

    # Depends: $auto expanded to the binaries' shared libraries.
    if [[ "$depends" == *"\$auto"* ]]; then
        local auto="" b d
        for b in "${binaries[@]}"; do
            d="$(shlib_depends "$pkg" "debian/$pkg/$b")"
            auto="${auto:+$auto, }$d"
        done
        auto="$(echo "$auto" | tr ',' '\n' | sed 's/^ *//' | sed '/^$/d' | sort -u | paste -sd, - | sed 's/,/, /g')"
        depends="${depends//\$auto/$auto}"
    fi

    (cd "$stage" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z |
        xargs -0 md5sum) >"$stage/DEBIAN/md5sums"
    chmod 644 "$stage/DEBIAN/md5sums"

    local size
    size="$(du -sk --exclude=DEBIAN "$stage" | cut -f1)"
    {
        echo "Package: $pkg"
        echo "Version: $version"
        echo "Architecture: $arch"
        echo "Maintainer: $maintainer"
        echo "Installed-Size: $size"
        [ -z "$depends" ] || echo "Depends: $depends"
        [ -z "$section" ] || echo "Section: $section"
        [ -z "$priority" ] || echo "Priority: $priority"
        echo "Description: $desc"
        [ -z "$ext" ] || echo "$ext" | fold -s -w 78 | sed 's/ *$//; s/^/ /'
    } >"$stage/DEBIAN/control"

    local deb="$out/${pkg}_${version}_${arch}.deb" level=()
    [ "$compress" != gzip ] || level=(-z1)
    dpkg-deb --build --root-owner-group -Z"$compress" "${level[@]}" "$stage" "$deb" >/dev/null
    echo "$deb"
}

# dpkg-shlibdeps looks for debian/control in its working directory.
mkdir -p "$work/debian"
{
    echo "Source: keyless"
    for pkg in "${packages[@]}"; do
        printf '\nPackage: %s\nArchitecture: any\n' "$pkg"
    done
} >"$work/debian/control"

for pkg in "${packages[@]}"; do
    build_package "$pkg"
done
