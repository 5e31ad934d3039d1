#!/usr/bin/env bash
# `make image-test` (not part of `make test`): builds the base and both images, then on the host network
#   1. starts the cloud container with the demo bundle mounted read-only, waits until it serves;
#   2. starts the edge container with its own entrypoint (`splitclip edge watch`, the DaemonSet's
#      command) pointed at that cloud, drops a demo image into its inbox: answered in split mode;
#   3. stops the cloud container, drops a second image: the same edge process answers it locally,
#      with the reason;
#   4. checks the edge image has no torch and no ray and both run as uid 10001;
# and prints both image sizes and the total time. Containers and the scratch directory are removed on
# exit. CLOUD_CMD=serve starts the cloud with `serve run deploy/serve_config.yaml` (the Serve CLI,
# fixed ports 9000 / 8000, no Redis) instead of `splitclip cloud` (free ports, embedded Valkey).
# SKIP_BUILD=1 uses the images as they are. BUNDLE=DIR picks another bundle (default bundles/demo);
# EDGE_CUT the edge's SPLITCLIP_CUT (default 2, a fixed split; auto lets the planner choose).
set -euo pipefail
here=$(dirname "${BASH_SOURCE[0]}")
source "$here/common.sh"
need podman
t0=$(date +%s)

BUNDLE=$(cd "${BUNDLE:-$REPO_ROOT/bundles/demo}" 2>/dev/null && pwd) || BUNDLE=
if [ -z "$BUNDLE" ] || [ ! -f "$BUNDLE/manifest.json" ]; then
    echo "error: no bundle at ${BUNDLE:-bundles/demo} (build the demo bundle with \`make demo\`, or set BUNDLE=DIR)" >&2
    exit 2
fi
CLOUD_CMD=${CLOUD_CMD:-cli}
CLOUD_TIMEOUT_S=${CLOUD_TIMEOUT_S:-300}
FRAME_TIMEOUT_S=${FRAME_TIMEOUT_S:-180}
EDGE_CUT=${EDGE_CUT:-2}

if [ "${SKIP_BUILD:-0}" != 1 ]; then
    "$here/build.sh" cloud edge
fi
build_s=$(($(date +%s) - t0))

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
work=$(mktemp -d /tmp/splitclip-image-test.XXXXXX)
cloud=splitclip-image-test-cloud-$$
edge=splitclip-image-test-edge-$$
cleanup() {
    for c in "$cloud" "$edge"; do
        "${PODMAN[@]}" rm --ignore -f -t 5 "$c" >/dev/null 2>&1 || true
    done
    rm -rf "$work"
}
trap cleanup EXIT

# wait_for CONTAINER TIMEOUT_S WHAT CHECK...: run CHECK every 2 s until it succeeds; fail, with the
# container's last log lines, if the container exits or TIMEOUT_S pass first.
wait_for() {
    local container=$1 timeout_s=$2 what=$3 t=$(date +%s)
    shift 3
    until "$@"; do
        if [ "$("${PODMAN[@]}" inspect --format '{{.State.Running}}' "$container")" != true ]; then
            "${PODMAN[@]}" logs "$container" 2>&1 | tail -40 >&2
            echo "error: container $container exited before $what" >&2
            exit 1
        fi
        if [ $(($(date +%s) - t)) -gt "$timeout_s" ]; then
            "${PODMAN[@]}" logs "$container" 2>&1 | tail -40 >&2
            echo "error: no $what within $timeout_s s" >&2
            exit 1
        fi
        sleep 2
    done
}
logged() { "${PODMAN[@]}" logs "$1" 2>&1 | grep -q "$2"; }

# The edge runs as uid 10001: its spool (inbox, done, results) must be writable by it.
mkdir -p "$work/spool/inbox" "$work/config"
cp "$REPO_ROOT/models/demo-labels.txt" "$work/config/labels.txt"
chmod -R a+rwX "$work"

case "$CLOUD_CMD" in
cli)
    port=$(free_port)
    cloud_args=(splitclip cloud --port "$port" --http-port "$(free_port)" --num-cpus 2)
    ;;
serve)
    port=9000
    cloud_args=(serve run deploy/serve_config.yaml)
    for p in 9000 8000; do # the config's ports: on the host network they must be free
        python3 -c 'import socket, sys; socket.socket().bind(("0.0.0.0", int(sys.argv[1])))' "$p" 2>/dev/null || {
            echo "error: port $p is in use on this host; CLOUD_CMD=serve needs 9000 and 8000 (deploy/serve_config.yaml)" >&2
            exit 2
        }
    done
    ;;
*)
    echo "error: CLOUD_CMD is cli or serve, not $CLOUD_CMD" >&2
    exit 2
    ;;
esac
# Ray's object store lives in /dev/shm, sized 30 % of the host's memory, or in /tmp (slowly, with a
# warning) when /dev/shm is smaller than that: --shm-size gives it 1 GB, and the store is capped below
# that. Frames up to 8 MiB travel inline anyway (RAY_max_direct_call_object_size).
SHM_SIZE=${SHM_SIZE:-1g}
OBJECT_STORE_BYTES=${OBJECT_STORE_BYTES:-$((768 << 20))}
echo "== cloud: ${cloud_args[*]} (host network, gRPC port $port, bundle $BUNDLE read-only)"
"${PODMAN[@]}" run -d --name "$cloud" --network=host "${ULIMITS[@]}" \
    --shm-size="$SHM_SIZE" -e RAY_DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES="$OBJECT_STORE_BYTES" \
    -v "$BUNDLE:/opt/splitclip/bundle:ro" "$CLOUD_IMAGE" "${cloud_args[@]}" >/dev/null
