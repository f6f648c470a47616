"""Model config checks: unknown keys warn (fail under strict), missing keys that change the model's
math warn with the default taken, contradictions always fail, and the position limit is enforced."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
from conftest import released_config_path, tiny_config
from test_infer_cli import RELEASED_TINY, VOCAB_YAML

from levo_infer.config import ConfigError, ConfigWarning, load_config, make_config, save_config
from levo_infer.generate import generate
from levo_infer.model import LeLM, SequenceTooLongError


def released_folder(root: Path, text: str = RELEASED_TINY) -> Path:
    """ROOT/conf/vocab.yaml + ROOT/ckpt/m/config.yaml holding ``text``; returns the config file."""
    (root / "conf").mkdir(parents=True, exist_ok=True)
    (root / "conf" / "vocab.yaml").write_text(VOCAB_YAML)
    folder = root / "ckpt" / "m"
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(text)
    return folder / "config.yaml"


def edited(old: str, new: str) -> str:
    assert RELEASED_TINY.count(old) == 1, old
    return RELEASED_TINY.replace(old, new)


def load_silently(path: Path, *, strict: bool) -> object:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return load_config(path, strict=strict)


# ----------------------------------------------------------------------------- files that must load cleanly
def test_released_configs_load_without_warnings_even_strict(tmp_path):
    cfg = load_silently(released_config_path(), strict=True)
    assert cfg.lm.rope_theta == 500000.0 and cfg.delays == [0, 250, 250]
    tiny = load_silently(released_folder(tmp_path), strict=True)
    assert tiny.delays == [0, 3, 3]


def test_our_exports_load_without_warnings_under_strict(tmp_path):
    for name, cfg in [("tiny", tiny_config()), ("v1", tiny_config(version="v1")),
                      ("qwen", make_config(dim=32, num_heads=2, num_layers=1, num_layers_sub=1)),
                      ("released", load_config(released_config_path()))]:
        save_config(cfg, tmp_path / name)
        assert load_silently(tmp_path / name, strict=True) == cfg


# ----------------------------------------------------------------------------- unknown and missing keys
def test_misspelled_key_warns_naming_file_key_and_suggestion(tmp_path):
    path = released_folder(tmp_path, edited("  rope_theta: 500000.0\n", "  rope_thetta: 500000.0\n"))
    with pytest.warns(ConfigWarning) as rec:
        cfg = load_config(path)
    msgs = [str(w.message) for w in rec]
    unknown = [m for m in msgs if "lm.rope_thetta" in m]
    assert len(unknown) == 1 and str(path) in unknown[0] and "did you mean `lm.rope_theta`" in unknown[0]
    missing = [m for m in msgs if "`lm.rope_theta` is missing" in m]
    assert len(missing) == 1 and "500000.0" in missing[0] and str(path) in missing[0]
    assert cfg.lm.rope_theta == 500000.0
    with pytest.raises(ConfigError, match=r"lm\.rope_thetta.*did you mean `lm\.rope_theta`") as e:
        load_config(path, strict=True)
    assert str(path) in str(e.value) and "`lm.rope_theta` is missing" in str(e.value)


def test_unknown_section_warns_and_fails_strict(tmp_path):
    path = released_folder(tmp_path, RELEASED_TINY + "codebook_pattern:\n  modeling: delay\nmy_notes:\n  a: 1\n")
    with pytest.warns(ConfigWarning) as rec:
        load_config(path)
    msgs = [str(w.message) for w in rec]
    assert any("unknown section `codebook_pattern`" in m and "did you mean `codebooks_pattern`" in m for m in msgs)
    assert any("unknown section `my_notes`" in m and "did you mean" not in m for m in msgs)
    with pytest.raises(ConfigError, match="codebook_pattern"):
        load_config(path, strict=True)


@pytest.mark.parametrize("old,key,default", [
    ("    delays: [ 0, 3, 3 ]\n", "codebooks_pattern.delay.delays", "[0, 250, 250]"),
    ("  rope_theta_sub: 500000.0\n", "lm.rope_theta_sub", "500000.0"),
    ("  max_position_embeddings: 10000\n", "lm.max_position_embeddings", "10000"),
    ("  inference_coef: 1.5\n", "classifier_free_guidance.inference_coef", "1.5"),
])
def test_missing_key_that_changes_the_model_warns_with_the_default(tmp_path, old, key, default):
    path = released_folder(tmp_path, edited(old, ""))
    with pytest.warns(ConfigWarning, match=rf"`{key}` is missing.*default {re.escape(default)}"):
        load_config(path)
    with pytest.raises(ConfigError, match=rf"{path}.*`{key}` is missing"):
        load_config(path, strict=True)


# ----------------------------------------------------------------------------- contradictions
@pytest.mark.parametrize("old,new,key,value", [
    ("  modeling: delay\n", "  modeling: parallel\n", "codebooks_pattern.modeling", "'parallel'"),
    ("    flatten_first: 0\n", "    flatten_first: 1\n", "codebooks_pattern.delay.flatten_first", "1"),
    ("  lm_type: Llama # [Llama]\n", "  lm_type: Transformer\n", "lm.lm_type", "'Transformer'"),
    ("  dropout: 0.0\n", "  dropout: 0.1\n", "lm.dropout", "0.1"),
    ("      code_size: 16384\n", "      code_size: 16385\n", "conditioners.prompt_audio.qt_embedding.code_size", "16385"),
    ("      code_depth: 3\n", "      code_depth: 2\n", "conditioners.prompt_audio.qt_embedding.code_depth", "2"),
    ("    model: QwTokenizer\n", "    model: T5\n", "conditioners.description.model", "'T5'"),
    ("  prepend: [ description, prompt_audio, type_info ]\n", "  prepend: [ prompt_audio, description, type_info ]\n",
     "fuser.prepend", "['prompt_audio', 'description', 'type_info']"),
    ("  sum: []\n", "  sum: [ type_info ]\n", "fuser.sum", "['type_info']"),
])
def test_contradictions_always_fail(tmp_path, old, new, key, value):
    path = released_folder(tmp_path, edited(old, new))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert str(path) in msg and f"`{key}`" in msg and f"= {value}" in msg and "expected" in msg


def test_wrong_lyric_tag_list_fails(tmp_path):
    path = released_folder(tmp_path)
    wrong = VOCAB_YAML.replace("- '[silence]'\n", "")
    # load_yaml reads only inside the config's folder: ROOT/conf/vocab.yaml (the released code root's)
    # is never opened, conf/vocab.yaml then names the bundled list
    (tmp_path / "conf" / "vocab.yaml").write_text(wrong)
    assert len(load_config(path).lyric_tags) == 13
    (path.parent / "conf").mkdir()
    (path.parent / "conf" / "vocab.yaml").write_text(wrong)
    with pytest.raises(ConfigError, match=r"add_token_list.*13 released structure tags"):
        load_config(path)


# ----------------------------------------------------------------------------- max_position_embeddings
def test_positions_that_cannot_hold_one_frame_fail_at_load(tmp_path):
    cfg = tiny_config()
    save_config(cfg, tmp_path)
    p = tmp_path / "config.yaml"
    limit = cfg.prefix_len + max(cfg.delays)  # the prefix and the delay tail fill every position
    p.write_text(p.read_text().replace("max_position_embeddings: 10000", f"max_position_embeddings: {limit}"))
    with pytest.raises(ConfigError, match=rf"lm\.max_position_embeddings={limit}.*no frame"):
        load_config(tmp_path)


def test_forward_and_generation_past_max_positions_fail_before_compute(monkeypatch):
    cfg = tiny_config()
    P, maxd = cfg.prefix_len, max(cfg.delays)
    cfg.lm.max_position_embeddings_sub = P + maxd + 6  # 6 frames fit
    torch.manual_seed(0)
    m = LeLM(cfg)
    m.init_weights(std=0.2)
    m.eval()
    assert m.max_frames == 6
    cond = m.prepare_conditions(["[verse] la"], ["pop"])
    with torch.no_grad():
        assert m.frame_hidden(torch.zeros(1, 3, 6, dtype=torch.long), cond).shape[2] == 6
        with pytest.raises(SequenceTooLongError) as e:
            m.frame_hidden(torch.zeros(1, 3, 7, dtype=torch.long), cond)
        steps = torch.full((1, 3, maxd + 7), m.pad_id)  # the steps of 7 frames, as training feeds them
        with pytest.raises(SequenceTooLongError):
            m.step_hidden(steps, m.condition_prefix(cond))
        with pytest.raises(SequenceTooLongError):  # one cached decoding step past the limit
            m.step_hidden(steps[:, :, :1], None, m.new_caches(1, P + maxd + 8), start=P + maxd + 6)
    msg = str(e.value)
    assert f"{P + 7 + maxd} positions" in msg and f"lm.max_position_embeddings_sub={P + maxd + 6}" in msg
    assert "7 frames" in msg and "at most 6 frames" in msg
    assert generate(m, ["[verse] la"], ["pop"], max_frames=6, top_k=1).codes.shape[2] == 6

    def no_compute(*a, **k):
        raise AssertionError("computed before the length check")

    monkeypatch.setattr(m, "condition_prefix", no_compute)
    monkeypatch.setattr(m, "step_hidden", no_compute)
    with pytest.raises(SequenceTooLongError, match="at most 6 frames"):
        generate(m, ["[verse] la"], ["pop"], max_frames=7, top_k=1)
