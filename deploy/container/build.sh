#!/usr/bin/env bash
# Build the medrefine image from nothing with rootful Podman: a Debian base made by debootstrap from the
# mirror apt already uses, then the repository's Dockerfile unchanged on top of it (issue #18's recipe).
#
# Usage: deploy/container/build.sh [TAG]   (root; `make image` runs `make export` first). The code is the
# commit MEDREFINE_IMAGE_REV (default HEAD), so edits in progress never reach an image; the Dockerfile's
# EXTRAS come from MEDREFINE_IMAGE_EXTRAS (e.g. openvino, for MEDREFINE_BACKEND=openvino).
# Nothing host-specific is written into the repository: the Debian mirror is read from apt's sources, and
# pip's configuration, CA bundle and local wheel directories are read from pip and mounted read-only
# into the build (never copied into an image). Work files go to $MEDREFINE_IMAGE_WORKDIR.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
TAG=${1:-localhost/medrefine:latest}
REV=${MEDREFINE_IMAGE_REV:-HEAD}                 # the commit whose code goes into the image
EXTRAS=${MEDREFINE_IMAGE_EXTRAS:-}               # optional dependency groups (Dockerfile ARG EXTRAS)
SUITE=bookworm                                   # the Debian release of python:3.11-slim-bookworm
PYTHON_IMAGE=localhost/medrefine-python:3.11-$SUITE
WORK=${MEDREFINE_IMAGE_WORKDIR:-/var/tmp/medrefine-image}
PY=${PYTHON:-$ROOT/.venv/bin/python}
started=$(date +%s)

die() { echo "build.sh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "rootful Podman: run as root"
for dir in artifacts/default artifacts/generators; do
    [ -f "$ROOT/$dir/manifest.json" ] || die "$dir/manifest.json missing: run \`make export\` first"
done

# 1. Tools. runc, not Debian's default crun (crun 1.8 refuses a hybrid cgroup layout).
if ! command -v podman >/dev/null || ! command -v runc >/dev/null || ! command -v debootstrap >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman buildah runc debootstrap >/dev/null
fi
mkdir -p "$WORK"
# Ulimits no higher than ours: without CAP_SYS_RESOURCE a container cannot raise them.
nofile=$(ulimit -Hn)
cat > "$WORK/containers.conf" <<CONF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=32768:32768"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
export CONTAINERS_CONF="$WORK/containers.conf"
ulimits=(--ulimit "nofile=$nofile:$nofile" --ulimit "nproc=32768:32768")

# 2. The Python base image: Debian minbase + the distribution's Python 3.11 (no registry is reachable).
if ! podman image exists "$PYTHON_IMAGE"; then
    mirror=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 'Created-By: Packages' \
             | awk -v suite="$SUITE" '$2 == suite {print $1; exit}')
    [ -n "$mirror" ] || die "no Debian $SUITE repository in apt's sources"
    rootfs="$WORK/rootfs"
    rm -rf "$rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates,passwd \
        "$SUITE" "$rootfs" "$mirror" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -20 "$WORK/debootstrap.log" >&2; die "debootstrap failed (log: $WORK/debootstrap.log)"; }
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
    tar -C "$rootfs" -c . | podman import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$PYTHON_IMAGE" >/dev/null
    rm -rf "$rootfs"
    echo "build.sh: base image $PYTHON_IMAGE after $(( $(date +%s) - started )) s"
fi

# 3. pip inside the build sees what pip sees here: its config files and every local path they name
#    (CA bundle, constraints, wheel directories, file:// indexes), mounted read-only at the same paths.
mounts=()
declare -A seen=()
add_mount() {
    local path=${1#file://}
    # A file:// index (.../simple) links its files relatively (../../files/...): mount its parent.
    [ "$path" = "$1" ] || path=$(dirname "${path%/}")
    [ -e "$path" ] && [ -z "${seen[$path]:-}" ] || return 0
    seen[$path]=1
    mounts+=(-v "$path:$path:ro")
}
while read -r file; do add_mount "$file"; done < <(
    "$PY" -m pip config debug 2>/dev/null | sed -n 's/^ *\(\/[^,]*\), exists: True$/\1/p')
while read -r value; do
    for item in $value; do add_mount "$item"; done
done < <("$PY" -m pip config list 2>/dev/null | sed -n "s/^[^=]*='\(.*\)'$/\1/p")
# Torch comes from the index pip uses here (the CPU wheel from the local wheel directory wins on version).
index=$("$PY" -m pip config get global.index-url 2>/dev/null \
        || "$PY" -c 'from pip._internal.models.index import PyPI; print(PyPI.simple_url)')

# 4. The build context: the committed tree at $REV (not edits in progress) plus the exported artifacts.
context=$(mktemp -d "$WORK/context.XXXXXX")   # one per build: two builds at once must not share it
trap 'rm -rf "$context"' EXIT
mkdir -p "$context/artifacts"
git -C "$ROOT" archive --format=tar "$REV" | tar -x -C "$context"
cp -r "$ROOT/artifacts/default" "$ROOT/artifacts/generators" "$context/artifacts/"
echo "build.sh: context from $(git -C "$ROOT" rev-parse --short "$REV") + artifacts/{default,generators}"

# 5. The Dockerfile, unchanged. Docker format keeps HEALTHCHECK (OCI drops it).
build_started=$(date +%s)
old_id=$(podman image inspect --format '{{.Id}}' "$TAG" 2>/dev/null || true)
podman build --network host --format docker --pull=never "${ulimits[@]}" "${mounts[@]}" \
    --ignorefile "$ROOT/deploy/container/containerignore" \
    --build-arg PYTHON_IMAGE="$PYTHON_IMAGE" --build-arg TORCH_INDEX_URL_CPU="$index" ${EXTRAS:+--build-arg EXTRAS="$EXTRAS"} \
    -t "$TAG" -f "$context/Dockerfile" "$context"
rm -rf "$context"
# Drop the image this tag named before, by id: not `podman image prune`, which also deletes the build
# stage's layers (no final image descends from them), i.e. the cache of the torch and dependency steps.
new_id=$(podman image inspect --format '{{.Id}}' "$TAG")
if [ -n "$old_id" ] && [ "$old_id" != "$new_id" ]; then
    podman rmi "$old_id" >/dev/null 2>&1 || echo "build.sh: note: the previous $TAG ($old_id) is still in use" >&2
fi
now=$(date +%s)
echo "build.sh: $TAG built; Dockerfile $(( now - build_started )) s, total $(( now - started )) s"
