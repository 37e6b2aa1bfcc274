#!/usr/bin/env bash
# Builds the Debian packages edgerec (the appliance) and edgerec-lkm (the key manager: its
# unit and config, for another machine than the recorders) from an edgerec binary already
# built — nothing is compiled here:
#
#   cargo build --release --locked -p edgerec
#   bash deploy/debian/build.sh target/release/edgerec [OUTDIR]     # default target/debian
#
# Staged trees packed with `dpkg-deb --build --root-owner-group` (no debhelper, so nothing
# enables or starts a unit: they ship disabled until a key is configured). .ci/run packs
# the binary the tests built, checks the packages with lintian, installs, runs and purges
# them (tests/it has no part in it: it changes the machine).
set -euo pipefail
umask 022
bin=${1:?usage: build.sh EDGEREC_BINARY [OUTDIR]}
out=${2:-target/debian}
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
upstream=$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/Cargo.toml" | head -n1)
version="$upstream-1"
arch=$(dpkg --print-architecture)
maintainer="edgerec maintainers <edgerec@example.org>"
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$out"
# Only this build's packages in OUTDIR (CI installs what it finds there).
rm -f "$out"/edgerec_*.deb "$out"/edgerec-lkm_*.deb
# The changelog's date: the last commit's (reproducible), else now.
when=${SOURCE_DATE_EPOCH:-$(git -c safe.directory="$root" -C "$root" log -1 --format=%ct 2>/dev/null || true)}
case $when in '' | *[!0-9]*) when=$(date +%s) ;; esac

# The units as packaged: the binary in /usr/bin, a system user the package makes (the
# config is group-readable by it), /etc/edgerec made by the package rather than the unit.
unit() {
  sed -e 's#/usr/local/bin/edgerec#/usr/bin/edgerec#g' \
      -e 's#^DynamicUser=yes#User=edgerec\nGroup=edgerec#' \
      -e 's#^\# Its own user, created by systemd;#\# Its own system user, made by the package;#' \
      -e 's#^\# Install: the binary at /usr/bin/edgerec; a system user that owns the key store:#\# Installed by the edgerec-lkm package, with the system user that owns the key store;#' \
      -e '/useradd --system/d' \
      -e '/^ConfigurationDirectory/d' "$root/deploy/$1"
}

# /usr/share/doc/PACKAGE: copyright, changelog.
docs() {
  local p=$1 name=$2
  install -d -m 0755 "$p/usr/share/doc/$name"
  cat >"$p/usr/share/doc/$name/copyright" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: edgerec
Source: https://github.com/edgerec/edgerec

Files: *
Copyright: 2026 the edgerec authors
License: Apache-2.0

License: Apache-2.0
 On Debian systems, the full text of the Apache License, Version 2.0 can be found
 in /usr/share/common-licenses/Apache-2.0.
EOF
  chmod 0644 "$p/usr/share/doc/$name/copyright"
  printf '%s (%s) unstable; urgency=medium\n\n  * Packaged from the edgerec tree (deploy/debian/build.sh).\n\n -- %s  %s\n' \
    "$name" "$version" "$maintainer" "$(date -R -u -d "@$when")" |
    gzip -9n >"$p/usr/share/doc/$name/changelog.Debian.gz"
  chmod 0644 "$p/usr/share/doc/$name/changelog.Debian.gz"
  # Not an upload to Debian's archive: there is no ITP bug to close.
  install -d -m 0755 "$p/usr/share/lintian/overrides"
  printf '%s: initial-upload-closes-no-bugs\n' "$name" >"$p/usr/share/lintian/overrides/$name"
  chmod 0644 "$p/usr/share/lintian/overrides/$name"
}

