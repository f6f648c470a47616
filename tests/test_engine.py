"""The generation engine (issue #22): continuous batching over fixed slots, static KV cache, 8-bit
cache, per-song seed streams, the memory planner.

The reference for every song is the same song generated alone (batch 1, one slot): a song's tokens
must not depend on the slot count, the songs beside it, the queue order or the refill policy, bit
for bit on CPU fp32. Greedy ``compat`` generation against the released loop is
``tests/test_infer.py::test_compat_greedy_equals_naive_released_loop`` (unchanged).
"""

from __future__ import annotations

import json

import pytest
import torch
from test_infer import LYRICS, STYLES, make_model, prompts_for

from levo_infer.engine import planned_steps
from levo_infer.generate import generate
from levo_infer.styles import null_styles

FRAMES = [20, 7, 33, 12, 25, 9, 40, 15]  # per-song frame limits: a mixed-length queue
SEEDS = [100 + 7 * i for i in range(8)]


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.mark.parametrize("mode", ["greedy-compat", "sampled-penalty"])
def test_song_tokens_do_not_depend_on_slots_neighbours_order_or_policy(model, mode):
    m = model
    prompt = prompts_for(m, 8)
    kw = dict(compat=True, top_k=1) if mode == "greedy-compat" else dict(
        compat=False, temperature=1.0, top_k=10, top_p=0.95, repetition_penalty=1.2, penalty_window=6)
    alone = [generate(m, LYRICS[i:i + 1], STYLES[i:i + 1], prompt[i:i + 1], max_frames=FRAMES[i], seed=[SEEDS[i]],
                      slots=1, **kw) for i in range(8)]
    lengths = [int(a.lengths[0]) for a in alone]
    assert len(set(lengths)) >= 5  # a mixed queue: songs end at many different steps
    runs = {(slots, policy): generate(m, LYRICS, STYLES, prompt, max_frames=FRAMES, seed=SEEDS, slots=slots,
                                      policy=policy, **kw)
            for slots, policy in ((1, "continuous"), (3, "continuous"), (3, "static"), (3, "static-drop"),
                                  (8, "continuous"))}
    for (slots, policy), out in runs.items():
        assert out.codes.shape == (8, 3, max(FRAMES))
        for i in range(8):
            assert int(out.lengths[i]) == lengths[i], (slots, policy, i)
            assert torch.equal(out.raw_codes[i, :, :FRAMES[i]], alone[i].raw_codes[0]), (slots, policy, i)
            assert (out.raw_codes[i, :, FRAMES[i]:] == m.pad_id).all()
    # continuous batching refills slots: fewer decode steps than static batches at the same slot count
    assert runs[(3, "continuous")].steps < runs[(3, "static")].steps == runs[(3, "static-drop")].steps
    # songs moved down into freed slots: continuous once the queue is empty, static-drop whenever one ends
    assert runs[(3, "continuous")].moves > 0 and runs[(3, "static-drop")].moves > runs[(3, "continuous")].moves
    assert runs[(3, "static")].moves == 0
    perm = [3, 1, 7, 0, 5, 2, 6, 4]
    shuffled = generate(m, [LYRICS[i] for i in perm], [STYLES[i] for i in perm], prompt[perm],
                        max_frames=[FRAMES[i] for i in perm], seed=[SEEDS[i] for i in perm], slots=3, **kw)
    assert torch.equal(shuffled.raw_codes, runs[(1, "continuous")].raw_codes[perm])


