"""The package boundary: `import pipeline` is the public API, the library never reaches into tools or entry points."""
import ast
from pathlib import Path

import pipeline
from tests.conftest import REPO

ENTRY_POINTS = {"pipeline.cache_teacher", "pipeline.train_student", "pipeline.train_teacher"}


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_library_modules_never_import_a_tool_or_an_entry_point():
    library = [p for pkg in ("pipeline", "cache") for p in (REPO / pkg).rglob("*.py")]
    offenders = {}
    for path in library:
        module = ".".join(path.relative_to(REPO).with_suffix("").parts)
        if module in ENTRY_POINTS:
            continue
        bad = {m for m in _imported_modules(path) if m.split(".")[0] == "tools" or m in ENTRY_POINTS}
        if bad:
            offenders[module] = sorted(bad)
    assert not offenders, f"library modules import tools or entry points: {offenders}"


def test_only_the_package_init_imports_the_compat_shims():
    importers = [str(p.relative_to(REPO)) for pkg in ("pipeline", "cache", "tools") for p in (REPO / pkg).rglob("*.py")
                 if "pipeline.compat" in _imported_modules(p) or "pipeline" in _imported_modules(p) and
                 "compat" in {a.name for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.ImportFrom)
                              and n.module == "pipeline" for a in n.names}]
    assert importers == ["pipeline/__init__.py"]


def test_the_public_api_is_exported_and_registered():
    from detectron2.modeling import META_ARCH_REGISTRY

    for name in pipeline.__all__:
        assert hasattr(pipeline, name), name
    assert META_ARCH_REGISTRY.get("DistillRCNN") is pipeline.DistillRCNN
    assert {"hint", "kd", "crd"} <= set(pipeline.METHODS)
    cfg = pipeline.get_distill_cfg()
    assert cfg.DISTILL.ENABLE is False and cfg.DISTILL.SOURCE == "cache"


def test_the_cache_package_does_not_import_detectron2():
    offenders = [str(p.relative_to(REPO)) for p in (REPO / "cache").rglob("*.py")
                 if any(m.split(".")[0] in ("detectron2", "pipeline") for m in _imported_modules(p))]
    assert offenders == []
