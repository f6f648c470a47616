"""``eval/bench/run_all.py --only NAME`` replaces just that benchmark's rows of the README's
performance table, where they stood, and leaves every other row alone."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run_all():
    spec = importlib.util.spec_from_file_location("run_all", REPO / "eval" / "bench" / "run_all.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["run_all"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def test_only_replaces_that_benchmarks_rows_in_place(tmp_path, monkeypatch):
    ra = _run_all()
    readme = tmp_path / "README.md"
    table = [ra.START, "", "| what | ours | reference | command |", "|---|---|---|---|",
             "| a | 1 | — | `OMP_NUM_THREADS=1 python eval/bench/bench_train.py` |",
             "| e1 | old | — | `OMP_NUM_THREADS=1 python eval/bench/bench_engine.py --toy-init SFT_EXPORT` (2026-01-01) |",
             "| e2 | old | — | `OMP_NUM_THREADS=1 python eval/bench/bench_engine.py --toy-init SFT_EXPORT` (2026-01-01) |",
             "| z | 9 | — | `OMP_NUM_THREADS=1 python eval/bench/bench_codec.py` |", "", ra.END]
    readme.write_text("# title\n\nprose\n\n" + "\n".join(table) + "\n\nafter\n")
    monkeypatch.setattr(ra, "README", readme)
    engine = [b for b in ra.benches(False, None) if b.name == "engine"]
    cmd = "OMP_NUM_THREADS=1 python eval/bench/bench_engine.py --toy-init SFT_EXPORT"
    n = ra.update_readme_rows(engine, [("n1", "new", "ref", cmd), ("n2", "new", "ref", cmd), ("n3", "new", "ref", cmd)],
                              "2026-12-07")
    assert n == 3
    text = readme.read_text()
    rows = [line.split(" | ")[0] for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert rows == ["| a", "| n1", "| n2", "| n3", "| z"]
    assert text.startswith("# title\n\nprose\n\n") and text.endswith("\n\nafter\n")
    assert f"`{cmd}` (2026-12-07) |" in text and "old" not in text