def test_prefixes_are_shared_between_rows_with_the_same_conditions(model):
    """Candidates of one prompt and CFG's null rows take a copy of a prefix computed once: the copies
    change no token (each song equals itself generated alone), and only distinct conditions prefill."""
    m = model
    idx = [0, 0, 3, 0, 3, 5]  # songs 0, 1, 3 share conditions, and 2, 4; seeds differ
    lyr, sty = [LYRICS[i] for i in idx], [STYLES[i] for i in idx]
    prompt = prompts_for(m, 8)[idx]
    frames = [FRAMES[i] for i in range(len(idx))]
    seeds = SEEDS[:len(idx)]
    kw = dict(compat=False, temperature=1.0, top_k=10)
    out = generate(m, lyr, sty, prompt, max_frames=frames, seed=seeds, slots=2, **kw)
    for i in range(len(idx)):
        one = generate(m, lyr[i:i + 1], sty[i:i + 1], prompt[i:i + 1], max_frames=frames[i], seed=[seeds[i]], **kw)
        assert torch.equal(out.raw_codes[i, :, :frames[i]], one.raw_codes[0]), i
        assert one.prefilled_rows == 2  # a song alone: its cond and its null row
    distinct_null = len(set(null_styles(sty, m.cfg.version)))
    assert out.prefilled_rows < 2 * len(idx)  # 2 slots: a freed row's prefix serves a later song while it lasts
    together = generate(m, lyr, sty, prompt, max_frames=frames, seed=seeds, slots=len(idx), **kw)
    assert torch.equal(together.raw_codes, out.raw_codes)
    assert together.prefilled_rows == 3 + distinct_null == 5  # each distinct condition once
    # the 8-bit cache's scales travel with the copied (and moved) rows
    q2 = generate(m, lyr, sty, prompt, max_frames=frames, seed=seeds, slots=3, policy="static-drop", kv_bits=8, **kw)
    q6 = generate(m, lyr, sty, prompt, max_frames=frames, seed=seeds, slots=len(idx), kv_bits=8, **kw)
    assert q2.moves > 0 and torch.equal(q2.raw_codes, q6.raw_codes)


def test_planned_steps_schedule():
    assert planned_steps([10, 2, 2, 2, 2], 2) == 10  # the short songs pass through the other slot
    assert planned_steps([10, 2, 2, 2, 2], 2, "static") == 10 + 2 + 2
    assert planned_steps([5, 5, 5], 1) == 15 == planned_steps([5, 5, 5], 1, "static")


# ----------------------------------------------------------------------------- 8-bit cache, compile fallback
def test_8bit_cache_stores_within_half_a_step_and_generates_close_to_full(model):
    from levo_infer.model import SlotKVCache

    m = model
    lm = m.cfg.lm
    c = SlotKVCache(1, 2, lm.num_heads, 8, lm.head_dim, 1e4, torch.device("cpu"), torch.float32, bits=8)
    k = torch.randn(2, lm.num_heads, 8, lm.head_dim) * torch.rand(2, lm.num_heads, 8, 1) * 5
    c.rows, c.pos = slice(0, 2), None
    c.attend(0, k, k, k)
    c.key_len = 8
    back, _ = c._load(0)
    step = k.abs().amax(-1, keepdim=True) / 127
    assert ((back - k).abs() <= step / 2 + 1e-6).all()  # round to nearest of 255 levels per (row, head, position)
    full = generate(m, LYRICS, STYLES, max_frames=FRAMES, compat=True, top_k=1, slots=3)
    q8 = generate(m, LYRICS, STYLES, max_frames=FRAMES, compat=True, top_k=1, slots=3, kv_bits=8)
    n = min(int(full.lengths.min()), int(q8.lengths.min()))
    agree = (full.codes[:, :, :n] == q8.codes[:, :, :n]).float().mean()
    assert agree > 0.9, float(agree)