control() {
  local p=$1 name=$2 depends=$3 summary=$4 body=$5
  install -d -m 0755 "$p/DEBIAN"
  cat >"$p/DEBIAN/control" <<EOF
Package: $name
Version: $version
Architecture: $arch
Maintainer: $maintainer
Installed-Size: $(du -sk --apparent-size --exclude=DEBIAN "$p" | cut -f1)
Depends: $depends
Section: net
Priority: optional
Description: $summary
$body
EOF
  for script in postinst prerm postrm; do
    if [ -f "$here/$name.$script" ]; then
      install -m 0755 "$here/$name.$script" "$p/DEBIAN/$script"
    fi
  done
  printf '/etc/edgerec/%s\n' "$6" >"$p/DEBIAN/conffiles"
  (cd "$p" && find . -path ./DEBIAN -prune -o -type f -printf '%P\n' | LC_ALL=C sort |
    xargs md5sum) >"$p/DEBIAN/md5sums"
  chmod 0644 "$p/DEBIAN/md5sums" "$p/DEBIAN/control" "$p/DEBIAN/conffiles"
}

# --- edgerec ---------------------------------------------------------------------------
p=$stage/edgerec
install -D -m 0755 "$bin" "$p/usr/bin/edgerec"
strip --strip-unneeded --remove-section=.comment --remove-section=.note "$p/usr/bin/edgerec"
install -d -m 0755 "$p/lib/systemd/system" "$p/usr/share/man/man1"
unit edgerec.service >"$p/lib/systemd/system/edgerec.service"
chmod 0644 "$p/lib/systemd/system/edgerec.service"
install -D -m 0644 "$here/edgerec.toml" "$p/etc/edgerec/edgerec.toml"
"$p/usr/bin/edgerec" man "$stage/man"
for page in "$stage"/man/*.1; do
  gzip -9n -c "$page" >"$p/usr/share/man/man1/$(basename "$page").gz"
  chmod 0644 "$p/usr/share/man/man1/$(basename "$page").gz"
done
docs "$p" edgerec
install -m 0644 "$root/samples/edgerec.toml" "$p/usr/share/doc/edgerec/edgerec.toml.example"
control "$p" edgerec "libc6 (>= 2.34), libgcc-s1 (>= 4.2), adduser" \
  "on-premises recording appliance for contact-center calls" \
  " edgerec receives the RTP audio of calls (from a port range, or as a SIPREC
 recording server), seals every recording chunk by chunk under a fresh AES-256
 data key sealed to the organisation's RSA public key, and delivers the sealed
 packages to a directory, S3 or HTTP store with retry, never losing what it
 accepted. The private key never sits on the appliance.
 .
 The package holds the binary (the appliance, the offline tools and the key
 manager), the appliance's systemd unit (installed disabled) and its
 configuration." edgerec.toml
dpkg-deb --build --root-owner-group "$p" "$out/edgerec_${version}_${arch}.deb" >/dev/null

# --- edgerec-lkm -----------------------------------------------------------------------
p=$stage/edgerec-lkm
install -d -m 0755 "$p/lib/systemd/system"
unit edgerec-lkm.service >"$p/lib/systemd/system/edgerec-lkm.service"
chmod 0644 "$p/lib/systemd/system/edgerec-lkm.service"
install -D -m 0644 "$here/lkm.toml" "$p/etc/edgerec/lkm.toml"
docs "$p" edgerec-lkm
control "$p" edgerec-lkm "edgerec (= $version), adduser" \
  "organisation's key manager for edgerec recordings" \
  " The Local Key Manager holds an organisation's private keys (under a master key
 or AWS KMS), never returns them, rotates them, and unwraps data keys over HTTPS
 for credentials whose role allows it, each unwrap answered only once its line
 is in a keyed, hash-chained audit log.
 .
 It belongs on another machine than the recorders. The package holds its
 systemd unit (installed disabled) and configuration; the binary is edgerec's." lkm.toml
dpkg-deb --build --root-owner-group "$p" "$out/edgerec-lkm_${version}_${arch}.deb" >/dev/null

ls "$out"/*.deb
