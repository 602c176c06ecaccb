#!/bin/sh
# Writes the configuration the Debian package installs as /etc/hearth/hearth.toml: the commented example with the
# database under /var/lib/hearth. tests/packaging.rs checks that packaging/debian/hearth.toml is this output, so
# after changing packaging/hearth.example.toml run: packaging/debian/make-config.sh > packaging/debian/hearth.toml
set -eu
here=$(dirname "$0")
{
    echo "# /etc/hearth/hearth.toml, installed by the hearth Debian package (a conffile: upgrades keep your edits)."
    echo "# Set server_name before the first 'systemctl start hearth'; check edits with:"
    echo "#   hearth -c /etc/hearth/hearth.toml config check"
    echo "#"
    sed -e 's|^path = "hearth.db"$|path = "/var/lib/hearth/hearth.db"|' "$here/../hearth.example.toml"
}
