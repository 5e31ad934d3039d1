# Sourced by the image scripts: the podman command line, the image names and the rlimits that work on
# these machines (docs/images.md says why each flag is there). Every value can be overridden from the
# environment, e.g. PODMAN_RUNTIME=crun on a host with a pure cgroup v2 hierarchy.

# crun fails here (hybrid cgroup mode); runc with cgroupfs works without systemd.
PODMAN=(podman --runtime "${PODMAN_RUNTIME:-runc}" --cgroup-manager="${PODMAN_CGROUP_MANAGER:-cgroupfs}")
# Containers may not raise rlimits above the host's, and podman's defaults would (nofile 1048576).
ULIMITS=(--ulimit "nofile=${ULIMIT_NOFILE:-1024:1024}" --ulimit "nproc=${ULIMIT_NPROC:-4096:4096}")

BASE_IMAGE=${BASE_IMAGE:-localhost/splitclip-base:bookworm}
TAG=${TAG:-dev}  # the dev overlay (deploy/k8s/overlays/dev) names these :dev images
CLOUD_IMAGE=${CLOUD_IMAGE:-localhost/splitclip-cloud:$TAG}
EDGE_IMAGE=${EDGE_IMAGE:-localhost/splitclip-edge:$TAG}
# The host's CA bundle, mounted into every build step so pip can reach the index over --network=host.
HOST_CERTS=${HOST_CERTS:-/etc/ssl/certs}
PIP_INDEX_URL=${PIP_INDEX_URL:-https://pypi.org/simple}

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

need() {
    command -v "$1" >/dev/null 2>&1 || {
        echo "error: $1 not found (Debian: apt-get install -y podman mmdebstrap runc)" >&2
        exit 2
    }
}

size_mb() { # size_mb IMAGE: its size as podman reports it, in MB (10^6 bytes)
    "${PODMAN[@]}" image inspect --format '{{.Size}}' "$1" | awk '{printf "%.0f", $1 / 1e6}'
}
