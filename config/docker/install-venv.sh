#!/bin/sh
# Builds the services' virtualenv at $VIRTUAL_ENV from the hashed lock, in two steps so an image
# rebuild after a code change reuses the dependency layer:
#
#   install-venv.sh dependencies   every package of requirements.lock, each checked against its
#                                  sha256 (a changed or unlisted file fails the build)
#   install-venv.sh app            voicerelay itself (no dependencies: they are all locked above)
#
# Run from the source tree, as root or not, with uv (the version the Makefile pins) on PATH.
# The images' builder stage runs exactly this script, and tests/test_deploy_files.py runs it the
# same way into a fresh directory, so what the test proves is what the image gets.
set -eu

: "${VIRTUAL_ENV:?set VIRTUAL_ENV to the virtualenv to build}"
python="$VIRTUAL_ENV/bin/python"

case "${1:-}" in
dependencies)
    uv venv --python "${PYTHON:-python3}" "$VIRTUAL_ENV"
    uv pip sync --python "$python" --require-hashes requirements.lock
    ;;
app)
    # Built by its declared backend (hatchling) in an isolated, throw-away build environment:
    # the backend never reaches the venv, and the wheel carries only our own code.
    uv pip install --python "$python" --no-deps .
    uv pip check --python "$python"
    ;;
*)
    echo "usage: $0 dependencies|app" >&2
    exit 2
    ;;
esac