cloud_t0=$(date +%s)
# `splitclip cloud` prints "gRPC on" once Serve runs the app; under `serve run`, ask Serve inside the
# container whether the application is RUNNING.
serving() {
    case "$CLOUD_CMD" in
    cli) logged "$cloud" "gRPC on " ;;
    serve) "${PODMAN[@]}" exec "$cloud" python -c '
import ray, sys
from ray import serve
ray.init(address="auto", logging_level="ERROR")
app = serve.status().applications.get("splitclip")
sys.exit(0 if app is not None and app.status == "RUNNING" else 1)' >/dev/null 2>&1 ;;
    esac
}
wait_for "$cloud" "$CLOUD_TIMEOUT_S" "the cloud serving" serving
cloud_up_s=$(($(date +%s) - cloud_t0))
"${PODMAN[@]}" logs "$cloud" 2>&1 | grep -E "gRPC on |Imported and built app" | tail -1
echo "== cloud serving after $cloud_up_s s"

# A fixed cut: with `auto` the planner may answer a frame locally while the cloud is up, because it is
# faster here (reason "planned"), and the point is split, then local because the cloud is gone.
echo "== edge: its entrypoint (splitclip edge watch /var/lib/splitclip/inbox ...), SPLITCLIP_CLOUD=127.0.0.1:$port, SPLITCLIP_CUT=$EDGE_CUT"
"${PODMAN[@]}" run -d --name "$edge" --network=host "${ULIMITS[@]}" \
    -v "$work/spool:/var/lib/splitclip" -v "$work/config:/etc/splitclip/config:ro" \
    -v "$BUNDLE:/opt/splitclip/bundle:ro" -e "SPLITCLIP_CLOUD=127.0.0.1:$port" -e "SPLITCLIP_CUT=$EDGE_CUT" \
    "$EDGE_IMAGE" >/dev/null
# the node logs "watching ..." once it has loaded the bundle, measured its profile and said Hello
wait_for "$edge" "$FRAME_TIMEOUT_S" "the edge node watching its inbox" logged "$edge" "watching"
"${PODMAN[@]}" logs "$edge" 2>&1 | grep -m1 "watching"

results=$work/spool/results.jsonl
has_answer() { [ -f "$results" ] && [ "$(wc -l <"$results")" -ge "$1" ]; }
# frame N SAMPLE: drop SAMPLE into the inbox (under a dot name first: the watcher skips those), wait
# for the Nth result line, print it.
frame() {
    local n=$1 sample=$2
    cp "$sample" "$work/spool/inbox/.$n.png"
    mv "$work/spool/inbox/.$n.png" "$work/spool/inbox/frame$n-$(basename "$sample")"
    wait_for "$edge" "$FRAME_TIMEOUT_S" "an answer to frame $n" has_answer "$n"
    sed -n "${n}p" "$results" | python3 -c '
import json, sys
r = json.loads(sys.stdin.read())
print("frame %s: %s -> %r p=%.3f mode=%s reason=%s plan=%s bytes_sent=%d latency_ms=%.1f" % (
    sys.argv[1], r["source"].rsplit("/", 1)[-1], r["labels"][0], r["top_probs"][0], r["mode"],
    r["reason"], r["plan"], r["bytes_sent"], r["latency_ms"]))
' "$n"
}
# field N KEY: KEY of the Nth result (its first item for a list)
field() {
    sed -n "${1}p" "$results" |
        python3 -c 'import json, sys; v = json.load(sys.stdin)[sys.argv[1]]; print(v[0] if isinstance(v, list) else v)' "$2"
}

# The same image both times: the split answer and the local one can be compared.
sample=$REPO_ROOT/models/samples/07_red-triangle.png
frame 1 "$sample"
stop_t0=$(date +%s)
"${PODMAN[@]}" stop -t 30 "$cloud" >/dev/null
echo "== cloud container stopped (SIGTERM) in $(($(date +%s) - stop_t0)) s"
frame 2 "$sample"
echo "top label split / local: $(field 1 labels) / $(field 2 labels)"

status=0
[ "$(field 1 mode)" = split ] || { echo "FAIL: frame 1 was not answered in split mode" >&2; status=1; }
[ "$(field 2 mode)" = local ] || { echo "FAIL: frame 2 was not answered locally" >&2; status=1; }

echo "== edge image: no torch, no ray; both images run as uid 10001"
for module in torch ray; do
    if "${PODMAN[@]}" run --rm --network=none "${ULIMITS[@]}" --entrypoint python3 "$EDGE_IMAGE" -c "import $module" 2>/dev/null; then
        echo "FAIL: import $module works in $EDGE_IMAGE" >&2
        status=1
    else
        echo "edge: import $module fails (as it should)"
    fi
done
for image in "$EDGE_IMAGE" "$CLOUD_IMAGE"; do
    uid=$("${PODMAN[@]}" run --rm --network=none "${ULIMITS[@]}" --entrypoint id "$image" -u)
    echo "$image runs as uid $uid"
    [ "$uid" = 10001 ] || { echo "FAIL: $image runs as uid $uid" >&2; status=1; }
done

echo "== sizes"
for image in "$CLOUD_IMAGE" "$EDGE_IMAGE" "$BASE_IMAGE"; do
    printf '%-40s %6s MB\n' "$image" "$(size_mb "$image")"
done
echo "== image test $([ $status = 0 ] && echo passed || echo FAILED): build ${build_s} s, cloud up ${cloud_up_s} s, total $(($(date +%s) - t0)) s"
exit $status
