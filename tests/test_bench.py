"""``python -m structfx.bench ops``: the table's shape and sanity of the numbers, never speed.

Run as subprocesses: the command is what a user types, and the benchmark's process-wide
settings (threads, TRITON_INTERPRET on CUDA) stay out of the test session.
"""
import json
import math
import re
import subprocess
import sys

COLUMNS = ["shape", "T", "dense ms", "low-rank ms / ratio", "BLAST ms / ratio (b)",
           "SS1 ms / ratio"]
CELL = re.compile(r"^(?P<ms>\S+) / (?P<ratio>\S+)(?: \(b=(?P<b>\d+)\))?$")


def run_bench(*argv: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "structfx.bench", "ops", *argv],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def parse_table(stdout: str) -> tuple[list[str], list[list[str]]]:
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    split = lambda line: [c.strip() for c in line.strip("|").split("|")]  # noqa: E731
    header, rule, *rows = lines
    assert set(rule) <= set("|-: ")
    return split(header), [split(row) for row in rows]


def positive_finite(text: str) -> float:
    value = float(text)
    assert math.isfinite(value) and value > 0, text
    return value


def check_cell(text: str, blocks=None) -> None:
    match = CELL.match(text)
    assert match, f"cell {text!r} is not 'ms / ratio [(b=k)]'"
    positive_finite(match["ms"])
    positive_finite(match["ratio"])
    if blocks is not None:
        assert int(match["b"]) in blocks


def test_quick_table_and_json(tmp_path):
    out = tmp_path / "bench.json"
    stdout = run_bench("--quick", "--all-blocks", "--json", str(out))
    first = stdout.splitlines()[0]
    for word in ("device:", "torch", "threads", "dtype", "params"):
        assert word in first

    header, rows = parse_table(stdout)
    assert header == COLUMNS + ["BLAST b=1", "BLAST b=2", "BLAST b=4"]
    shapes = sorted({row[0] for row in rows})
    tokens = sorted({int(row[1]) for row in rows})
    assert shapes == ["256x256", "256x512"] and tokens == [1, 16]
    assert len(rows) == len(shapes) * len(tokens)
    for row in rows:
        cells = dict(zip(header, row))
        positive_finite(cells["dense ms"])
        check_cell(cells["low-rank ms / ratio"])
        check_cell(cells["BLAST ms / ratio (b)"], blocks={1, 2, 4})
        check_cell(cells["SS1 ms / ratio"])
        for b in (1, 2, 4):
            check_cell(cells[f"BLAST b={b}"])

    data = json.loads(out.read_text())
    assert len(data["cells"]) == len(rows) and not data["failures"]
    for cell in data["cells"]:
        assert cell["ss1_compression"] == 2
        assert set(cell["blast_ms"]) == {"1", "2", "4"}
        assert cell["best_b"] in (1, 2, 4)
        for ms in [cell["dense_ms"], cell["lowrank_ms"], cell["ss1_ms"],
                   *cell["blast_ms"].values()]:
            assert math.isfinite(ms) and ms > 0
