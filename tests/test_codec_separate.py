"""Stems for the encoder (levo_infer.codec.separate): the default htdemucs separator loaded from a
released-format ``htdemucs.{pth,yaml}`` (a tiny random HTDemucs written here in the demucs package
format: a pickle whose ``klass`` is a class reference), read weights-only; bgm = full − vocal; given
stems; a checkpoint that would run code; the missing optional extra."""

from __future__ import annotations

import pickle
import random
import sys

import pytest
import torch
from codec_fixtures import tiny_htdemucs, write_released_demucs

from levo_infer.codec.separate import BUNDLE_DEMUCS, DemucsSeparator, SeparatorError, load_htdemucs, stems

pytest.importorskip("demucs_infer")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime")
    write_released_demucs(root / BUNDLE_DEMUCS, tiny_htdemucs())
    (root / "ckpt").mkdir()
    return root


def _song(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.3 * torch.randn(2, n, generator=g)


def test_released_htdemucs_loads_weights_only_and_separates_deterministically(bundle):
    sep = DemucsSeparator.from_path(bundle)  # the bundle root: third_party/demucs/ckpt/htdemucs.pth
    ref = tiny_htdemucs()
    got = sep.model.state_dict()
    assert all(torch.equal(got[k], v.half().float() if v.is_floating_point() else v) for k, v in ref.state_dict().items())
    assert float(sep.model.segment) == 7.8 and sep.model.sources[sep.vocals] == "vocals"
    full = _song(48000 + 17, 0)
    random.seed(123)
    before = random.random()
    random.seed(123)
    v1 = sep(full, 48000)
    assert random.random() == before  # the shift trick's draw is seeded and the caller's state restored
    assert v1.shape == full.shape and v1.dtype == torch.float32 and bool(torch.isfinite(v1).all())
    assert torch.equal(v1, sep(full, 48000))
    vocal, bgm = stems(full, separator=sep)
    assert torch.equal(vocal, v1) and torch.equal(bgm, full - v1)  # bgm = full − vocal, as released


def test_given_stems_and_separator_output_are_checked():
    full = _song(1000, 1)
    v = _song(1000, 2)
    assert torch.equal(stems(full, v)[1], full - v) and torch.equal(stems(full, bgm=v)[0], full - v)
    assert torch.equal(stems(full, separator=lambda w, sr: w[0].numpy() * 0.5)[0], (full[0] * 0.5).expand(2, -1))
    for sep, words in [(lambda w, sr: w[:, :10], "vocal stem holds 10 samples"),
                       (lambda w, sr: "no", "returned str"),
                       (lambda w, sr: 1 / 0, "the separator failed \\(ZeroDivisionError"),
                       (lambda w, sr: w * float("nan"), "NaN")]:
        with pytest.raises(ValueError, match=words):
            stems(full, separator=sep, what="a.wav")
    with pytest.raises(SeparatorError, match="no vocal/bgm stems and no separator"):
        stems(full)


class _RunsCode:
    def __reduce__(self):
        return (open, ("/tmp/levo-should-not-exist", "w"))


def test_a_checkpoint_that_would_run_code_or_is_not_htdemucs_is_refused(tmp_path, monkeypatch):
    evil = tmp_path / "evil"
    evil.mkdir()
    torch.save({"klass": _RunsCode(), "args": (), "kwargs": {}, "state": {}}, evil / "htdemucs.pth")
    with pytest.raises(SeparatorError, match="builds HTDemucs only"):
        load_htdemucs(evil / "htdemucs.pth")
    import os

    assert not os.path.exists("/tmp/levo-should-not-exist")  # mapped to an inert stand-in, never called
    (evil / "htdemucs.pth").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(SeparatorError, match="not a readable torch checkpoint|cannot read it"):
        load_htdemucs(evil / "htdemucs.pth")
    with pytest.raises(SeparatorError, match="looked for .*third_party/demucs/ckpt/htdemucs.pth"):
        DemucsSeparator.from_path(tmp_path / "nowhere")
    monkeypatch.setitem(sys.modules, "demucs_infer.htdemucs", None)  # the optional extra not installed
    with pytest.raises(SeparatorError, match=r"levo-train\[separate\]"):
        load_htdemucs(evil / "htdemucs.pth")
