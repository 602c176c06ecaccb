#!/usr/bin/env bash
# Container-free install test of a hearth .deb:  packaging/test-deb.sh dist/hearth_<version>_<arch>.deb
#
# Checks the control fields, conffiles and maintainer scripts, unpacks the package with `dpkg-deb -x` into a scratch
# root, verifies the unit with `systemd-analyze verify` (when the tool is there), then runs the packaged binary with
# the packaged /etc/hearth/hearth.toml through packaging/smoke-test.sh (under qemu-aarch64-static for arm64 on an
# x86_64 host): config check, user creation, READY=1, a message over HTTP, backup, SIGTERM, restore.
set -euo pipefail
deb=${1:?usage: test-deb.sh FILE.deb}
here=$(cd "$(dirname "$0")" && pwd)
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT

echo "== $deb"
field() { dpkg-deb -f "$deb" "$1"; }
echo "package $(field Package) $(field Version) $(field Architecture); depends: $(field Depends)"
[ "$(field Package)" = hearth ]
case "$(field Depends)" in *"libc6 (>= 2.31)"*) ;; *) echo "test-deb: Depends lacks libc6 (>= 2.31)" >&2; exit 1 ;; esac

# Contents and control scripts.
dpkg-deb -c "$deb" > "$root/contents"
for path in ./usr/bin/hearth ./etc/hearth/hearth.toml ./usr/lib/systemd/system/hearth.service \
    ./usr/share/doc/hearth/README.md ./usr/share/doc/hearth/examples/hearth.example.toml; do
    grep -q " $path\$" "$root/contents" || { echo "test-deb: $path missing from the package" >&2; cat "$root/contents"; exit 1; }
done
grep -q -- "-rw-r----- .* ./etc/hearth/hearth.toml$" "$root/contents" || { echo "test-deb: hearth.toml should be mode 0640" >&2; exit 1; }
dpkg-deb -e "$deb" "$root/control"
grep -qx /etc/hearth/hearth.toml "$root/control/conffiles" || { echo "test-deb: /etc/hearth/hearth.toml is not a conffile" >&2; exit 1; }
for s in postinst postrm prerm; do
    [ -f "$root/control/$s" ] && sh -n "$root/control/$s"
done
grep -q "adduser --system" "$root/control/postinst"
grep -q "deb-systemd-helper" "$root/control/postinst" || { echo "test-deb: postinst lacks the systemd unit handling" >&2; exit 1; }
# Data is deleted on purge only: every rm of /var/lib/hearth sits in the purge branch.
awk '/"\$1" = "purge"/{p=1} /^fi/{p=0} /rm -rf \/var\/lib\/hearth/ && !p {bad=1} END{exit bad}' "$root/control/postrm" \
    || { echo "test-deb: postrm deletes data outside purge" >&2; exit 1; }
echo "control: conffiles, maintainer scripts ok"

dpkg-deb -x "$deb" "$root/fs"
unit=$root/fs/usr/lib/systemd/system/hearth.service
for d in Type=notify User=hearth StateDirectory=hearth ProtectSystem=strict ProtectHome=yes NoNewPrivileges=yes \
    PrivateTmp=yes "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX" SystemCallFilter=@system-service; do
    grep -qx "$d" "$unit" || { echo "test-deb: unit lacks $d" >&2; exit 1; }
done
if command -v systemd-analyze >/dev/null; then
    # Verify against the unpacked binary (the unit names /usr/bin/hearth, which is not installed here).
    mkdir -p "$root/verify"
    sed "s|/usr/bin/hearth|$root/fs/usr/bin/hearth|g" "$unit" > "$root/verify/hearth.service"
    systemd-analyze verify "$root/verify/hearth.service"
    echo "systemd-analyze verify: ok"
else
    echo "systemd-analyze not installed: unit verification skipped"
fi

"$here/smoke-test.sh" --config "$root/fs/etc/hearth/hearth.toml" "$root/fs/usr/bin/hearth"
echo "== $deb passed"
