#!/usr/bin/env bash
# Provides the LLVM 23.1 that `--features cuda` needs, from Debian's package archive instead of
# GitHub. burn's cuda backend (cubecl-cuda 0.11) always depends on cubecl-llvm with its NVPTX
# code generator, which links LLVM 23.1 statically. The build script of tracel-llvm-bundler
# downloads tracel's LLVM bundle from github.com unless a finished install sits in its cache
# (~/.local/share/tracel/tracel-llvm-23.1.0-4 with the marker file .tracel-llvm-installed);
# machines that reach only the package registries cannot download it. This script fills that
# cache with Debian unstable's llvm-23 (llvm-config), llvm-23-dev (headers, static libraries) and
# libpolly-23-dev (Polly, which Debian's LLVM links in): the same LLVM 23.1 release series, whose
# C API and ABI stay fixed within it.
#
# Every file is checked against Debian's signed index (InRelease, verified with gpgv and
# debian-archive-keyring), so a corrupted or substituted download is refused.
#
# Usage: scripts/setup-llvm.sh            (then `cargo build --release --features cuda`)
set -euo pipefail

bundle_name=tracel-llvm-23.1.0-4
dest="${XDG_DATA_HOME:-$HOME/.local/share}/tracel/$bundle_name"
marker="$dest/.tracel-llvm-installed"
llvm_major=23
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
suite=sid
keyring=/usr/share/keyrings/debian-archive-keyring.gpg

if [[ -f "$marker" ]]; then
    echo "LLVM for the cuda backend is already in $dest ($(cat "$dest/debian-version"))" >&2
    exit 0
fi
if [[ "$(uname -m)" != x86_64 ]]; then
    echo "setup-llvm.sh fetches Debian's amd64 packages; on $(uname -m) provide $dest yourself" >&2
    exit 1
fi

# llvm-config runs against these libraries; the linker needs their development links.
packages=()
require_tool() {
    command -v "$1" >/dev/null || packages+=("$2")
}
require_library() {
    ldconfig -p | grep -q "$1\.so " || packages+=("$2")
}
require_tool curl curl
require_tool xz xz-utils
require_tool gpgv gpgv
require_tool dpkg-deb dpkg
[[ -f "$keyring" ]] || packages+=(debian-archive-keyring)
require_library libz3 libz3-dev
require_library libzstd libzstd-dev
require_library libxml2 libxml2-dev
require_library libz zlib1g-dev
if ((${#packages[@]})); then
    apt-get update && apt-get install -y --no-install-recommends "${packages[@]}"
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

fetch() {
    curl --fail --silent --show-error --location --retry 3 -o "$2" "$mirror/$1"
}

# Fails unless FILE's SHA-256 is EXPECTED.
check_sha256() {
    local actual
    actual="$(sha256sum "$1" | cut -d' ' -f1)"
    if [[ "$actual" != "$2" ]]; then
        echo "setup-llvm.sh: $1 has SHA-256 $actual, the signed index says $2" >&2
        exit 1
    fi
}

fetch "dists/$suite/InRelease" "$work/InRelease"
gpgv --quiet --keyring "$keyring" "$work/InRelease" 2>"$work/gpgv.log" || {
    cat "$work/gpgv.log" >&2
    echo "setup-llvm.sh: Debian's $suite index is not signed by a key in $keyring" >&2
    exit 1
}
index_sha256="$(awk '$3 == "main/binary-amd64/Packages.xz" && length($1) == 64 { print $1; exit }' "$work/InRelease")"
fetch "dists/$suite/main/binary-amd64/Packages.xz" "$work/Packages.xz"
check_sha256 "$work/Packages.xz" "$index_sha256"
xz -dc "$work/Packages.xz" >"$work/Packages"

# Prints "FILENAME SHA256 VERSION" of PACKAGE in the index.
package_entry() {
    awk -v name="$1" '
        /^Package: / { matched = ($2 == name) }
        matched && /^Version: / { version = $2 }
        matched && /^Filename: / { file = $2 }
        matched && /^SHA256: / { sum = $2 }
        /^$/ && matched && file != "" { print file, sum, version; exit }
    ' "$work/Packages"
}

version=""
for package in "llvm-$llvm_major" "llvm-$llvm_major-dev" "libpolly-$llvm_major-dev"; do
    read -r file sha256 package_version < <(package_entry "$package") || true
    if [[ -z "${file:-}" ]]; then
        echo "setup-llvm.sh: Debian $suite no longer has $package" >&2
        exit 1
    fi
    case "$package_version" in
        1:$llvm_major.1.*) ;;
        *)
            echo "setup-llvm.sh: $package is $package_version, cubecl-llvm needs LLVM $llvm_major.1" >&2
            exit 1
            ;;
    esac
    version="$package_version"
    echo "downloading $package $package_version from Debian $suite" >&2
    fetch "$file" "$work/$package.deb"
    check_sha256 "$work/$package.deb" "$sha256"
    dpkg-deb -x "$work/$package.deb" "$work/root"
done

# Debian's include/ holds links into /usr/include/llvm-23; the bundle wants real directories.
staging="$dest.partial"
rm -rf "$staging"
mkdir -p "$staging/bin" "$staging/lib"
llvm_root="$work/root/usr/lib/llvm-$llvm_major"
cp "$llvm_root/bin/llvm-config" "$staging/bin/llvm-config.debian"
# Debian's llvm-config names Z3 by its path (/usr/lib/.../libz3.so), which the bundler turns
# into `-llibz3`; this wrapper gives system libraries as -l flags, as tracel's bundle does.
cat >"$staging/bin/llvm-config" <<'WRAPPER'
#!/bin/sh
output="$("$(dirname "$0")/llvm-config.debian" "$@")" || exit $?
case " $* " in
    *" --system-libs "*)
        for word in $output; do
            case "$word" in
                /*/lib*.so) name="${word##*/lib}" && printf '%s ' "-l${name%.so}" ;;
                *) printf '%s ' "$word" ;;
            esac
        done
        [ -f "$(dirname "$0")/../lib/libglibc_compat.a" ] && printf '%s' -lglibc_compat
        echo
        ;;
    *) printf '%s\n' "$output" ;;
