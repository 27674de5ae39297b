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
METHODS ?= hint attention similarity nst rkd pkt kdsvd fsp correlation vid crd abound factor kd
NPROC ?= 1

# NPROC=N runs stage one or two as N processes on this machine through torchrun (docs/scale-out.md)
RUN := $(if $(filter-out 1,$(NPROC)),$(PY) -m torch.distributed.run --standalone --nproc_per_node $(NPROC) -m,$(PY) -m)

# KEY VALUE overrides shared by stage one and two
STORE_OPTS := $(if $(STORE),DISTILL.CACHE.PATH $(STORE)) $(if $(CODEC),DISTILL.CACHE.CODEC $(CODEC))

.PHONY: setup data teacher cache-teacher train-student baseline sweep demo test bench clean kill-test

setup: .venv/.setup-done
.venv/.setup-done: requirements.txt tools/setup.sh
	bash tools/setup.sh

data: setup
	$(PY) -m tools.embedded_data --variant $(VARIANT)

teacher: data
	$(PY) -m pipeline.train_teacher --config-file $(TEACHER_CFG) $(OPTS)

cache-teacher: teacher
	$(RUN) pipeline.cache_teacher --config-file $(STUDENT_CFG) $(if $(OVERWRITE),--overwrite) $(STORE_OPTS) $(OPTS)

train-student: cache-teacher
	$(RUN) pipeline.train_student --config-file $(STUDENT_CFG) DISTILL.DISTILL $(METHOD) DISTILL.B $(B) \
	  OUTPUT_DIR output/embedded/student/$(METHOD) $(if $(ITERS),SOLVER.MAX_ITER $(ITERS)) $(STORE_OPTS) $(OPTS)

baseline: data
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

sweep: cache-teacher
	$(PY) -m tools.sweep --methods $(METHODS) $(if $(ITERS),--iters $(ITERS)) $(OPTS)

clean:
	rm -rf output
