"""The shape issue #19 gave levo_infer, levo_data and levo_eval: the object ``load_model`` returns,
and one error type per package (no zoo of unrelated bases, no ``SystemExit`` from library code)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest
import torch
from conftest import tiny_config

import levo_data
import levo_eval
import levo_infer
from levo_data.errors import UsageError as DataUsageError
from levo_eval.errors import UsageError as EvalUsageError
from levo_infer import LevoInferError, SongLM, load_model
from levo_infer.checkpoint import save_released
from levo_infer.generate import generate
from levo_infer.model import LeLM


def test_load_model_returns_an_lelm_that_generates_and_saves(tmp_path):
    """``load_model`` keeps ``.generate`` / ``.save`` / ``.logits`` and is still an LeLM; the model
    class itself has neither generation nor saving (model.py needs no generate/checkpoint module)."""
    torch.manual_seed(0)
    m = LeLM(tiny_config())
    m.init_weights(std=0.2)
    save_released(m, tmp_path / "a")
    a = load_model(tmp_path / "a")
    assert type(a) is SongLM and isinstance(a, LeLM)
    assert not hasattr(LeLM, "generate") and not hasattr(LeLM, "save")
    lyrics, styles = ["la da . love", None], ["rock", "pop"]
    out = a.generate(lyrics, styles, max_frames=5, seed=3)
    assert torch.equal(out.codes, generate(m.eval(), lyrics, styles, max_frames=5, seed=3).codes)
    codes = torch.randint(0, 16, (2, 3, 4))
    assert torch.equal(a.logits(codes, lyrics, styles), m.logits(codes, lyrics, styles))
    a.save(tmp_path / "b", dtype=torch.bfloat16)
    b = load_model(tmp_path / "b")
    assert b.dtype == torch.bfloat16 and set(b.state_dict()) == set(a.state_dict())
    assert all(torch.equal(v.to(torch.bfloat16), b.state_dict()[k]) for k, v in a.state_dict().items())


def _exception_classes(pkg) -> list[type]:
    """Every public exception class a package's modules define (warnings and ``__main__`` left out)."""
    found = []
    for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        if info.name.endswith("__main__"):
            continue
        mod = importlib.import_module(info.name)
        for name, obj in vars(mod).items():
            if (inspect.isclass(obj) and issubclass(obj, BaseException) and not issubclass(obj, Warning)
                    and obj.__module__ == mod.__name__ and not name.startswith("_")):
                found.append(obj)
    return found


@pytest.mark.parametrize("pkg, base", [(levo_infer, LevoInferError), (levo_data, DataUsageError),
                                       (levo_eval, EvalUsageError)])
def test_one_error_type_per_package(pkg, base):
    classes = _exception_classes(pkg)
    assert base in classes and issubclass(base, ValueError)
    assert [c.__qualname__ for c in classes if not issubclass(c, base)] == []


def test_library_code_raises_usage_errors_not_system_exit(tmp_path):
    from levo_eval.cli import toy_samples

    with pytest.raises(EvalUsageError, match="unknown --tier 'loud'"):
        toy_samples(str(tmp_path), n=1, seed=0, tier="loud")