esac
WRAPPER
chmod +x "$staging/bin/llvm-config"
cp -RL "$llvm_root/include" "$staging/include"
echo "$version" >"$staging/debian-version"
libraries="$("$llvm_root/bin/llvm-config" --link-static --libs)" || {
    echo "setup-llvm.sh: Debian's llvm-config does not run on this machine" >&2
    exit 1
}
# Exactly the static libraries llvm-config will tell the linker to use.
for flag in $libraries; do
    library="$llvm_root/lib/lib${flag#-l}.a"
    if [[ ! -f "$library" ]]; then
        echo "setup-llvm.sh: llvm-config names $flag, which no downloaded package holds" >&2
        exit 1
    fi
    cp "$library" "$staging/lib/"
done
# Debian unstable compiled LLVM against glibc 2.38 or newer, whose headers turn strtol and
# friends into __isoc23_* symbols; an older glibc (Debian 12: 2.36) lacks them.
printf '#include <stdlib.h>\nlong __isoc23_strtol(const char *, char **, int);\nint main(void) { return (int)__isoc23_strtol("0", 0, 0); }\n' >"$work/probe.c"
if ! cc -o "$work/probe" "$work/probe.c" 2>/dev/null; then
    echo "this C library lacks glibc 2.38's __isoc23_strtol: adding scripts/glibc-compat.c" >&2
    cc -O2 -fPIC -c "$(dirname "$0")/glibc-compat.c" -o "$work/glibc-compat.o"
    cc -o "$work/compat-test" "$(dirname "$0")/glibc-compat-test.c" "$work/glibc-compat.o"
    "$work/compat-test" || {
        echo "setup-llvm.sh: scripts/glibc-compat.c fails its test" >&2
        exit 1
    }
    ar rcs "$staging/lib/libglibc_compat.a" "$work/glibc-compat.o"
fi
touch "$staging/.tracel-llvm-installed"
rm -rf "$dest"
mv "$staging" "$dest"
echo "LLVM $("$dest/bin/llvm-config" --version) (Debian $version) is in $dest" >&2
