"""The install: pyproject.toml declares both packages and the store's command, requirements.txt locks
every version it resolves to, with hashes, and tools/setup.sh installs from that lock."""
import re
import subprocess
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from setuptools import find_namespace_packages

from tests.conftest import REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
LOCK_TEXT = (REPO / "requirements.txt").read_text()


def _lock() -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes) of each pin in the lock."""
    entries = {}
    for block in re.split(r"\n(?=[A-Za-z0-9])", LOCK_TEXT):
        first = block.split("\n", 1)[0]
        if not first or first.startswith("#"):
            continue
        pin = re.match(r"^([A-Za-z0-9._-]+)==([^\s;\\]+)", first)
        assert pin, f"a lock entry that is not an exact pin: {first!r}"
        entries[canonicalize_name(pin[1])] = (pin[2], re.findall(r"--hash=sha256:([0-9a-f]{64})", block))
    return entries


def test_every_locked_package_is_an_exact_pin_with_at_least_one_sha256():
    lock = _lock()
    assert len(lock) > 100
    assert [name for name, (_, hashes) in lock.items() if not hashes] == []


def test_the_lock_holds_every_declared_dependency_at_a_version_the_declaration_allows():
    lock = _lock()
    project = PYPROJECT["project"]
    declared = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra),
                *PYPROJECT["dependency-groups"]["setup"], *PYPROJECT["tool"]["uv"]["constraint-dependencies"]]
    outside = {}
    for spec in map(Requirement, declared):
        name = canonicalize_name(spec.name)
        if name not in lock or not spec.specifier.contains(lock[name][0], prereleases=True):
            outside[str(spec)] = lock.get(name, ("missing",))[0]
    assert outside == {}


def test_the_lock_keeps_the_pip_that_the_detectron2_sdist_needs_and_the_tested_torch():
    lock = _lock()
    assert lock["pip"][0] == "24.0"
    assert (lock["torch"][0], lock["torchvision"][0]) == ("2.14.1", "0.29.1")


def test_the_lock_says_how_to_rewrite_it_and_the_makefile_does_so():
    header = LOCK_TEXT.split("\n", 3)[:3]
    assert any("make lock" in line for line in header), header
    makefile = (REPO / "Makefile").read_text()
    lock_rule = makefile.split("\nlock:", 1)[1].split("\n\n", 1)[0]
    assert "uv pip compile pyproject.toml" in lock_rule and "--generate-hashes" in lock_rule
    assert "-o requirements.txt" in lock_rule


def test_the_installable_packages_are_the_library_and_not_its_tools_or_tests():
    find = PYPROJECT["tool"]["setuptools"]["packages"]["find"]
    packages = set(find_namespace_packages(str(REPO), include=find["include"]))
    assert {"pipeline", "pipeline.losses", "cache"} <= packages
    assert not any(p.split(".")[0] in ("tools", "tests", "configs", "docs") for p in packages)


def test_the_store_command_is_the_python_m_cache_entry_point():
    module, _, function = PYPROJECT["project"]["scripts"]["teacher-store"].partition(":")
    cli = getattr(__import__(module, fromlist=[function]), function)
    assert cli(["info", str(REPO / "no-such-store.zarr")]) == 2


def test_setup_takes_its_pins_and_hashes_from_the_lock(tmp_path):
    """setup.sh's `locked` picks whole entries (pin, hashes) for the names given, and nothing else."""
    script = (REPO / "tools" / "setup.sh").read_text()
    locked = re.search(r"^locked\(\) \{\n.*?\n\}", script, re.S | re.M)[0]
    out = subprocess.run(["bash", "-c", f'lock={REPO / "requirements.txt"}\n{locked}\nlocked torch torchvision'],
                         capture_output=True, text=True, check=True).stdout
    pins = re.findall(r"^(\S+)==", out, re.M)
    assert pins == ["torch", "torchvision"]
    lock = _lock()
    assert set(re.findall(r"sha256:([0-9a-f]{64})", out)) == set(lock["torch"][1]) | set(lock["torchvision"][1])
