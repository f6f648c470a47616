"""LeLM structure, released layout, KV cache and checkpoint checks."""

from __future__ import annotations

import pytest
import torch
from conftest import released_config_path, tiny_config

from levo_infer import load_model
from levo_infer.checkpoint import (
    CheckpointError,
    load_weights,
    released_state_dict,
    save_released,
)
from levo_infer.config import ConfigError, load_config, save_config
from levo_infer.generate import generate
from levo_infer.model import LeLM
from levo_infer.pattern import build_delayed

LYRICS = ["[verse] la da love . night la ; [chorus] love love", None]
STYLES = ["[Musicality-high], rock, sad", "pop"]


def n_keys(L1: int, L2: int) -> int:
    return 26 + 9 * (L1 + L2)


def test_released_v2_large_layout():
    cfg = load_config(released_config_path())
    assert cfg.version == "v2" and cfg.prefix_len == 952 and cfg.delays == [0, 250, 250]
    with torch.device("meta"):
        m = LeLM(cfg)
    sd = m.state_dict()
    assert len(sd) == 458 == n_keys(36, 12)
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["condition_provider.conditioners.description.output_proj.weight"] == (151659, 2048)
    assert shapes["condition_provider.conditioners.description.structure_emb.weight"] == (200, 2048)
    assert shapes["condition_provider.conditioners.type_info.output_proj.weight"] == (151652, 2048)
    assert shapes["condition_provider.conditioners.prompt_audio.emb.2.weight"] == (16386, 2048)
    assert shapes["condition_provider.conditioners.prompt_audio.EOT_emb"] == (1, 2048)
    assert shapes["condition_provider.conditioners.prompt_audio.layer2_EOT_emb"] == (1, 2048)
    assert shapes["emb.0.weight"] == (16386, 2048) and "emb.1.weight" not in shapes
    assert shapes["layer2_emb.0.weight"] == (16386, 2048)
    assert shapes["transformer.lm_head.weight"] == (16385, 2048)
    assert shapes["transformer.model.embed_tokens.weight"] == (16385, 2048)
    assert shapes["transformer2.model.layers.11.mlp.down_proj.weight"] == (2048, 11008)
    assert shapes["mlp.0.weight"] == (2048, 4096) and shapes["mlp.2.bias"] == (2048,)
    assert shapes["linears.1.weight"] == (16385, 2048)
    assert shapes["out_norm.bias"] == (2048,)
    assert sum(v.numel() for v in sd.values()) == pytest.approx(5.12e9, rel=0.01)


def test_released_config_roundtrip(tmp_path):
    src = released_config_path()
    cfg = load_config(src)
    save_config(cfg, tmp_path)
    text = (tmp_path / "config.yaml").read_text()
    assert "${eval:${prompt_len}*${audio_tokenizer_frame_rate}+2}" in text  # interpolation kept
    assert "load_yaml:conf/vocab.yaml" in text
    again = load_config(tmp_path)
    assert again == cfg


def test_tiny_variant_same_keys_as_formula(tmp_path):
    for L1, L2 in [(2, 1), (3, 2)]:
        cfg = tiny_config(num_layers=L1, num_layers_sub=L2)
        sd = LeLM(cfg).state_dict()
        assert len(sd) == n_keys(L1, L2)
        save_config(cfg, tmp_path / f"{L1}{L2}")
        assert load_config(tmp_path / f"{L1}{L2}") == cfg


def test_unknown_version_is_an_error(tmp_path):
    cfg = tiny_config()
    save_config(cfg, tmp_path)
    p = tmp_path / "config.yaml"
    p.write_text(p.read_text().replace("version: v2", "version: v9"))
    with pytest.raises(ConfigError, match="unknown model version 'v9'"):
        load_config(tmp_path)


def test_delay_pattern_layout():
    codes = torch.arange(1, 7).view(1, 2, 3)  # 2 streams, 3 frames
    seq = build_delayed(codes, [0, 2], special=99)
    assert seq.tolist() == [[[99, 1, 2, 3, 99, 99], [99, 99, 99, 4, 5, 6]]]


def test_kv_cache_matches_full_forward(tiny_model):
    m = tiny_model
    torch.manual_seed(1)
    codes = torch.randint(0, 16, (2, 3, 7))
    cond = m.prepare_conditions(LYRICS, STYLES)
    seq = build_delayed(codes, m.cfg.delays, m.pad_id)[:, :, :-1]
    with torch.no_grad():
        full1, full2 = m.step_hidden(seq, m.condition_prefix(cond))
        P = m.cfg.prefix_len
        caches = m.new_caches(2, P + seq.shape[2])
        h1, h2 = m.step_hidden(seq[:, :, :1], m.condition_prefix(cond), caches, start=0)
        outs1, outs2 = [h1], [h2]
        s = 1
        while s < seq.shape[2]:  # mix single steps and a chunk of 2 (chunked prefill path)
            n = 2 if s == 3 else 1
            h1, h2 = m.step_hidden(seq[:, :, s:s + n], None, caches, start=P + s)
            outs1.append(h1)
            outs2.append(h2)
            s += n
    torch.testing.assert_close(torch.cat(outs1, 1), full1, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.cat(outs2, 1), full2, atol=1e-5, rtol=1e-4)


