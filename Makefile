# Two commands on a fresh machine: `make demo` (the main job on the embedded default) and `make test`.
SHELL := /bin/bash
PY := .venv/bin/python
export PYTHONPATH := $(CURDIR)
export PYTHONWARNINGS := ignore::FutureWarning,ignore::UserWarning

VARIANT ?= default
STUDENT_CFG ?= configs/embedded/student_R50_FPN.yaml
TEACHER_CFG ?= configs/embedded/teacher_R101_FPN.yaml
METHOD ?= hint
B ?= -1
ITERS ?=
STORE ?=
CODEC ?=
OPTS ?=
METHODS ?= hint attention similarity nst rkd pkt kdsvd fsp correlation vid crd abound factor kd cwd pkd mgd fgd defeat
NPROC ?= 1
SEEDS ?= 1

# NPROC=N runs stage one or two as N processes on this machine through torchrun (docs/scale-out.md)
RUN := $(if $(filter-out 1,$(NPROC)),$(PY) -m torch.distributed.run --standalone --nproc_per_node $(NPROC) -m,$(PY) -m)

# KEY VALUE overrides shared by stage one and two
STORE_OPTS := $(if $(STORE),DISTILL.CACHE.PATH $(STORE)) $(if $(CODEC),DISTILL.CACHE.CODEC $(CODEC))

.PHONY: setup lock data teacher cache-teacher train-student baseline sweep demo test bench clean kill-test device-check

# The venv from requirements.txt, the lock (every version pinned, with hashes), and detectron2.
setup: .venv/.setup-done
.venv/.setup-done: requirements.txt pyproject.toml tools/setup.sh
	bash tools/setup.sh

# Rewrite the lock from pyproject.toml (after changing a dependency there): versions already locked
# are kept where they still fit; LOCK_OPTS=--upgrade (or --upgrade-package NAME) takes newer ones.
# Then make setup and make test, and commit both files.
LOCK_OPTS ?=
LOCK_NOTE := \# The lock: what make setup installs. Do not edit it by hand: change pyproject.toml, then make lock.
lock: setup
	.venv/bin/uv pip compile pyproject.toml --extra test --extra profile --group setup --generate-hashes \
	  --python-version 3.11 --python-platform x86_64-manylinux_2_28 --custom-compile-command "make lock" \
	  --quiet $(LOCK_OPTS) -o requirements.txt
	sed -i '1i $(LOCK_NOTE)' requirements.txt

data: setup
	$(PY) -m tools.embedded_data --variant $(VARIANT)

# The teacher's own overrides: the student's OPTS never reach the teacher's training.
TEACHER_OPTS ?=
teacher: data
	$(PY) -m pipeline.train_teacher --config-file $(TEACHER_CFG) $(TEACHER_OPTS)

# What the student's config needs first (tools/stage_prerequisites.py): the embedded dataset when it uses
# it, the embedded teacher only when DISTILL.PATH_T is that checkpoint and it is missing.
# ("setup" ends the list so that an empty one never makes the default goal.)
prereqs = $(MAKE) --no-print-directory $$($(PY) -m tools.stage_prerequisites --config-file $(STUDENT_CFG) $(STORE_OPTS) $(OPTS) $(1)) setup

cache-teacher: setup
	@$(call prereqs)
	$(RUN) pipeline.cache_teacher --config-file $(STUDENT_CFG) $(if $(OVERWRITE),--overwrite) $(STORE_OPTS) $(OPTS)

train-student: cache-teacher
	$(RUN) pipeline.train_student --config-file $(STUDENT_CFG) DISTILL.DISTILL $(METHOD) DISTILL.B $(B) \
	  OUTPUT_DIR output/embedded/student/$(METHOD) $(if $(ITERS),SOLVER.MAX_ITER $(ITERS)) $(STORE_OPTS) $(OPTS)

baseline: setup
	@$(call prereqs,DISTILL.ENABLE False)
	$(PY) -m pipeline.train_student --config-file $(STUDENT_CFG) DISTILL.ENABLE False \
	  OUTPUT_DIR output/embedded/student/baseline $(if $(ITERS),SOLVER.MAX_ITER $(ITERS)) $(OPTS)

demo: setup
	$(PY) -m tools.demo $(if $(ITERS),--iters $(ITERS)) --method $(METHOD) --b $(B)

test: setup
	$(PY) -m pytest -q tests

# SIGKILL stage one at random moments, resume, verify, compare bitwise with a clean run (not part of `test`).
TRIALS ?= 10
kill-test: setup
	$(PY) tools/kill_loop.py --trials $(TRIALS)

# The bench's default sections (BENCHMARKS.md); BENCH_OPTS="--sections codecs,flip" runs some, "--quick" fewer images,
# "--sections codec_candidates" the codec study left out of the default run (tools/bench/).
bench: teacher
	$(PY) -m tools.bench $(BENCH_OPTS)

# SWEEP_OUT: where the runs and results go (another config needs its own, or finished runs are reused)
SWEEP_OUT ?=
sweep: cache-teacher
	$(PY) -m tools.sweep --config-file $(STUDENT_CFG) $(if $(SWEEP_OUT),--out $(SWEEP_OUT)) --methods $(METHODS) --seeds $(SEEDS) \
	  $(if $(ITERS),--iters $(ITERS)) $(OPTS)

# On a GPU machine with its own torch (docs/gpu.md): needs .device/ from `bash tools/device_wheels.sh`, run here first.
device-check:
	bash tools/device_check.sh

clean:
	rm -rf output
