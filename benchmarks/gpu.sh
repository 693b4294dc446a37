#!/usr/bin/env bash
# The GPU proof in one command, for a GPU machine with no network (see README, "GPU benchmark"):
#
#   bash benchmarks/gpu.sh OUT_DIR [more arguments of: python -m structfx.bench gpu]
#
# 1. checks that this torch / triton has what structfx needs (before importing structfx, so a
#    missing feature is a message naming the version that has it, not a traceback);
# 2. makes structfx importable from this checkout, its torch_dynamo_backends entry point
#    included (backend="structfx"), without pip reaching anything: an editable install with
#    --no-index --no-deps --no-build-isolation (pyproject's torch>=2.13 pin is not enforced
#    by --no-deps); if pip can't (no setuptools >= 64, no bdist_wheel, read-only site), a
#    staged copy of the package layout on PYTHONPATH (symlinks + a .dist-info with the entry
#    point). STRUCTFX_STAGE=1 skips pip and stages;
# 3. runs python -m structfx.bench gpu --out OUT_DIR "$@" from outside the checkout (so the
#    checkout's structfx/ folder, which lacks the kernels/ and passes/ subpackages of the
#    installed layout, can't shadow the installed package).
# Exit status: 2 if the environment can't run structfx, else the benchmark's (1: a step failed).
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
OUT="${1:?usage: bash benchmarks/gpu.sh OUT_DIR [python -m structfx.bench gpu arguments]}"
shift
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
cd "$OUT" || exit 2

"$PY" -c 'import runpy, sys
path = sys.argv[1]
sys.argv = ["bench_gpu", "--check-env"]
runpy.run_path(path, run_name="__main__")' "$REPO/structfx/bench_gpu.py" || {
    echo "gpu.sh: this Python / torch / triton lacks what structfx needs (see above)" >&2; exit 2; }

importable() {  # structfx from $REPO, kernels and passes included, backend entry point listed
    STRUCTFX_REPO="$REPO" "$PY" - <<'PYEOF'
import importlib.metadata as md, os, pathlib
import structfx, structfx.kernels.ops, structfx.passes.match  # noqa: F401
repo = pathlib.Path(os.environ["STRUCTFX_REPO"]).resolve()
assert pathlib.Path(structfx.__file__).resolve().parents[1] == repo, structfx.__file__
assert "structfx" in {e.name for e in md.entry_points(group="torch_dynamo_backends")}
PYEOF
}

how=""
if [ "${STRUCTFX_STAGE:-0}" != 1 ]; then
    if importable 2>/dev/null; then
        how="already installed from $REPO"
    elif "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e "$REPO" \
            && importable; then
        how="pip install --no-index --no-deps --no-build-isolation -e $REPO"
    fi
fi
if [ -z "$how" ]; then
    STAGE="$(mktemp -d)/site"
    mkdir -p "$STAGE/structfx" "$STAGE/structfx-0.1.0.dist-info"
    for f in "$REPO"/structfx/*.py; do ln -s "$f" "$STAGE/structfx/"; done
    ln -s "$REPO/kernels" "$STAGE/structfx/kernels"
    ln -s "$REPO/passes" "$STAGE/structfx/passes"
    printf 'Metadata-Version: 2.1\nName: structfx\nVersion: 0.1.0\n' \
        > "$STAGE/structfx-0.1.0.dist-info/METADATA"
    printf '[torch_dynamo_backends]\nstructfx = structfx.backend:structfx_backend\n' \
        > "$STAGE/structfx-0.1.0.dist-info/entry_points.txt"
    export PYTHONPATH="$STAGE${PYTHONPATH:+:$PYTHONPATH}"
    importable || { echo "gpu.sh: structfx is not importable, even staged at $STAGE" >&2; exit 2; }
    how="staged at $STAGE (PYTHONPATH)"
fi
echo "gpu.sh: structfx $how"
export PYTHONUNBUFFERED=1
exec "$PY" -m structfx.bench gpu --out "$OUT" "$@"
