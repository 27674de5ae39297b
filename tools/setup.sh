#!/usr/bin/env bash
# Idempotent set-up: a .venv with torch, zarr 3 and detectron2.
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
req=requirements.txt
if [ -f "$stamp" ] && [ "$stamp" -nt "$req" ] && [ "$stamp" -nt tools/setup.sh ] \
   && "$VPY" -c "import detectron2, zarr, torch" 2>/dev/null; then
  echo "setup: .venv is up to date"
  exit 0
fi
# pip 24.1+ refuses the sdist's metadata (a direct-URL extra), so the venv keeps pip 24.0.
"$VPY" -m pip install --quiet "pip==24.0" wheel
"$VPY" -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
"$VPY" -m pip install --quiet -r "$req"
if "$VPY" -c "import detectron2" 2>/dev/null; then
  echo "setup: detectron2 already importable: $("$VPY" -c 'import detectron2,os;print(os.path.dirname(detectron2.__file__))')"
else
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  "$VPY" -m pip download --quiet --no-deps --no-build-isolation "pb1-detectron2==0.6" -d "$tmp"
  sdist=$(ls "$tmp"/*.tar.gz | head -n1)
  tar -xzf "$sdist" -C "$tmp"
  src=$(dirname "$(find "$tmp" -type f -path '*/detectron2/__init__.py' | sort | head -n1)")
  site=$("$VPY" -c 'import sysconfig;print(sysconfig.get_paths()["purelib"])')
  rm -rf "$site/detectron2"
  cp -r "$src" "$site/detectron2"
  echo "setup: detectron2 v0.6 Python sources unpacked into $site/detectron2"
fi
touch "$stamp"
echo "setup: done"
