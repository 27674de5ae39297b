"""detectron2's conventions: the config reads like config/defaults.py, @configurable constructors
document their arguments, and the option strings and teacher sources have types."""
import ast
import inspect
import re
import typing
from pathlib import Path

import cache
import pipeline
from pipeline import config, distill_rcnn, mapper, teacher_source
from pipeline.losses import METHODS
from tests.conftest import REPO

CONFIG_ASSIGNMENT = re.compile(r"^\s*_C\.(?P<key>[A-Z0-9_.]+) = ")


def _config_lines() -> list[str]:
    return inspect.getsource(config.add_distill_config).splitlines()


def _comment_block_above(key: str) -> str:
    """The comment lines directly above the assignment of `key` in add_distill_config."""
    lines = _config_lines()
    row = next(i for i, line in enumerate(lines) if (m := CONFIG_ASSIGNMENT.match(line)) and m["key"] == key)
    block = []
    for line in reversed(lines[:row]):
        if not line.strip().startswith("#") or line.strip().startswith("# ---"):
            break
        block.append(line.strip().lstrip("#").strip())
    return " ".join(reversed(block))


def test_every_config_key_has_a_comment_block_above_it_and_none_beside_it():
    keys = [m["key"] for line in _config_lines() if (m := CONFIG_ASSIGNMENT.match(line))]
    assert "DISTILL.CACHE.ON_BAD_ENTRY" in keys and len(keys) >= 20
    # A node (`= CN()`) is announced by its section header; every value gets its own comment block.
    nodes = {m["key"] for line in _config_lines() if (m := CONFIG_ASSIGNMENT.match(line)) and line.endswith("= CN()")}
    assert nodes == {"DISTILL", "DISTILL.CACHE"}
    undocumented = [k for k in keys if k not in nodes and not _comment_block_above(k)]
    assert undocumented == []
    beside = [line for line in _config_lines() if CONFIG_ASSIGNMENT.match(line) and "#" in line]
    assert beside == []


def test_the_config_file_has_no_line_over_100_characters():
    long = [(n, len(line)) for n, line in enumerate(Path(config.__file__).read_text().splitlines(), 1)
            if len(line) > 100]
    assert long == []


def test_each_option_key_lists_every_value_it_accepts():
    options = {
        "DISTILL.SOURCE": typing.get_args(config.TeacherSourceName),
        "DISTILL.CACHE.FLIP": typing.get_args(config.FlipOption),
        "DISTILL.CACHE.ON_BAD_ENTRY": typing.get_args(config.OnBadEntry),
        "DISTILL.DISTILL": METHODS,
        "DISTILL.CACHE.CODEC": (*cache.CODECS, "int8-std<a>"),
    }
    for key, values in options.items():
        block = _comment_block_above(key)
        assert "Options:" in block, key
        missing = [v for v in values if f'"{v}"' not in block]
        assert missing == [], f"{key}: the comment does not list {missing}"


def test_the_option_literals_are_the_values_the_code_accepts_and_hold_the_defaults():
    cfg = pipeline.get_distill_cfg()
    assert typing.get_args(config.FlipOption) == cache.FLIP_OPTIONS
    assert typing.get_args(config.OnBadEntry) == mapper.ON_BAD_ENTRY
    assert typing.get_args(config.TeacherSourceName) == distill_rcnn.SOURCES
    assert cfg.DISTILL.SOURCE in typing.get_args(config.TeacherSourceName)
    assert cfg.DISTILL.CACHE.FLIP in typing.get_args(config.FlipOption)
    assert cfg.DISTILL.CACHE.ON_BAD_ENTRY in typing.get_args(config.OnBadEntry)


def _configurable_constructors():
    """(module, class name) of every __init__ decorated with @configurable in pipeline/."""
    found = []
    for path in sorted((REPO / "pipeline").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, ast.FunctionDef) and item.name == "__init__" and any(
                            getattr(d, "id", getattr(d, "attr", None)) == "configurable" for d in item.decorator_list):
                        found.append((".".join(path.relative_to(REPO).with_suffix("").parts), node.name))
    return found


def test_every_configurable_constructor_documents_each_argument_in_an_args_section():
    constructors = _configurable_constructors()
    assert {("pipeline.mapper", "DistillDatasetMapper"), ("pipeline.distill_rcnn", "DistillRCNN")} <= set(constructors)
    for module, name in constructors:
        init = getattr(__import__(module, fromlist=[name]), name).__init__
        doc = inspect.getdoc(init) or ""
        assert "Args:" in doc, f"{name}.__init__ has no Args: section"
        args = doc.split("Args:", 1)[1]
        params = [("**" if p.kind is p.VAR_KEYWORD else "") + p.name
                  for p in inspect.signature(init).parameters.values() if p.name != "self"]
        undocumented = [p for p in params if not re.search(rf"^\s*{re.escape(p)}:", args, re.M)]
        assert undocumented == [], f"{name}.__init__ does not document {undocumented}"


def test_the_option_arguments_are_typed_with_the_option_literals():
    assert typing.get_type_hints(mapper.DistillDatasetMapper.__init__)["on_bad_entry"] == config.OnBadEntry
    hints = typing.get_type_hints(distill_rcnn.DistillRCNN.__init__)
    assert hints["teacher_source"] == typing.Optional[teacher_source.TeacherSource]


def test_both_teacher_sources_have_the_teacher_source_call_signature():
    protocol = typing.get_type_hints(teacher_source.TeacherSource.__call__)
    protocol_params = list(inspect.signature(teacher_source.TeacherSource.__call__).parameters)
    for source in (teacher_source.CachedTeacher, teacher_source.LiveTeacher):
        assert typing.get_type_hints(source.__call__) == protocol, source.__name__
        assert list(inspect.signature(source.__call__).parameters) == protocol_params, source.__name__
