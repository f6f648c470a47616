"""The GPU check scripts run first time on a lent machine: ``eval/bench/run_all_gpu.py`` keeps the
caller's PYTHONPATH (packages carried there stay importable) and fails when a check fails;
``gpu_check_train.py``'s CPU dry run (``DEV=cpu SMALL=1``) frees every part's model and its FLOP
count matches torch's ``FlopCounterMode``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUN_ALL_GPU = REPO / "eval" / "bench" / "run_all_gpu.py"


def _carried(tmp_path: Path) -> Path:
    """A folder to carry on PYTHONPATH whose ``sitecustomize`` leaves one marker file per Python
    process that starts with it on its path."""
    carried = tmp_path / "carried"
    carried.mkdir()
    (carried / "sitecustomize.py").write_text(
        "import os, sys\n"
        "open(os.path.join(os.environ['MARKS'], f'{os.getpid()}'), 'w').write(' '.join(sys.argv))\n")
    return carried


def test_run_all_gpu_keeps_a_carried_pythonpath_and_fails_when_a_check_fails(tmp_path):
    carried, marks, out = _carried(tmp_path), tmp_path / "marks", tmp_path / "out"
    marks.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(carried), MARKS=str(marks), OUT=str(out),
               DEV="cpu", SMALL="1", STEPS="3")
    p = subprocess.run([sys.executable, str(RUN_ALL_GPU), "--only", "train", "--budget-s", "300"], env=env,
                       capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    # the check ran with the carried entry on its path (run_all_gpu itself was started with it too)
    assert any("gpu_check_train.py" in m.read_text() for m in marks.iterdir()), [m.read_text() for m in marks.iterdir()]
    res = json.loads((out / "gpu_bench.json").read_text())["train"]
    assert res["rc"] == 0
    r = res["result"]
    assert r["failed"] == [] and all(r[k]["models_alive_after"] == 0 for k in r if k.startswith(("A_", "B_")))
    assert r["A_fsdp2_real_width_layers"]["flop_count_check"]["equal"]

    # a check that fails (here: gpu_check_train asking for CUDA on a machine without it) fails the run
    env["DEV"] = "cuda"
    p = subprocess.run([sys.executable, str(RUN_ALL_GPU), "--only", "train", "--budget-s", "120"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and "failed: train" in p.stderr, p.stdout + p.stderr[-2000:]
    assert json.loads((out / "gpu_bench.json").read_text())["train"]["rc"] != 0


def test_sbatch_scripts_ask_for_the_nodes_host_memory():
    """Without --mem a cluster's default memory per CPU decides (often far below what building the
    model or mapping model.init takes): every sbatch script asks for the node's memory."""
    scripts = sorted(p for p in (REPO / "slurm").glob("*.sh") if p.name != "common.sh")
    assert scripts
    for p in scripts:
        lines = [x for x in p.read_text().splitlines() if x.startswith("#SBATCH")]
        assert "#SBATCH --mem=0" in lines, p.name
