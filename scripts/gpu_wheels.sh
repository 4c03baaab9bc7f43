#!/usr/bin/env bash
# Run HERE (a machine with the package registry), before lending a GPU its first command.
# The lent GPU machines (docs/DEVELOPING.md, "When a GPU is lent") reach no registry and ship
# torch, triton, transformers, pytest and most of the scientific stack, but not DeepSpeed or
# the parts of its dependency tree below. This puts Python 3.12 x86-64 wheels of them in
# .whl/ (git-ignored; a few MB) for `run(carry=[".whl"], ...)`; scripts/gpu_session.sh installs
# them there. DeepSpeed is an sdist on PyPI: it is built into a pure-Python wheel here (ops are
# compiled on first use there, with the machine's nvcc).
set -euo pipefail
cd "$(dirname "$0")/.."
DS_VERSION="${DS_VERSION:-0.19.8}"
mkdir -p .whl
rm -f .whl/*.whl
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${plat[@]}" -d .whl "pydantic==2.13.4" "pydantic_core==2.46.4" "annotated_types==0.7.0" \
    "typing_inspection==0.4.2" "hjson==3.1.0"
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==${DS_VERSION}"
ls -la .whl
du -sh .whl
