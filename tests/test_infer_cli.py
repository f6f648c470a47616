"""levo-infer end to end on CPU: loading released-format folders and our exports, the CLI, and the
clear errors for bad checkpoints, configs and input lines."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from test_infer import make_model

from levo_infer import cli, load_model
from levo_infer.checkpoint import CheckpointError, released_state_dict, save_released
from levo_infer.config import ConfigError, load_config
from levo_infer.model import LeLM
from levo_infer.prompts import AutoPromptLibrary, PromptError, language_of, load_prompt_tokens

RELEASED_TINY = """\
# ================ Train Config ================ #
lyric_processor:
max_dur: 2
min_dur: 1
prompt_len: 0.2
pad_to_max: true
audio_tokenizer_checkpoint: Flow1dVAE1rvq_./ckpt/model_1rvq/model_2_fixed.safetensors
audio_tokenizer_frame_rate: 25
audio_tokenizer_code_depth: 1
sample_rate: 48000
lm:
  lm_type: Llama # [Llama]
  dim: 32
  intermediate_size: 64
  num_heads: 2
  num_layers: 2
  num_layers_sub: 1
  code_depth: 3
  code_size: 16384
  max_position_embeddings: 10000
  max_position_embeddings_sub: 10000
  rope_theta: 500000.0
  rope_theta_sub: 500000.0
  dropout: 0.0
  use_flash_attn_2: true
  activation: gelu
  norm: layer_norm
codebooks_pattern:
  modeling: delay
  delay:
    delays: [ 0, 3, 3 ]
    flatten_first: 0
    empty_initial: 0
classifier_free_guidance:
  training_dropout: 0.15
  inference_coef: 1.5
attribute_dropout:
  args:
    active_on_eval: false
  text:
    description: 0.0
    type_info: 0.2
  audio:
    prompt_audio: 0.5
use_text_training: True
fuser:
  sum: []
  prepend: [ description, prompt_audio, type_info ]
conditioners:
  prompt_audio:
    model: qt_embedding
    qt_embedding:
      code_size: 16384
      code_depth: 3
      max_len: ${eval:${prompt_len}*${audio_tokenizer_frame_rate}+2}
  description:
    model: QwTokenizer
    QwTokenizer:
      token_path: third_party/Qwen2-7B
      max_len: 40
      add_token_list: ${load_yaml:conf/vocab.yaml}
  type_info:
    model: QwTextTokenizer
    QwTextTokenizer:
      token_path: third_party/Qwen2-7B
      max_len: 20
