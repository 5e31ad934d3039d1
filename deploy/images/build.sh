#!/usr/bin/env bash
# `make images`: the base (build-base.sh, skipped when it exists), then the cloud and edge images with
# podman. Usage: build.sh [cloud] [edge] (default both). Prints each image's build time and size.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
need podman

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(cloud edge)
"$(dirname "${BASH_SOURCE[0]}")/build-base.sh"

# --network=host: the build steps reach the package index through the host's network; the host's CA
# bundle is mounted over the base's so pip trusts what the host trusts (a proxy's CA included).
BUILD_FLAGS=(--network=host -v "$HOST_CERTS:/etc/ssl/certs:ro" "${ULIMITS[@]}"
    --build-arg "BASE=$BASE_IMAGE" --build-arg "PIP_INDEX_URL=$PIP_INDEX_URL")
if [ -n "${PODMAN_BUILD_FLAGS:-}" ]; then # e.g. PODMAN_BUILD_FLAGS=--no-cache
    read -r -a extra <<<"$PODMAN_BUILD_FLAGS"
    BUILD_FLAGS+=("${extra[@]}")
fi

cd "$REPO_ROOT"
for target in "${targets[@]}"; do
    case "$target" in
    cloud) image=$CLOUD_IMAGE ;;
    edge) image=$EDGE_IMAGE ;;
    *)
        echo "error: unknown image $target (cloud or edge)" >&2
        exit 2
        ;;
    esac
    start=$(date +%s)
    echo "== $image (Dockerfile.$target)"
    "${PODMAN[@]}" build "${BUILD_FLAGS[@]}" -f "Dockerfile.$target" -t "$image" .
    echo "== $image: built in $(($(date +%s) - start)) s, $(size_mb "$image") MB"
done