def test_compile_failure_falls_back_to_the_eager_step(model, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    ref = generate(model, LYRICS[:3], STYLES[:3], max_frames=FRAMES[:3], seed=SEEDS[:3], top_k=5)
    with pytest.warns(UserWarning, match="torch.compile of the decode step failed"):
        out = generate(model, LYRICS[:3], STYLES[:3], max_frames=FRAMES[:3], seed=SEEDS[:3], top_k=5, compile=True)
    assert torch.equal(out.raw_codes, ref.raw_codes)


# ----------------------------------------------------------------------------- planner
def test_planner_counts_the_engine_cache_and_refuses_with_numbers(model):
    from levo_infer.engine import GenerationEngine
    from levo_infer.planner import GIB, InsufficientMemoryError, plan_generation

    m = model
    frames = 40
    cond = m.prepare_conditions(LYRICS[:3], STYLES[:3])
    eng = GenerationEngine(m, cond, frames=[frames] * 3, slots=3, null_cond=cond, repetition_penalty=1.1)
    held = sum(t.numel() * t.element_size() for c in eng.caches for t in (c.k, c.v))
    plan = plan_generation(m.cfg, memory_gb=1.0, max_frames=frames, dtype=torch.float32, prompt_ban=False)
    assert plan.cache_bytes_per_song * 3 == held  # the planner's cache term is the engine's allocation, exactly
    state = sum(t.numel() * t.element_size() for t in (eng.hist, eng.U, eng.seen))
    assert 0 <= plan.state_bytes_per_song * 3 - state <= 3 * 256  # history, uniforms, penalty counts (+ small flags)
    weights = sum(p.numel() * 4 for p in m.parameters())
    assert plan.weights_bytes == weights
    # the most slots that fit: one more would not
    assert plan.predicted_bytes() <= plan.budget_bytes < plan.predicted_bytes(plan.slots + 1)
    small = plan_generation(m.cfg, memory_gb=0.01, max_frames=frames, dtype=torch.float32)
    assert 1 <= small.slots < plan.slots
    q8 = plan_generation(m.cfg, memory_gb=0.01, max_frames=frames, dtype=torch.float32, kv_bits=8)
    assert q8.slots > small.slots and q8.cache_bytes_per_song < small.cache_bytes_per_song / 3
    need = plan.predicted_bytes(1) / GIB
    with pytest.raises(InsufficientMemoryError, match=r"cannot hold one song of 40 frames: weights .* GiB .* KV cache"):
        plan_generation(m.cfg, memory_gb=need * 0.9, max_frames=frames, dtype=torch.float32)
    assert plan_generation(m.cfg, memory_gb=need * 1.001, max_frames=frames, dtype=torch.float32).slots == 1


def test_a_slot_freed_at_the_last_step_inside_the_busy_span(model):
    """The song in the middle slot runs to the call's longest limit and ends while its neighbours
    (refills) still decode: its slot must stay at a valid step (it indexed past the step buffers)."""
    m = make_model(main_eos=0.0, sub_eos=0.0)  # EOS rows zeroed: songs run to their limits
    frames = [2, 10, 2, 10, 10]
    out = generate(m, LYRICS[:5], STYLES[:5], max_frames=frames, seed=SEEDS[:5], top_k=5, slots=3)
    assert out.lengths.tolist() == frames
    for i in (1, 3):
        one = generate(m, LYRICS[i:i + 1], STYLES[i:i + 1], max_frames=10, seed=[SEEDS[i]], top_k=5)
        assert torch.equal(out.raw_codes[i], one.raw_codes[0])


def test_levo_infer_memory_budget_and_8bit_cache(tmp_path, capsys):
    from test_infer_cli import make_released_folder, run_cli, write_jsonl

    folder = make_released_folder(tmp_path, "songgeneration_v2_tiny")
    src = write_jsonl(tmp_path / "in.jsonl", [{"idx": str(i), "gt_lyric": f"[verse] {w} la", "descriptions": w}
                                              for i, w in enumerate(["love", "night", "rock"])])
    rc, err = run_cli(capsys, folder, src, tmp_path / "no", "--duration", "0.6", "--tokens-only", "--memory-gb", "0.001")
    assert rc == 2 and "--memory-gb 0.001: a memory budget of 0.001 GiB cannot hold one song of 15 frames" in err
    rc, err = run_cli(capsys, folder, src, tmp_path / "ok", "--duration", "0.6", "--tokens-only", "--memory-gb", "0.5",
                      "--kv-cache", "8bit", "--seed", "3")
    assert rc == 0, err
    assert "--memory-gb 0.5: " in err and " slots in 0.50 GiB" in err
    recs = [json.loads(x) for x in (tmp_path / "ok" / "jsonl" / "in.jsonl").read_text().splitlines()]
    assert len(recs) == 3 and all(r["settings"]["kv_cache"] == "8bit" and r["settings"]["batch_size"] >= 3 for r in recs)


def test_caches_of_sampled_songs_key_on_the_sampler():
    """Toy pairs sampled from a model and the toy reward data are keyed on the sampler's version, so
    songs drawn by another sampler (before the engine) are never reused for the same seeds; pairs the
    world renders itself do not depend on it and keep their key."""
    from levo_infer.sampling import SAMPLER_VERSION
    from levo_train.toy.pairs import ToyPairSpec, toy_pairs_key
    from levo_train.toy.scored import ToyRewardSpec, toy_reward_key

    assert toy_pairs_key(ToyPairSpec(), 0, "fp")["sampler"] == SAMPLER_VERSION
    assert "sampler" not in toy_pairs_key(ToyPairSpec(source="world"), 0, None)
    assert toy_reward_key(ToyRewardSpec(), 0, "fp")["sampler"] == SAMPLER_VERSION
