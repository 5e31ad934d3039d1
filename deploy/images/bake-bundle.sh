#!/usr/bin/env bash
# bake-bundle.sh cloud|edge BUNDLE_DIR: the image with the bundle at /opt/splitclip/bundle, tagged
# IMAGE-<bundle id> (e.g. localhost/splitclip-cloud:dev-b-9d2e1dbbf41bd2bd). Build the image first
# (`make images`). The image test mounts the bundle instead; docs/images.md.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
need podman
if [ $# -ne 2 ]; then
    echo "usage: bake-bundle.sh cloud|edge BUNDLE_DIR" >&2
    exit 2
fi
case "$1" in
cloud) image=$CLOUD_IMAGE ;;
edge) image=$EDGE_IMAGE ;;
*)
    echo "error: unknown image $1 (cloud or edge)" >&2
    exit 2
    ;;
esac
bundle=$2
if [ ! -f "$bundle/manifest.json" ]; then
    echo "error: $bundle is not a bundle (no manifest.json)" >&2
    exit 2
fi
id=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["bundle_id"])' "$bundle/manifest.json")
"${PODMAN[@]}" image exists "$image" || {
    echo "error: $image not found (build it with \`make images\`)" >&2
    exit 2
}
"${PODMAN[@]}" build --network=none "${ULIMITS[@]}" --build-arg "IMAGE=$image" \
    -f "$REPO_ROOT/deploy/images/Containerfile.bundle" -t "$image-$id" "$bundle"
echo "$image-$id: $(size_mb "$image-$id") MB, bundle $id at /opt/splitclip/bundle"
