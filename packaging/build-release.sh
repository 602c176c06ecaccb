#!/usr/bin/env bash
# Builds every release artifact into dist/ from a checkout, in one command:
#
#   packaging/build-release.sh            # build, package, then test both .debs (arm64 under qemu)
#   packaging/build-release.sh --no-test  # build and package only
#
# For x86_64 and aarch64 (64-bit Raspberry Pi OS), each needing glibc 2.31 or newer (Debian 11 / Raspberry Pi OS
# bullseye and later), built with cargo-zigbuild:
#   dist/hearth-<version>-<arch>-linux-gnu.tar.gz   hearth, hearth.example.toml, hearth.service, README.md
#   dist/hearth_<version>_<amd64|arm64>.deb         cargo-deb package (see [package.metadata.deb] in Cargo.toml)
#   dist/SHA256SUMS                                 checksums of all of the above (sha256sum -c SHA256SUMS)
#
# Installs what it lacks: the rustup targets, cargo-zigbuild and cargo-deb (crates.io), zig (the `ziglang` PyPI
# package) and, for the tests, qemu-user-static and libc6-arm64-cross (apt). Two release builds with fat LTO take
# 10-20 minutes each on a 2-core machine.
set -euo pipefail
cd "$(dirname "$0")/.."

GLIBC=2.31
TARGETS=(x86_64-unknown-linux-gnu aarch64-unknown-linux-gnu)
run_tests=true
[ "${1:-}" = "--no-test" ] && run_tests=false
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
target_dir=${CARGO_TARGET_DIR:-target}
dist=dist
started=$(date +%s)

say() { echo "== $*"; }

apt_install() {
    command -v apt-get >/dev/null || { echo "build-release: please install $*" >&2; exit 1; }
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo=sudo
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null \
        || { DEBIAN_FRONTEND=noninteractive $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null; }
}

say "tools"
if command -v rustup >/dev/null; then
    installed=$(rustup target list --installed)
    for t in "${TARGETS[@]}"; do
        grep -qx "$t" <<<"$installed" || rustup target add "$t"
    done
fi
command -v cargo-zigbuild >/dev/null || cargo install --locked cargo-zigbuild
if ! command -v zig >/dev/null && ! python3 -c 'import ziglang' 2>/dev/null; then
    python3 -m pip install --quiet ziglang || python3 -m pip install --quiet --break-system-packages ziglang
fi
cargo deb --version 2>/dev/null | grep -q ' 3\.' || cargo install --locked cargo-deb --version '^3.8'
command -v readelf >/dev/null || apt_install binutils

rm -rf "$dist"
mkdir -p "$dist"
mtime=$(git log -1 --format=%ct 2>/dev/null || date +%s)
summary=()
for t in "${TARGETS[@]}"; do
    arch=${t%%-*}
    case $arch in x86_64) debarch=amd64 ;; aarch64) debarch=arm64 ;; esac
    say "cargo zigbuild --release --target $t.$GLIBC"
    build_started=$(date +%s)
    cargo zigbuild --release --locked --bin hearth --target "$t.$GLIBC"
    build_s=$(( $(date +%s) - build_started ))
    bin=$target_dir/$t/release/hearth

    # The newest glibc symbol version the binary needs must be <= $GLIBC.
    needs=$(readelf -W --version-info "$bin" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -Vu | tail -1)
    if [ "$(printf '%s\n%s\n' "$needs" "$GLIBC" | sort -V | tail -1)" != "$GLIBC" ]; then
        echo "build-release: $bin needs glibc $needs, more than $GLIBC" >&2
        exit 1
    fi
    size=$(stat -c %s "$bin")

    stage=hearth-$version-$arch-linux-gnu
    mkdir -p "$dist/$stage"
    install -m 0755 "$bin" "$dist/$stage/hearth"
    install -m 0644 packaging/hearth.example.toml packaging/hearth.service README.md "$dist/$stage/"
    tar --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$mtime" -C "$dist" -czf "$dist/$stage.tar.gz" "$stage"
    rm -rf "${dist:?}/$stage"

    say "cargo deb --target $t"
    cargo deb --no-build --no-strip --target "$t" --output "$dist/"
    summary+=("$t: binary $size bytes ($(( size / 1024 / 1024 )) MiB), needs glibc >= $needs, built in ${build_s} s")
done

(cd "$dist" && sha256sum -- *.tar.gz *.deb > SHA256SUMS)
say "dist/"
ls -l "$dist"
cat "$dist/SHA256SUMS"

if $run_tests; then
    if [ "$(uname -m)" != aarch64 ]; then
        command -v qemu-aarch64-static >/dev/null || apt_install qemu-user-static
        [ -e /usr/aarch64-linux-gnu/lib/ld-linux-aarch64.so.1 ] || apt_install libc6-arm64-cross
    fi
    command -v jq >/dev/null || apt_install jq
    command -v curl >/dev/null || apt_install curl
    for deb in "$dist"/*.deb; do
        say "packaging/test-deb.sh $deb"
        packaging/test-deb.sh "$deb"
    done
fi

say "done in $(( $(date +%s) - started )) s"
printf '%s\n' "${summary[@]}"
