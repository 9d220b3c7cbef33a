#!/usr/bin/env bash
# Here, on the development machine, before a GPU session (the device tool's H200 machine has no
# package registry): put into .whl/ (git-ignored) the Python 3.12 wheels of what run.sh needs
# and that machine's image lacks. It has PyTorch, Lightning, torchmetrics, torchvision,
# tensorboard, numpy, scipy, PyYAML, typing-extensions, requests, tqdm and cloudpickle; not
# jsonargparse (and its signature helpers), nor learn2learn and its gym and qpth. learn2learn
# 0.2.0 ships stale Cython output that no Python 3.12 compiles, so it is built here from its
# source with Cython, by a Python 3.12 ($PYTHON312, default: pyenv's 3.12 or python3.12).
# About a minute; 3.4 MB of wheels. Then: run(command="bash benchmarks/gpu_session/run.sh",
# carry=[".whl"]).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON312=${PYTHON312:-$(ls -d /root/.pyenv/versions/3.12*/bin/python 2>/dev/null | head -1)}
PYTHON312=${PYTHON312:-$(command -v python3.12 || true)}
if [ -z "$PYTHON312" ] || ! "$PYTHON312" -c 'import sys; assert sys.version_info[:2] == (3, 12)'; then
    echo "wheels.sh needs a Python 3.12 (the GPU machine's): set PYTHON312=/path/to/python3.12" >&2
    exit 2
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PYTHON312" -m venv "$work/venv"
pip="$work/venv/bin/pip"
"$pip" install -q cython numpy setuptools wheel
rm -rf .whl && mkdir .whl
# Pure-Python wheels, as published.
"$pip" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d .whl \
    jsonargparse==4.53.0 docstring_parser==0.18.0 typeshed_client==2.15.0 gym_notices==0.1.0
# Published as source only, pure Python: built into wheels.
"$pip" wheel -q --no-deps -w .whl gym==0.26.2 qpth==0.0.18
# learn2learn: its Cython sources compiled afresh (build_ext makes its setup.py cythonize the .pyx).
"$pip" download -q --no-deps --no-binary=:all: -d "$work/src" learn2learn==0.2.0
tar xzf "$work"/src/learn2learn-0.2.0.tar.gz -C "$work/src"
(cd "$work/src/learn2learn-0.2.0" && "$work/venv/bin/python" setup.py -q build_ext bdist_wheel -d "$OLDPWD/.whl" >/dev/null 2>&1)
ls -l .whl