"""
VOCAB_YAML = "".join(f"- '{t}'\n" for t in (
    "[verse]", "[chorus]", "[bridge]", "[intro-short]", "[intro-medium]", "[intro-long]", "[outro-short]",
    "[outro-medium]", "[outro-long]", "[inst-short]", "[inst-medium]", "[inst-long]", "[silence]"))
EN = "[intro-short] ; [verse] walking through the quiet streets.city lights ; [chorus] i will find my way ; [outro-short]"
ZH = "[verse] 漂泊在无尽的沧海.寻觅那颗失落的心 ; [chorus] 让一切重新开始"




def make_released_folder(root: Path, name: str, *, seed: int = 0) -> Path:
    """A released-layout checkout: ROOT/conf/vocab.yaml + ROOT/ckpt/<name>/{config.yaml, model.pt}
    (flat ``audiolm.*`` dict, bf16 except the norms)."""
    (root / "conf").mkdir(parents=True, exist_ok=True)
    (root / "conf" / "vocab.yaml").write_text(VOCAB_YAML)
    folder = root / "ckpt" / name
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(RELEASED_TINY)
    cfg = load_config(folder)
    torch.manual_seed(seed)
    m = LeLM(cfg)
    m.init_weights(std=0.2)
    sd = {k: (v if "norm" in k else v.to(torch.bfloat16)) for k, v in released_state_dict(m).items()}
    torch.save(sd, folder / "model.pt")
    return folder


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> Path:
    return make_released_folder(tmp_path_factory.mktemp("rel"), "songgeneration_v2_tiny")


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("exp") / "export"
    save_released(make_model(), str(folder), dtype=torch.bfloat16)
    return folder


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows))
    return path


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    rc = cli.main([str(a) for a in argv] + ["--no-progress"])
    return rc, capsys.readouterr().err


def records(out: Path, name: str = "in") -> tuple[list[dict], list[dict]]:
    read = lambda p: [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []  # noqa: E731
    return read(out / "jsonl" / f"{name}.jsonl"), read(out / "jsonl" / f"{name}.errors.jsonl")


# ----------------------------------------------------------------------------- released folder
def test_released_tiny_folder_generates_through_cli(released, tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", [
        {"idx": "en", "gt_lyric": EN, "descriptions": "Warm Indie Folk, male vocal"},
        {"idx": "zh", "gt_lyric": ZH},
        {"idx": "3", "gt_lyric": "[verse] one more song"},
    ])
    out = tmp_path / "out"
    rc, err = run_cli(capsys, released, src, out, "--mode", "separate", "--duration", "0.6", "--batch-size", "2",
                      "--seed", "7", "--top-k", "50")
    assert rc == 0, err
    assert err.count("no audio codec") == 1  # tokens-only note, once
    ok, bad = records(out)
    assert bad == [] and [r["idx"] for r in ok] == ["en", "zh", "3"]
    r0 = ok[0]
    assert r0["style"] == "[Musicality-very-high], warm indie folk, male vocal"
    assert ok[1]["style"] == "[Musicality-very-high], ."
    assert r0["lyric"] == EN and r0["settings"]["version"] == "v2" and r0["settings"]["dtype"] == "float32"
    assert [r["seed"] for r in ok] == [7, 8, 9] and r0["settings"]["max_frames"] == 15
    for r in ok:
        files = {Path(p).name for p in r["tokens"]}
        assert files == {f"{r['idx']}.pt", f"{r['idx']}_vocal.pt", f"{r['idx']}_bgm.pt"}
        t = torch.load(out / "tokens" / f"{r['idx']}.pt", weights_only=True)
        assert t.dtype == torch.long and t.shape == (3, r["frames"]) and r["frames"] <= 15
        assert (t < 16384).all() and r["audios"] == []
        v = torch.load(out / "tokens" / f"{r['idx']}_vocal.pt", weights_only=True)
        b = torch.load(out / "tokens" / f"{r['idx']}_bgm.pt", weights_only=True)
        assert torch.equal(v[:2], t[:2]) and (v[2] == 9670).all()
        assert torch.equal(b[[0, 2]], t[[0, 2]]) and (b[1] == 3142).all()


def test_released_folder_loads_checked_and_converted(released):
    m = load_model(released, dtype="fp32")
    assert m.cfg.version == "v2" and m.dtype == torch.float32 and not m.training
    sd = torch.load(released / "model.pt", weights_only=True)
    w = sd["audiolm.transformer.model.layers.1.mlp.up_proj.weight"]
    assert w.dtype == torch.bfloat16
    assert torch.equal(m.transformer.model.layers[1].mlp.up_proj.weight, w.float())
    assert m.tokenizers[0].vocab_size == 151659 and m.tokenizers[1].vocab_size == 151652
    keep = load_model(released / "model.pt")  # the weights file itself; dtype None keeps the file's (bf16)
    assert keep.dtype == torch.bfloat16 and keep.transformer.model.norm.weight.dtype == torch.bfloat16
    out = keep.generate(["[verse] hello"], ["[Musicality-very-high], ."], max_frames=4, top_k=1)
    assert out.codes.shape == (1, 3, 4)


def test_v1_folder_name_rule(tmp_path):
    folder = make_released_folder(tmp_path, "songgeneration_base_tiny")
    m = load_model(folder)
    assert m.cfg.version == "v1"
    assert m.condition_provider.conditioners["type_info"].output_proj.weight.shape[0] == 151646
    out = m.generate(["[verse] hello"], ["pop"], max_frames=3, top_k=1)
    assert out.codes.shape == (1, 3, 3)


# ----------------------------------------------------------------------------- our export
def test_export_folder_with_prompts_through_cli(export, tmp_path, capsys):
    K = 3
    g = torch.Generator().manual_seed(0)
    pt = torch.randint(0, 64, (K, 9), generator=g)  # longer than the 3 prompt frames: truncated
    torch.save(pt, tmp_path / "prompt.pt")
    np.save(tmp_path / "prompt.npy", torch.randint(0, 64, (1, K, 2), generator=g).numpy().astype(np.int32))
    lib = {"Pop": [torch.randint(0, 64, (1, K, 3), generator=g) for _ in range(3)],
           "Rock": torch.randint(0, 64, (2, K, 3), generator=g)}
    torch.save(lib, tmp_path / "lib.pt")
    src = write_jsonl(tmp_path / "in.jsonl", [
        {"idx": "p1", "gt_lyric": "[verse] la da love", "prompt_audio_path": "prompt.pt", "descriptions": "rock"},
        {"idx": "p2", "gt_lyric": "[chorus] pop pop", "prompt_audio_path": str(tmp_path / "prompt.npy")},
        {"idx": "a1", "gt_lyric": "[verse] night", "auto_prompt_audio_type": "Pop"},
        {"idx": "a2", "gt_lyric": "[verse] sad", "auto_prompt_audio_type": "Auto"},
        {"idx": "n", "gt_lyric": "[bridge] happy"},
    ])
    out = tmp_path / "out"
    rc, err = run_cli(capsys, export, src, out, "--duration", "0.48", "--batch-size", "3", "--seed", "1",
                      "--auto-prompt-file", tmp_path / "lib.pt", "--tokens-only")
    assert rc == 0, err
    assert "no audio codec" not in err
    ok, bad = records(out)
    assert bad == [] and len(ok) == 5
    by = {r["idx"]: r for r in ok}
    assert by["p1"]["prompt"]["source"] == "prompt_audio_path" and by["p1"]["prompt"]["frames"] == 9
    assert by["a1"]["prompt"]["type"] == "Pop" and by["a2"]["prompt"]["type"] in ("Pop", "Rock")
    assert by["n"]["prompt"] is None and by["n"]["settings"]["version"] == "v2"
    t = torch.load(out / "tokens" / "p1.pt", weights_only=True)
    assert not (set(t[0].tolist()) & set(pt[0, :3].tolist()))  # the prompt's mixed codes are banned


def test_batch_size_and_low_mem_do_not_change_tokens(export, tmp_path, capsys):
    rows = [{"idx": str(i), "gt_lyric": f"[verse] {w} la", "descriptions": w} for i, w in
            enumerate(["love", "night", "rock", "pop", "sad"])]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    runs = [("b1", "--batch-size", "1"), ("b4", "--batch-size", "4", "--low-mem", "--not_use_flash_attn")]
    for name, *opts in runs:
        rc, err = run_cli(capsys, export, src, tmp_path / name, "--duration", "0.6", "--seed", "5",
                          "--temperature", "1.0", "--tokens-only", *opts)
        assert rc == 0, err
    for r in rows:
        a = torch.load(tmp_path / "b1" / "tokens" / f"{r['idx']}.pt", weights_only=True)
        b = torch.load(tmp_path / "b4" / "tokens" / f"{r['idx']}.pt", weights_only=True)
        assert torch.equal(a, b)


def test_bgm_mode_formatting_and_codec_interface(export, tmp_path, capsys, monkeypatch):
    class FakeCodec:
        sample_rate = 48000

        def decode(self, tokens, seed=None):
            return torch.zeros(2, 480 * tokens.shape[1] + 1)

    monkeypatch.setattr(cli, "load_codec", lambda ckpt, device: FakeCodec())
    monkeypatch.setattr("levo_infer.codec.find_codec_dir", lambda model_dir: Path(model_dir))
    src = write_jsonl(tmp_path / "in.jsonl", [{"idx": "x", "descriptions": "Calm Piano"}])  # bgm needs no lyric
    out = tmp_path / "out"
    rc, err = run_cli(capsys, export, src, out, "--bgm", "--duration", "0.3", "--seed", "0")
    assert rc == 0, err
    (r,), _ = records(out)
    assert r["lyric"] == "." and r["style"] == "[Musicality-very-high], [Pure-Music], calm piano"
    assert r["settings"]["mode"] == "bgm" and Path(r["audios"][0]).name == "x.flac"
    assert (out / "audios" / "x.flac").stat().st_size > 0
    t = torch.load(out / "tokens" / "x.pt", weights_only=True)
    assert (t[1] == 3142).all()


# ----------------------------------------------------------------------------- bad input
def test_bad_lines_are_reported_and_the_others_generated(export, tmp_path, capsys):
    torch.save(torch.zeros(3, 4, dtype=torch.long), tmp_path / "ok_prompt.pt")
    torch.save(torch.zeros(2, 4, dtype=torch.long), tmp_path / "bad_shape.pt")
    torch.save({"Pop": torch.zeros(1, 3, 3, dtype=torch.long)}, tmp_path / "lib.pt")
    src = write_jsonl(tmp_path / "in.jsonl", [
        {"idx": "good1", "gt_lyric": "[verse] la da"},                                                # 1
        {"idx": "both", "gt_lyric": "[verse] la", "prompt_audio_path": "ok_prompt.pt",
         "auto_prompt_audio_type": "Pop"},                                                             # 2
        {"idx": "unknown_type", "gt_lyric": "[verse] la", "auto_prompt_audio_type": "Polka"},          # 3
        {"idx": "no_lyric_in_verse", "gt_lyric": "[intro-short] ; [verse] ; [chorus] la"},           # 4
        {"idx": "no_tag", "gt_lyric": "la la ; [chorus] la"},                                          # 5
        "{not json",                                                                                   # 6
        {"idx": "audio", "gt_lyric": "[verse] la", "prompt_audio_path": "ref.flac"},                   # 7
        {"idx": "shape", "gt_lyric": "[verse] la", "prompt_audio_path": "bad_shape.pt"},               # 8
        {"idx": "good1", "gt_lyric": "[verse] da"},                                                    # 9 duplicate
        {"idx": "missing_lyric"},                                                                      # 10
        {"idx": "known_absent", "gt_lyric": "[verse] la", "auto_prompt_audio_type": "Jazz"},           # 11
        {"idx": "good2", "gt_lyric": "[chorus] love", "prompt_audio_path": "ok_prompt.pt"},            # 12
    ])
    out = tmp_path / "out"
    rc, err = run_cli(capsys, export, src, out, "--duration", "0.3", "--seed", "0", "--tokens-only",
                      "--auto-prompt-file", tmp_path / "lib.pt", "--strict")  # --strict: lyric findings fail
    assert rc == 1
    ok, bad = records(out)
    assert [r["idx"] for r in ok] == ["good1", "good2"]
    assert (out / "tokens" / "good1.pt").is_file() and (out / "tokens" / "good2.pt").is_file()
    msgs = {e["line"]: e["error"] for e in bad}
    assert sorted(msgs) == [2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    assert "both 'prompt_audio_path' and 'auto_prompt_audio_type'" in msgs[2]
    assert "unknown auto_prompt_audio_type 'Polka'" in msgs[3] and "Pop" in msgs[3]
    assert "rule 'missing_lyrics'" in msgs[4] and "section 2" in msgs[4]
    assert "rule 'missing_tag'" in msgs[5]
    assert "not valid JSON" in msgs[6]
    assert "audio file" in msgs[7] and "token file" in msgs[7]
    assert "[3, T]" in msgs[8]
    assert "already used on line 1" in msgs[9]
    assert "missing 'gt_lyric'" in msgs[10]
    assert "has no entry for this type" in msgs[11]
    for line in msgs:
        assert f"in.jsonl:{line}:" in err
    assert "10 failed" in err


def test_auto_prompt_without_library_file(export, tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", [{"idx": "a", "gt_lyric": "[verse] la", "auto_prompt_audio_type": "Pop"},
                                              {"idx": "b", "gt_lyric": "[verse] la"}])
    rc, _ = run_cli(capsys, export, src, tmp_path / "o1", "--duration", "0.2", "--tokens-only")
    ok, bad = records(tmp_path / "o1")
    assert rc == 1 and [r["idx"] for r in ok] == ["b"] and "--auto-prompt-file" in bad[0]["error"]
    rc, err = run_cli(capsys, export, src, tmp_path / "o2", "--auto-prompt-file", tmp_path / "missing.pt")
    assert rc == 2 and "missing.pt: file not found" in err


@pytest.mark.parametrize("breakage", ["missing", "shape"])
def test_bad_checkpoint_is_a_clear_cli_error(export, tmp_path, capsys, breakage):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.yaml").write_text((export / "config.yaml").read_text())
    sd = torch.load(export / "model.pt", weights_only=True)
    key = "audiolm.transformer2.model.layers.0.self_attn.k_proj.weight"
    if breakage == "missing":
        del sd[key]
    else:
        sd[key] = sd[key][:, :-1].contiguous()
    torch.save(sd, folder / "model.pt")
    src = write_jsonl(tmp_path / "in.jsonl", [{"idx": "a", "gt_lyric": "[verse] la"}])
    rc, err = run_cli(capsys, folder, src, tmp_path / "out")
    assert rc == 2 and key in err and ("missing key" if breakage == "missing" else "has shape") in err


def test_unknown_version_is_a_clear_cli_error(export, tmp_path, capsys):
    folder = tmp_path / "v9"
    folder.mkdir()
    (folder / "model.pt").symlink_to(export / "model.pt")
    (folder / "config.yaml").write_text((export / "config.yaml").read_text().replace("version: v2", "version: v9"))
    src = write_jsonl(tmp_path / "in.jsonl", [{"idx": "a", "gt_lyric": "[verse] la"}])
    rc, err = run_cli(capsys, folder, src, tmp_path / "out")
    assert rc == 2 and "unknown model version 'v9'" in err
    with pytest.raises(ConfigError, match="unknown model version"):
        load_model(folder)


def test_checkpoint_that_would_run_code_is_refused(export, tmp_path):
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "config.yaml").write_text((export / "config.yaml").read_text())
    sd = torch.load(export / "model.pt", weights_only=True)
    sd["audiolm.extra"] = random.Random(0)  # an arbitrary object: unpickling it would call code
    torch.save(sd, folder / "model.pt")
    with pytest.raises(CheckpointError, match="refused: a file is never allowed to run code"):
        load_model(folder)


# ----------------------------------------------------------------------------- loading formats
def test_safetensors_and_dtypes(export, tmp_path):
    ref = load_model(export, dtype=torch.float32)
    save_released(ref, tmp_path / "st", dtype=torch.bfloat16, safetensors=True)
    assert (tmp_path / "st" / "model.safetensors").is_file() and not (tmp_path / "st" / "model.pt").exists()
    st = load_model(tmp_path / "st", dtype="fp32")
    codes = torch.randint(0, 64, (2, 3, 5))
    lyr, sty = ["[verse] la", None], ["pop", None]
    torch.testing.assert_close(st.logits(codes, lyr, sty), ref.logits(codes, lyr, sty), rtol=0, atol=0)
    half = load_model(export, dtype="fp16")
    assert half.dtype == torch.float16 and all(p.dtype == torch.float16 for p in half.parameters())
    with pytest.raises(CheckpointError, match="tokenizer_dir"):
        load_model(export, tokenizer_dir=tmp_path / "nope")
    with pytest.raises(CheckpointError, match="not a model folder"):
        load_model(tmp_path / "nope")


def test_cli_accepts_released_spellings(tmp_path):
    a = cli.parse_args(["--ckpt_path", "c", "--input_jsonl", "i", "--save_dir", "o", "--low_mem",
                        "--not_use_flash_attn", "--separate"])
    assert (a.ckpt_dir, a.input_jsonl, a.out_dir, a.low_mem, a.not_use_flash_attn, a.mode) == ("c", "i", "o", True, True,
                                                                                               "separate")
    assert cli.parse_args(["c", "i", "o", "--vocal"]).mode == "vocal"
    assert cli.parse_args(["c", "i", "o", "--generate_type", "bgm"]).mode == "bgm"
    with pytest.raises(SystemExit):
        cli.parse_args(["c", "i", "o", "--repetition-penalty", "1.2"])  # needs --no-compat
    assert cli.parse_args(["c", "i", "o", "--no-compat", "--repetition-penalty", "1.2"]).repetition_penalty == 1.2


# ----------------------------------------------------------------------------- prompt files
def test_prompt_files_and_library(tmp_path):
    with pytest.raises(PromptError, match="audio encoder"):
        load_prompt_tokens(tmp_path / "ref.wav")
    with pytest.raises(PromptError, match="file not found"):
        load_prompt_tokens(tmp_path / "none.pt")
    torch.save(torch.full((3, 5), 20000), tmp_path / "range.pt")
    with pytest.raises(PromptError, match="out of range"):
        load_prompt_tokens(tmp_path / "range.pt")
    torch.save(torch.zeros(3, 5), tmp_path / "float.pt")
    with pytest.raises(PromptError, match="integers"):
        load_prompt_tokens(tmp_path / "float.pt")
    assert language_of(ZH) == "zh" and language_of(EN) == "en"
    lib = {"Pop": {"en": [torch.zeros(1, 3, 4, dtype=torch.long)], "zh": [torch.ones(1, 3, 4, dtype=torch.long)]}}
    torch.save(lib, tmp_path / "v2lib.pt")
    L = AutoPromptLibrary.load(tmp_path / "v2lib.pt")
    t, info = L.pick("Pop", ZH, random.Random(0))
    assert info["language"] == "zh" and (t == 1).all()
    t, info = L.pick("Auto", EN, random.Random(0))
    assert info == {"type": "Pop", "language": "en", "index": 0}
    with pytest.raises(PromptError, match="unknown auto_prompt_audio_type 'Disco'"):
        L.pick("Disco", EN, random.Random(0))


def test_inference_package_imports_stay_slim():
    import subprocess
    import sys

    code = ("import sys, levo_infer, levo_infer.cli, levo_infer.generate, levo_infer.checkpoint, levo_infer.prompts, "
            "levo_infer.offload; bad = [m for m in ('lightning', 'deepspeed', 'wandb', 'trl', 'hydra', 'webdataset', "
            "'transformers', 'pytorch_lightning') if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- output names, write errors, empty input
def test_idx_limit_counts_bytes_not_characters(export, tmp_path, capsys):
    fits = "漢" * 76  # 228 bytes: the longest whole-CJK name whose temp file still fits in 255 bytes
    src = write_jsonl(tmp_path / "in.jsonl", [
        {"idx": "ok", "gt_lyric": "[verse] la da"},
        {"idx": "漢" * 90, "gt_lyric": "[verse] la"},  # 90 characters, 270 bytes
        {"idx": fits, "gt_lyric": "[chorus] love"},
    ])
    out = tmp_path / "out"
    rc, err = run_cli(capsys, export, src, out, "--mode", "separate", "--duration", "0.2", "--seed", "0",
                      "--batch-size", "3", "--tokens-only")
    assert rc == 1
    ok, bad = records(out)
    assert [r["idx"] for r in ok] == ["ok", fits]
    assert [e["line"] for e in bad] == [2]
    assert "270 bytes" in bad[0]["error"] and "229" in bad[0]["error"]
    assert "in.jsonl:2:" in err
    for sfx in ("", "_vocal", "_bgm"):
        assert (out / "tokens" / f"{fits}{sfx}.pt").is_file()


def test_write_error_fails_only_that_song(export, tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", [{"idx": i, "gt_lyric": "[verse] la da"} for i in ("a", "b", "c")])
    out = tmp_path / "out"
    (out / "tokens" / "b.pt").mkdir(parents=True)  # a folder where b's token file must go: its write fails
    rc, err = run_cli(capsys, export, src, out, "--duration", "0.2", "--seed", "0", "--batch-size", "3",
                      "--tokens-only")
    assert rc == 1
    ok, bad = records(out)
    assert [r["idx"] for r in ok] == ["a", "c"] and all(r["status"] == "ok" for r in ok)
    assert [(e["line"], e["idx"]) for e in bad] == [(2, "b")]
    assert "cannot write" in bad[0]["error"] and str(out / "tokens" / "b.pt") in bad[0]["error"]
    assert (out / "tokens" / "a.pt").is_file() and (out / "tokens" / "c.pt").is_file()
    assert "in.jsonl:2:" in err and "1 failed" in err
    assert not [p for p in (out / "tokens").iterdir() if ".tmp" in p.name]


@pytest.mark.parametrize("text", ["", "\n  \n\t\n"])
def test_empty_input_file_is_reported(export, tmp_path, capsys, text):
    src = tmp_path / "empty.jsonl"
    src.write_text(text)
    rc, err = run_cli(capsys, export, src, tmp_path / "out", "--duration", "0.2")
    assert rc == 1
    assert f"{src}: no song found" in err
    assert not (tmp_path / "out" / "tokens").exists()


# ----------------------------------------------------------------------------- released lyrics the checker flags
QUIRKY = ("[intro-short] ; [verse] la da.love  night ; [chorus] la.da.love;pop.rock.sad; [inst-medium] ;"
          "[bridge] happy ; [outro-short]")


def test_released_lyric_quirks_generate_with_a_warning(export, tmp_path, capsys, monkeypatch):
    seen: list = []
    original = LeLM.prepare_conditions

    def spy(self, lyrics, styles, prompt=None):
        cond = original(self, lyrics, styles, prompt)
        seen.append((list(lyrics), cond))
        return cond

    monkeypatch.setattr(LeLM, "prepare_conditions", spy)
    src = write_jsonl(tmp_path / "in.jsonl", [{"idx": "q", "gt_lyric": QUIRKY}, {"idx": "plain", "gt_lyric": EN}])
    out = tmp_path / "out"
    # both lyrics are longer than the tiny model's 12 lyric positions: cut as released, on request
    rc, err = run_cli(capsys, export, src, out, "--duration", "0.2", "--seed", "0", "--tokens-only",
                      "--truncate-lyrics")
    assert rc == 0, err
    released_text = QUIRKY.replace("  ", " ")  # all the released generate.py does to gt_lyric
    ok, bad = records(out)
    assert bad == [] and [r["idx"] for r in ok] == ["q", "plain"]
    assert ok[0]["lyric"] == released_text and ok[1]["lyric"] == EN
    assert "rule 'missing_tag'" in ok[0]["warnings"][0]
    assert "cut to its first 12 tokens (--truncate-lyrics)" in ok[0]["warnings"][1]
    assert ok[1]["warnings"] == ["idx 'plain': the lyric is 21 tokens long, but the model's lyric conditioner holds "
                                 "12 (lyric_max_len); cut to its first 12 tokens (--truncate-lyrics): the rest of "
                                 "the lyric is not sung"]
    assert "warning" in err and "in.jsonl:1:" in err and "rule 'missing_tag'" in err and "--strict" in err
    lyrics, cond = seen[0]  # the first call is the conditioned half of the batch
    assert lyrics == [released_text, EN]
    m = load_model(export)
    tok = m.tokenizers[0]
    want = tok.encode(released_text)[: m.cfg.lyric_max_len]
    assert cond.lyric_ids[0, : len(want)].tolist() == want

    rc, err = run_cli(capsys, export, src, tmp_path / "strict", "--duration", "0.2", "--seed", "0", "--tokens-only",
                      "--strict", "--truncate-lyrics")
    assert rc == 1
    ok, bad = records(tmp_path / "strict")
    assert [r["idx"] for r in ok] == ["plain"] and bad[0]["line"] == 1 and "rule 'missing_tag'" in bad[0]["error"]


def test_lyric_policies_and_strict_in_help(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["--help"])
    out = capsys.readouterr().out
    assert "--strict" in out and "--lyrics" in out
    assert cli.parse_args(["c", "i", "o"]).strict is False and cli.parse_args(["c", "i", "o", "--strict"]).strict


def test_duration_beyond_max_positions_is_a_usage_error(tmp_path, capsys):
    folder = tmp_path / "short"
    cfg = make_model().cfg
    cfg.lm.max_position_embeddings = cfg.prefix_len + max(cfg.delays) + 10  # 10 frames fit
    m = LeLM(cfg)
    m.init_weights(std=0.2)
    save_released(m, str(folder))
    src = write_jsonl(tmp_path / "in.jsonl", [{"idx": "a", "gt_lyric": "[verse] la"}])
    rc, err = run_cli(capsys, folder, src, tmp_path / "o1", "--duration", "0.4", "--tokens-only")  # 10 frames
    assert rc == 0, err
    rc, err = run_cli(capsys, folder, src, tmp_path / "o2", "--duration", "0.44", "--tokens-only")  # 11 frames
    assert rc == 2
    assert "--duration" in err and "max_position_embeddings" in err and "0.4" in err
    assert not (tmp_path / "o2" / "tokens").exists()
