"""Make detectron2 v0.6's Python sources run on today's numpy, Pillow and setuptools.

Import this module before detectron2. Every shim only fills a gap that is actually
there, so on a full detectron2 build (with its compiled ``_C``) and older libraries it
changes nothing. ``applied`` lists what was patched in this process.
"""
from __future__ import annotations

import importlib
import importlib.util
import random
import sys
import types
import warnings

applied: list[str] = []

# numpy 2 removed these aliases of the builtins; detectron2 v0.6 still uses them.
_NUMPY_ALIASES = {"int": int, "bool": bool, "float": float, "object": object, "str": str, "complex": complex}


def _shim_numpy() -> None:
    import numpy as np

    for name, builtin in _NUMPY_ALIASES.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # numpy warns on the names it plans to bring back
                getattr(np, name)
        except AttributeError:
            setattr(np, name, builtin)
            applied.append(f"numpy.{name}")


def _shim_pillow() -> None:
    from PIL import Image

    # Pillow 10 removed the old resampling constants; detectron2 uses Image.LINEAR.
    for old, new in (("LINEAR", "BILINEAR"), ("CUBIC", "BICUBIC"), ("ANTIALIAS", "LANCZOS")):
        if not hasattr(Image, old):
            setattr(Image, old, getattr(Image.Resampling, new))
            applied.append(f"PIL.Image.{old}")


def _missing_op(name: str):
    def op(*args, **kwargs):
        raise RuntimeError(
            f"detectron2._C.{name} is a compiled op and this detectron2 has no C++ build. "
            "Faster R-CNN FPN does not need it; for COCO evaluation pass use_fast_impl=False. "
            "For rotated boxes or deformable conv, install detectron2 from source."
        )

    return op


def _shim_detectron2_c() -> None:
    if "detectron2._C" in sys.modules:
        return
    if importlib.util.find_spec("detectron2") is None:
        return
    try:
        importlib.import_module("detectron2._C")
        return
    except ImportError:
        pass
    stub = types.ModuleType("detectron2._C")
    stub.__doc__ = "Stand-in for detectron2's absent C++ extension (pipeline.compat)."
    stub.__getattr__ = lambda name: _missing_op(name) if not name.startswith("__") else (_ for _ in ()).throw(AttributeError(name))
    # detectron2's collect_env (printed by default_setup) asks the extension about its build.
    stub.get_compiler_version = lambda: "none: detectron2._C is absent (pipeline.compat stand-in)"
    stub.get_cuda_version = lambda: "none"
    stub.has_cuda = lambda: False
    sys.modules["detectron2._C"] = stub
    applied.append("detectron2._C")


def _shim_pkg_resources() -> None:
    """detectron2.model_zoo finds its bundled configs through pkg_resources (setuptools < 81)."""
    try:
        importlib.import_module("pkg_resources")
        return
    except ImportError:
        pass
    from importlib import resources

    def resource_filename(package: str, resource: str) -> str:
        return str(resources.files(package).joinpath(resource))

    def resource_exists(package: str, resource: str) -> bool:
        return resources.files(package).joinpath(resource).exists()

    module = types.ModuleType("pkg_resources")
    module.resource_filename = resource_filename
    module.resource_exists = resource_exists
    sys.modules["pkg_resources"] = module
    applied.append("pkg_resources")


class _SetSamplingRandom(random.Random):
    """random.Random whose sample() also takes a set (sorted first), as it did before Python 3.11."""

    def sample(self, population, k, **kwargs):
        if isinstance(population, (set, frozenset)):
            population = sorted(population)
        return super().sample(population, k, **kwargs)


def _shim_map_dataset_fallback() -> None:
    """detectron2 v0.6's MapDataset replaces a sample its mapper dropped (returned None) by
    random.sample() over a set, which Python 3.11 refuses; give it a Random that accepts the set."""
    if sys.version_info < (3, 11) or importlib.util.find_spec("detectron2") is None:
        return
    common = importlib.import_module("detectron2.data.common")
    init = common.MapDataset.__init__
    if getattr(init, "_set_sampling", False):
        return
    if not isinstance(getattr(common.MapDataset([0], len), "_fallback_candidates", None), (set, frozenset)):
        return  # a detectron2 that no longer samples from a set

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if type(self._rng) is random.Random:
            self._rng = _SetSamplingRandom(42)

    __init__._set_sampling = True
    common.MapDataset.__init__ = __init__
    applied.append("detectron2.data.common.MapDataset fallback sampling")


def apply() -> list[str]:
    """Apply every needed shim once; return what this process patched."""
    _shim_numpy()
    _shim_pillow()
    _shim_pkg_resources()
    _shim_detectron2_c()
    _shim_map_dataset_fallback()
    return list(applied)


apply()
