#!/usr/bin/env bash
# Build a local Debian bookworm base image for the fedssl images, without any image registry:
# debootstrap (or mmdebstrap) a minimal rootfs with Python 3.11, venv, CA certificates, tini and jemalloc,
# then `docker import` it. Use it as the BASE_IMAGE build argument where Docker Hub is out of reach:
#
#   scripts/make-base-image.sh                 # -> fedssl-base:bookworm
#   scripts/make-base-image.sh --force         # rebuild even if the image exists
#   docker build --build-arg BASE_IMAGE=fedssl-base:bookworm ...
#
# Environment: FEDSSL_BASE_IMAGE (image name, default fedssl-base:bookworm),
# DEBIAN_MIRROR (default http://deb.debian.org/debian), DOCKER (the docker CLI, default: docker).
# Needs root (debootstrap chroots), docker, and mmdebstrap or debootstrap.
set -euo pipefail

IMAGE="${FEDSSL_BASE_IMAGE:-fedssl-base:bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SUITE=bookworm
# python3 = 3.11 on bookworm; python3-venv for `python3 -m venv`; tini is the images' PID 1;
# libjemalloc2 is fedssl-supernode's ClientApp allocator (its Dockerfile installs it otherwise).
PACKAGES=python3,python3-venv,ca-certificates,tini,libjemalloc2
DOCKER="${DOCKER:-docker}"
FORCE=0

say() { printf '\033[1m[make-base-image]\033[0m %s\n' "$*"; }
die() { printf '\033[1;31m[make-base-image] ERROR:\033[0m %s\n' "$*" >&2; exit 1; }

case "${1:-}" in
  --force) FORCE=1 ;;
  -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  "") ;;
  *) die "unknown option '$1' (expected --force or --help)" ;;
esac

missing=()
command -v "$DOCKER" >/dev/null || missing+=("docker (apt-get install docker.io)")
command -v mmdebstrap >/dev/null || command -v debootstrap >/dev/null || missing+=("mmdebstrap or debootstrap (apt-get install mmdebstrap)")
command -v tar >/dev/null || missing+=("tar")
[ "${#missing[@]}" -eq 0 ] || die "missing tools: ${missing[*]}"
"$DOCKER" info >/dev/null 2>&1 || die "cannot reach the Docker daemon (start it: setsid nohup dockerd > dockerd.log 2>&1 < /dev/null &)"

if [ "$FORCE" = 0 ] && "$DOCKER" image inspect "$IMAGE" >/dev/null 2>&1; then
  say "$IMAGE already exists (--force rebuilds it)"
  exit 0
fi

CHANGES=(-c 'ENV LANG=C.UTF-8' -c 'CMD ["python3"]')
if command -v mmdebstrap >/dev/null; then
  say "mmdebstrap $SUITE ($PACKAGES) from $MIRROR -> $IMAGE"
  # mmdebstrap writes the tarball to stdout: no rootfs left on disk, no root-owned leftovers.
  mmdebstrap --quiet --variant=minbase --include="$PACKAGES" \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    "$SUITE" - "$MIRROR" | "$DOCKER" import "${CHANGES[@]}" - "$IMAGE"
else
  [ "$(id -u)" = 0 ] || die "debootstrap needs root"
  rootfs="$(mktemp -d "${TMPDIR:-/tmp}/fedssl-rootfs.XXXXXX")"
  trap 'rm -rf "$rootfs"' EXIT
  say "debootstrap $SUITE ($PACKAGES) from $MIRROR into $rootfs -> $IMAGE"
  debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$MIRROR"
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb
  tar -C "$rootfs" -c . | "$DOCKER" import "${CHANGES[@]}" - "$IMAGE"
fi

"$DOCKER" run --rm "$IMAGE" python3 -c 'import sys, venv, ssl; assert sys.version_info[:2] == (3, 11), sys.version' \
  || die "$IMAGE has no working Python 3.11"
say "done: $IMAGE ($("$DOCKER" image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"
say "next: scripts/image-smoke-test.sh   (or: docker build --build-arg BASE_IMAGE=$IMAGE -f docker/registry.Dockerfile .)"