def test_logits_shape_and_causality(tiny_model):
    m = tiny_model
    codes = torch.randint(0, 16, (2, 3, 6))
    lo = m.logits(codes, LYRICS, STYLES)
    assert lo.shape == (2, 3, 6, 17)
    # changing a later frame of stream 0 must not change earlier predictions of any stream
    codes2 = codes.clone()
    codes2[:, 0, 4] = (codes2[:, 0, 4] + 1) % 16
    lo2 = m.logits(codes2, LYRICS, STYLES)
    torch.testing.assert_close(lo[:, 0, :5], lo2[:, 0, :5])
    # stream 1/2 frame t is predicted at step t+2, which has seen stream-0 frames <= t+1
    torch.testing.assert_close(lo[:, 1:, :3], lo2[:, 1:, :3])
    assert not torch.allclose(lo[:, 0, 5], lo2[:, 0, 5])


def test_conditioners_get_gradients(tiny_model):
    m = tiny_model.train()
    codes = torch.randint(0, 16, (2, 3, 5))
    prompt = torch.randint(0, 16, (2, 3, 3))
    out = m(codes, m.prepare_conditions(LYRICS, STYLES, prompt))
    out.logsumexp(-1).mean().backward()
    conds = m.condition_provider.conditioners
    for p in (conds["description"].output_proj.weight, conds["description"].structure_emb.weight,
              conds["type_info"].output_proj.weight, conds["prompt_audio"].emb[0].weight,
              conds["prompt_audio"].EOT_emb, conds["prompt_audio"].layer2_EOT_emb):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_prompt_rows_eos_prefix(tiny_model):
    m = tiny_model
    pr = torch.tensor([[[1, 2], [3, 4], [5, 6]], [[17, 17], [17, 17], [17, 17]]])
    rows = m.prompt_rows(pr, 2)
    assert rows.shape == (2, 3, 4)
    assert rows[0, :, 0].tolist() == [16, 16, 16] and rows[0, 0].tolist() == [16, 1, 2, 17]
    assert (rows[1] == 17).all()


def test_export_roundtrip_identical_logits(tiny_model, tmp_path):
    save_released(tiny_model, tmp_path / "exp")
    sd = torch.load(tmp_path / "exp" / "model.pt", weights_only=True)
    assert all(k.startswith("audiolm.") for k in sd) and len(sd) == n_keys(2, 1)
    m2 = load_model(tmp_path / "exp")
    codes = torch.randint(0, 16, (2, 3, 5))
    torch.testing.assert_close(m2.logits(codes, LYRICS, STYLES), tiny_model.logits(codes, LYRICS, STYLES), rtol=0, atol=0)


@pytest.mark.parametrize("breakage", ["missing", "extra", "shape"])
def test_bad_checkpoint_names_the_key(tiny_model, tmp_path, breakage):
    sd = released_state_dict(tiny_model)
    key = "audiolm.transformer.model.layers.1.mlp.up_proj.weight"
    if breakage == "missing":
        del sd[key]
    elif breakage == "extra":
        key = "audiolm.transformer.model.layers.7.mlp.up_proj.weight"
        sd[key] = torch.zeros(3)
    else:
        sd[key] = torch.zeros(5, 5)
    torch.save(sd, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        load_weights(LeLM(tiny_model.cfg), tmp_path / "model.pt")


def test_greedy_generation_batched_equals_single(tiny_model):
    m = tiny_model
    out = generate(m, LYRICS, STYLES, max_frames=8, top_k=1, cfg_coef=1.5)
    for i in range(2):
        one = generate(m, LYRICS[i:i + 1], STYLES[i:i + 1], max_frames=8, top_k=1, cfg_coef=1.5)
        assert one.lengths[0] == out.lengths[i]
        assert torch.equal(one.codes[0], out.codes[i])


def test_released_config_tokenizers_match_tables(tmp_path, monkeypatch):
    monkeypatch.setenv("LEVO_CACHE_DIR", str(tmp_path))
    cfg = load_config(released_config_path())
    with torch.device("meta"):
        m = LeLM(cfg)
    lyr, sty = m.tokenizers  # third_party/Qwen2-7B is absent here: offline Qwen2 build
    assert (lyr.vocab_size, sty.vocab_size) == (151659, 151652)
    assert lyr.encode("[verse] hello")[:2] == [151644, 151646]
