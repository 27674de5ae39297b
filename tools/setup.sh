#!/usr/bin/env bash
# Idempotent set-up: a .venv with exactly the versions of requirements.txt (the lock: every package
# pinned, with its sha256 hashes; `make lock` rewrites it from pyproject.toml), then detectron2 and
# this project itself (editable, which gives the `teacher-store` command).
# detectron2 route 1: a working `import detectron2` in the venv (a user's own source build) is kept.
# detectron2 route 2 (offline): the registry's pb1-detectron2==0.6 sdist carries detectron2 v0.6's
# Python sources without its C++ sources, so it cannot be pip-installed; we unpack its package.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
stamp="$VENV/.setup-done"
lock=requirements.txt
D2_SDIST_SHA256=5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29  # pb1-detectron2-0.6.tar.gz
if [ -f "$stamp" ] && [ "$stamp" -nt "$lock" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt tools/setup.sh ] \
   && "$VPY" -c "import detectron2, zarr, torch" 2>/dev/null; then
  echo "setup: .venv is up to date"
  exit 0
fi
# The lock's entries (the pin, its hashes, its comments) for the packages named.
locked() {
  awk -v names=" $* " '/^[A-Za-z0-9]/ { split($1, pin, "=="); keep = index(names, " " pin[1] " ") > 0 } keep' "$lock"
}
# pip 24.1+ refuses the sdist's metadata (a direct-URL extra), so the venv keeps pip 24.0; uv
# installs the lock, several times faster than pip (README, set-up times). Both are locked, hashed.
"$VPY" -m pip install --quiet --require-hashes --no-deps -r <(locked pip uv)
# uv reads no pip configuration, so the indexes pip is given (a mirror, local wheels) are handed
# on. Every file is hash-checked, so taking the best match across indexes is safe.
pip_setting() { "$VPY" -m pip config get "global.$1" 2>/dev/null || true; }
UV=("$VENV/bin/uv" pip install --quiet --python "$VPY" --require-hashes --index-strategy unsafe-best-match)
index=${PIP_INDEX_URL:-$(pip_setting index-url)}
[ -z "$index" ] || UV+=(--index-url "$index")
for url in ${PIP_EXTRA_INDEX_URL:-$(pip_setting extra-index-url)}; do UV+=(--extra-index-url "$url"); done
for dir in ${PIP_FIND_LINKS:-$(pip_setting find-links)}; do UV+=(--find-links "$dir"); done
# torch and torchvision first, as detectron2 asks; the rest of the lock then finds them in place.
"${UV[@]}" --no-deps -r <(locked torch torchvision)
"${UV[@]}" -r "$lock"
if "$VPY" -c "import detectron2" 2>/dev/null; then
  echo "setup: detectron2 already importable: $("$VPY" -c 'import detectron2,os;print(os.path.dirname(detectron2.__file__))')"
else
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  "$VPY" -m pip download --quiet --no-deps --no-build-isolation "pb1-detectron2==0.6" -d "$tmp"
  sdist=$(ls "$tmp"/*.tar.gz | head -n1)
  # The sdist is outside the lock (pip cannot install it), so its hash is checked here.
  echo "$D2_SDIST_SHA256  $sdist" | sha256sum --check --quiet \
    || { echo "setup: $sdist is not the pb1-detectron2 0.6 sdist tested (sha256 $D2_SDIST_SHA256)" >&2; exit 1; }
  tar -xzf "$sdist" -C "$tmp"
  src=$(dirname "$(find "$tmp" -type f -path '*/detectron2/__init__.py' | sort | head -n1)")
  site=$("$VPY" -c 'import sysconfig;print(sysconfig.get_paths()["purelib"])')
  rm -rf "$site/detectron2"
  cp -r "$src" "$site/detectron2"
  echo "setup: detectron2 v0.6 Python sources unpacked into $site/detectron2"
fi
# The project itself, editable, with the lock's setuptools (no build environment to fetch).
"$VPY" -m pip install --quiet --no-deps --no-build-isolation -e .
touch "$stamp"
echo "setup: done"
