#!/usr/bin/env bash
# Run HERE (a machine that reaches PyPI), before a device check: gathers into .device/ (git-ignored) what
# tools/device_check.sh installs on a GPU machine that has its own torch and reaches nothing:
#   .device/wheelhouse/   wheels of what that machine's torch image lacks, for CPython 3.11 and 3.12 on
#                         manylinux x86_64 (its Python is not known in advance; zarr 3 needs >= 3.11, so 3.10
#                         has no wheels to fetch), at the versions this checkout's .venv runs;
#   .device/detectron2/   detectron2 v0.6's Python sources, taken from the sdist as tools/setup.sh takes them;
#   .device/requirements.txt  what device_check.sh installs from the wheelhouse;
#   .device/MANIFEST      what was gathered, and its size (the device tool carries at most 64 MiB with the tree).
# Then: the run call in docs/gpu.md.
set -euo pipefail
cd "$(dirname "$0")/.."
VPY=${VPY:-.venv/bin/python}
OUT=.device
WH=$OUT/wheelhouse
PYTHONS=${DEVICE_PYTHONS:-"3.11 3.12"}
# What the GPU machine's torch image lacks (docs/gpu.md): pinned to this .venv's versions, so the device runs
# the code under the libraries it is tested with here.
NEEDED="zarr numcodecs google-crc32c donfig fvcore iopath yacs pycocotools omegaconf hydra-core
  antlr4-python3-runtime termcolor"
# The image holds these (its package list); unpinned, so pip keeps the image's own and only a machine
# without them installs the carried one.
PRESENT="tqdm tabulate portalocker cloudpickle pytest"
# Binary wheels the torch image certainly holds (torch and torchvision need them): carried, they would more
# than double the size, for three Pythons.
PRUNE="numpy pillow pyyaml"
# Published as sdists only (pure Python): built here once into py3-none-any wheels.
SDIST_ONLY="fvcore iopath antlr4-python3-runtime"
PLATFORMS="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64"

version_of() { "$VPY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
pins=()
for name in $NEEDED; do
  pins+=("$name==$(version_of "$name")")
done

rm -rf "$WH" "$OUT/detectron2" "$OUT/MANIFEST" "$OUT/requirements.txt"
mkdir -p "$WH"
built=()
for name in $SDIST_ONLY; do built+=("$name==$(version_of "$name")"); done
"$VPY" -m pip wheel --quiet --no-deps -w "$WH" "${built[@]}" 2>&1 | grep -v "is ignored" || true

for version in $PYTHONS; do
  # shellcheck disable=SC2086  # PLATFORMS and PRESENT are word lists
  "$VPY" -m pip download --quiet --only-binary=:all: --python-version "$version" --implementation cp $PLATFORMS \
    --find-links "$WH" -d "$WH" "${pins[@]}" $PRESENT 2>&1 | grep -v "is ignored" || true
  for name in ${pins[@]%%==*}; do
    wheel_name=$(echo "$name" | tr '-' '_')
    ls "$WH" | grep -qi "^${wheel_name}-" || { echo "device_wheels: no wheel of $name for Python $version" >&2; exit 1; }
  done
done
for name in $PRUNE; do
  find "$WH" -maxdepth 1 -iname "${name}-*.whl" -delete
done

# detectron2 v0.6's Python sources (tools/setup.sh, route 2): the registry's sdist, its package folder.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$VPY" -m pip download --quiet --no-deps --no-build-isolation "pb1-detectron2==0.6" -d "$tmp" 2>&1 | grep -v "is ignored" || true
tar -xzf "$(ls "$tmp"/*.tar.gz | head -n1)" -C "$tmp"
src=$(dirname "$(find "$tmp" -type f -path '*/detectron2/__init__.py' | sort | head -n1)")
cp -r "$src" "$OUT/detectron2"
find "$OUT/detectron2" -name "__pycache__" -prune -exec rm -rf {} +

# What tools/device_check.sh asks pip for, from the wheelhouse alone.
printf '%s\n' "${pins[@]}" $PRESENT > "$OUT/requirements.txt"

{
  echo "# gathered by tools/device_wheels.sh on $(date -u +%Y-%m-%dT%H:%MZ) for CPython $PYTHONS"
  echo "# pinned: ${pins[*]}"
  echo "# unpinned (the image has them): $PRESENT; left out (the image has them): $PRUNE"
  (cd "$WH" && ls -1 *.whl)
  echo "# detectron2 sources: $(find "$OUT/detectron2" -type f | wc -l) files"
  echo "# bytes: wheelhouse $(du -sb "$WH" | cut -f1), detectron2 $(du -sb "$OUT/detectron2" | cut -f1), total $(du -sb "$OUT" | cut -f1)"
} > "$OUT/MANIFEST"
tail -n1 "$OUT/MANIFEST"
echo "device_wheels: $(ls "$WH" | wc -l) wheels in $WH, total $(du -sh "$OUT" | cut -f1) (limit with the tree: 64 MiB)"
