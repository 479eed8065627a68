#!/bin/sh
# Install backrest-relay with the `serve` extra from uv.lock into the virtualenv $1.
# The Dockerfile runs this; tests/infra/test_docker.py runs it too, so the image's install
# step cannot rot unseen. Needs uv on PATH and the project (pyproject.toml, uv.lock, code).
set -eu
target=${1:?usage: docker-install.sh TARGET_VENV}
UV_PROJECT_ENVIRONMENT="$target" UV_PYTHON_DOWNLOADS=never \
    uv sync --frozen --no-dev --extra serve --no-editable --compile-bytecode \
    --python "$(command -v python3)"
"$target/bin/backrest-relay" --version
