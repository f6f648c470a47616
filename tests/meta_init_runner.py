"""Meta-device init against building the whole model first, on 2 CPU ranks (gloo), the functions
``LeLMTrainModule.configure_model`` calls under ``strategy=fsdp2``. Launch::

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/meta_init_runner.py --out OUT --init DIR

Each rank builds, for each case, the module the old way (every rank: the whole model, weights
loaded or randomly initialised on the host, then ``fully_shard``) and the new way (built on the
meta device, sharded, materialised, filled from rank 0), and compares its own shards of every
parameter bit for bit. ``OUT/rank<R>.json``: per case the names whose shards differ (none
expected), plus the error every rank must raise for an init file that lacks a needed key.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from conftest import tiny_config  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402

from levo_infer.checkpoint import find_weights, load_weights  # noqa: E402
from levo_train.parallel import parallelize  # noqa: E402
from levo_train.train.base import DeferredInit  # noqa: E402
from levo_train.train.dpo import DPOModule  # noqa: E402
from levo_train.train.lm import LMModule  # noqa: E402


def shards(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: (v.to_local() if hasattr(v, "to_local") else v).detach().clone() for k, v in module.state_dict().items()}


def differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    assert a.keys() == b.keys(), (sorted(a.keys() ^ b.keys()))[:4]
    return [k for k in a if not torch.equal(a[k], b[k])]


def dpo_from_file(init: Path, mesh: Any, *, meta: bool) -> DPOModule:
    """A DPO module (policy + frozen reference) filled from ``init`` and sharded over ``mesh``."""
    m = DPOModule(tiny_config(), reference="model", meta_init=meta, activation_checkpointing=True)
    if meta:
        m.deferred_init = DeferredInit(weights=find_weights(init))
    else:
        load_weights(m.model, find_weights(init))
    m.freeze_reference()
    parallelize(m.model, activation_checkpointing=True, mesh=mesh)
    parallelize(m.ref, mesh=mesh)
    if meta:
        m.materialize_model("cpu", mesh.get_group())
    return m


def lm_random(mesh: Any, *, meta: bool, seed: int) -> LMModule:
    torch.manual_seed(seed)
    m = LMModule(tiny_config(), meta_init=meta)
    parallelize(m.model, mesh=mesh)
    if meta:
        m.materialize_model("cpu", mesh.get_group())
    return m


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--init", type=Path, required=True, help="a released-format folder of tiny_config()")
    ap.add_argument("--broken", type=Path, required=True, help="the same without a used key")
    a = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    res: dict[str, Any] = {}

    old, new = dpo_from_file(a.init, mesh, meta=False), dpo_from_file(a.init, mesh, meta=True)
    res["dpo_policy_differs"] = differing(shards(old.model), shards(new.model))
    res["dpo_ref_differs"] = differing(shards(old.ref), shards(new.ref))
    res["ref_frozen"] = not any(p.requires_grad for p in new.ref.parameters()) and not new.ref.training
    res["policy_trains"] = sum(p.requires_grad for p in new.model.parameters())
    res["sharded"] = all(hasattr(p, "to_local") for p in new.model.parameters())
    res["local_elems"] = sum(p.to_local().numel() for p in new.model.parameters())
    res["full_elems"] = sum(p.numel() for p in new.model.parameters())

    res["random_differs"] = differing(shards(lm_random(mesh, meta=False, seed=3).model),
                                      shards(lm_random(mesh, meta=True, seed=3).model))
    res["rng_untouched"] = True
    torch.manual_seed(5)
    before = torch.get_rng_state()
    lm_random(mesh, meta=True, seed=5)
    res["rng_untouched"] = torch.equal(before, torch.get_rng_state())  # building on meta draws nothing

    try:
        dpo_from_file(a.broken, mesh, meta=True)
        res["broken"] = None
    except ValueError as e:
        res["broken"] = str(e)
    dist.barrier()
    (a.out / f"rank{rank}.json").write_text(json.dumps(res))
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
