"""`make cache-teacher` / `train-student` build only what the student's config needs first."""
import re

from tests.conftest import REPO
from tools.stage_prerequisites import prerequisites

EMBEDDED = str(REPO / "configs" / "embedded" / "student_R50_FPN.yaml")
COCO = str(REPO / "configs" / "coco" / "student_R50_FPN_1x.yaml")


def test_the_embedded_teacher_is_trained_only_when_it_is_the_students_teacher_and_missing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no output/embedded/teacher here
    assert prerequisites(EMBEDDED, []) == ["data", "teacher"]
    assert prerequisites(EMBEDDED, ["DISTILL.ENABLE", "False"]) == ["data"]  # the baseline needs no teacher
    assert prerequisites(EMBEDDED, ["DISTILL.PATH_T", "mine.pth"]) == ["data"]  # another teacher: never trained here
    (tmp_path / "output" / "embedded" / "teacher").mkdir(parents=True)
    (tmp_path / "output" / "embedded" / "teacher" / "model_final.pth").write_bytes(b"")
    assert prerequisites(EMBEDDED, []) == ["data"]


def test_the_coco_route_neither_generates_the_embedded_dataset_nor_trains_the_embedded_teacher(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert prerequisites(COCO, []) == []


def test_a_users_dataset_with_a_model_zoo_teacher_needs_nothing_embedded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    opts = ["DATASETS.TRAIN", '("my_train",)', "DATASETS.TEST", '("my_val",)', "DISTILL.PATH_T", "teacher.pkl"]
    assert prerequisites(EMBEDDED, opts) == []


def test_the_students_opts_never_reach_the_teachers_training():
    makefile = (REPO / "Makefile").read_text()
    teacher_recipe = re.search(r"^teacher:.*\n((?:\t.*\n)+)", makefile, re.M).group(1)
    assert "pipeline.train_teacher" in teacher_recipe and "$(OPTS)" not in teacher_recipe
    for target in ("cache-teacher", "train-student"):
        prerequisites_of = re.search(rf"^{target}:(.*)$", makefile, re.M).group(1).split()
        assert "teacher" not in prerequisites_of, f"{target} depends on the teacher target"
