#!/usr/bin/env bash
# Build the images' base, localhost/splitclip-base:bookworm: a Debian bookworm root file system made
# with mmdebstrap (python3 = 3.11, python3-venv, CA certificates, libgomp1 for ONNX Runtime) and
# imported into podman. The Dockerfiles take it as their BASE build argument, because no registry
# can be reached from these machines to pull a python image. Skips the work when the image exists,
# unless FORCE=1.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
need podman
need mmdebstrap

if [ "${FORCE:-0}" != 1 ] && "${PODMAN[@]}" image exists "$BASE_IMAGE"; then
    echo "base: $BASE_IMAGE exists ($(size_mb "$BASE_IMAGE") MB; FORCE=1 rebuilds it)"
    exit 0
fi

MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
PACKAGES=python3,python3-venv,ca-certificates,libgomp1${BASE_EXTRA_PACKAGES:+,$BASE_EXTRA_PACKAGES}

work=$(mktemp -d /tmp/splitclip-base.XXXXXX)
trap 'rm -rf "$work"' EXIT
start=$(date +%s)
echo "base: mmdebstrap bookworm ($PACKAGES) ..."
# minbase: Essential packages and apt only. merged-/usr set up by mmdebstrap's hook rather than by the
# usrmerge package, which would pull in the whole of perl (47 MB). No documentation, man pages or locales in the image, and
# no apt lists left behind. stdin is closed: mmdebstrap would read sources.list lines from a pipe.
mmdebstrap --variant=minbase --mode="${MMDEBSTRAP_MODE:-auto}" --format=tar \
    --include="$PACKAGES" \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    --aptopt='APT::Install-Recommends "false"' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin "$1"/var/log/*.log' \
    bookworm "$work/rootfs.tar" \
    "deb $MIRROR bookworm main" \
    "deb $MIRROR bookworm-updates main" \
    "deb $SECURITY_MIRROR bookworm-security main" </dev/null

"${PODMAN[@]}" import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/bash"]' \
    --message "splitclip base: Debian bookworm minbase + $PACKAGES" \
    "$work/rootfs.tar" "$BASE_IMAGE" >/dev/null
echo "base: $BASE_IMAGE built in $(($(date +%s) - start)) s, $(size_mb "$BASE_IMAGE") MB"
"${PODMAN[@]}" run --rm --network=none "${ULIMITS[@]}" "$BASE_IMAGE" python3 --version
