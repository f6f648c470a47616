"""Semi-online DPO at real song lengths: frame budgets per prompt, songs cut at their budget (no EOS
appended when they are scored or trained on), zero-frame songs dropped and counted, the released
sampling rules (issue #21 item 4)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import tiny_config

from levo_infer.generate import generate
from levo_infer.model import LeLM
from levo_train.cli import compose_config
from levo_train.data.shards import Song
from levo_train.methods.sdpo import SDPOSettings, frame_budgets
from levo_train.prompts import lyric_frame_budget, model_frame_limit
from levo_train.reward.model import RewardModel
from levo_train.rollout import Prompt, Sampling, sample_and_score
from levo_train.train.logps import pair_logps, sequence_logps
from levo_train.train.sdpo import SemiOnlineDPOModule

PROMPTS = [Prompt("[verse] love night", "rock"), Prompt("[verse] la da . love", "pop"),
           Prompt("[chorus] night la", "sad"), Prompt("[verse] da da", "happy")]


class _FramesScorer:
    """Scores by key; refuses songs of zero frames, as a codec (audio scorer) does."""

    name, overall, dimensions = "frames", "overall", ()

    def __init__(self) -> None:
        self.seen: list[int] = []

    def score(self, songs):
        import zlib

        for s in songs:
            if s.frames < 1:
                raise ValueError(f"song {s.key} has no frame to decode")
        self.seen += [s.frames for s in songs]
        return [{"overall": (zlib.crc32(s.key.encode()) % 97) / 97} for s in songs]


def _with_positions(cfg, n: int):
    return dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, max_position_embeddings=n,
                                                           max_position_embeddings_sub=n))


def _module(cfg, sampling: Sampling, scorer) -> SemiOnlineDPOModule:
    torch.manual_seed(0)
    m = SemiOnlineDPOModule(cfg, prompts=PROMPTS, scorer=scorer, sync_every=2, per_prompt=3, prompts_per_round=4,
                            min_margin=0.0, sampling=sampling, batch_size=4, init_weights=True)
    m.freeze_reference()
    return m


def test_songs_cut_at_the_model_limit_are_scored_and_trained_without_eos(tiny_cfg):
    """Candidates generated up to the model's own limit: those cut there (no EOS) used to crash the
    reward model and DPO (SequenceTooLongError: EOS appended past the limit). They are flagged,
    scored by a reward model and trained on over their frames only."""
    cfg = _with_positions(tiny_cfg, 40)
    limit = cfg.max_frames
    m = _module(cfg, Sampling(max_frames=limit, batch_size=12, temperature=1.0), _FramesScorer())
    with torch.no_grad():  # a policy that rarely stops: EOS logits far below the codes'
        for head in (m.model.transformer.lm_head, *m.model.linears):
            head.weight[m.model.eos_id] = 0.0
            head.weight[:m.model.eos_id] *= 20.0
    st = m.run_round(0)
    assert st["cut_at_budget"] >= 1, st
    pool = [p for rnd in m.buffer for p in rnd]
    cut = [p for p in pool if not p["rejected_eos"] or not p["chosen_eos"]]
    assert cut, "no pair holds a song cut at the limit"
    batch = m.draw_batch()
    logps, counts = pair_logps(m.model, batch)  # raised SequenceTooLongError before
    assert torch.isfinite(logps).all()
    lengths = torch.cat([batch["chosen_lengths"], batch["rejected_lengths"]])
    eos = torch.cat([batch["chosen_eos"], batch["rejected_eos"]])
    assert counts.tolist() == (3 * (lengths + eos.long())).tolist()  # frames, plus EOS only where it ended
    # a reward model scores such songs too (no EOS appended past the limit)
    rm = RewardModel(cfg, ["a"]).eval()
    songs = [Song("s", p["rejected"].numpy(), p["lyric"], p["style"], None, {"ended_with_eos": p["rejected_eos"]})
             for p in pool]
    assert torch.isfinite(rm.score_songs(songs)).all()


def test_a_song_without_eos_scores_its_frames_alone(tiny_model):
    """Independent reference: a song's log-prob without EOS is the sum of its own frames' token
    log-probs, read from the model's logits over the song as it is (no EOS position at all)."""
    torch.manual_seed(1)
    codes = torch.randint(0, 16, (1, 3, 5))
    lengths = torch.tensor([5])
    cond = tiny_model.prepare_conditions(["[verse] love"], ["rock"], None)
    with_eos, n1 = sequence_logps(tiny_model, codes, lengths, cond)
    without, n2 = sequence_logps(tiny_model, codes, lengths, cond, ended=torch.tensor([False]))
    with torch.no_grad():
        H = tiny_model.frame_hidden(codes, cond)  # [1, 3, 5, D]: the five frames, nothing after them
        ref = sum(torch.log_softmax(tiny_model.head(k, H[0, k]).float(), -1).gather(-1, codes[0, k, :, None]).sum()
                  for k in range(3))
    assert (n1.item(), n2.item()) == (18, 15)
    assert without.item() == pytest.approx(float(ref), abs=1e-5) and with_eos.item() != pytest.approx(float(ref))


def test_zero_frame_songs_are_dropped_before_scoring_and_counted(tiny_cfg):
    """Songs of zero frames (EOS first) never reach the scorer (they crashed audio scorers) and are
    counted per round; the other songs are scored."""
    scorer = _FramesScorer()
    m = _module(tiny_cfg, Sampling(max_frames=6, batch_size=12, temperature=2.0), scorer)
    ref = sample_and_score(m.model, [m.prompts[i] for i in m.round_prompts(0)], None, m.sampling, per_prompt=3,
                           seed=m.seed * 7919, key_prefix="r0000-")
    n_empty = sum(c.frames == 0 for c in ref)
    assert n_empty >= 1, "the seeds give no zero-frame song; pick others"
    st = m.run_round(0)
    assert st["empty_dropped"] == n_empty and st["candidates"] == 12 - n_empty
    assert min(scorer.seen) >= 1 and len(scorer.seen) == 12 - n_empty


def test_frame_budgets_per_prompt_from_the_lyric():
    """``sdpo.max_frames=auto`` budgets each prompt by its lyric (longer lyric, longer budget, whole
    10 s buckets, never past the model's limit); ``model`` gives every prompt the limit; on the toy
    world auto stays the toy budget (96); a number beyond the model's limit is refused."""
    short = "[verse] la da"
    long = " ; ".join(["[intro-long]"] + ["[verse] " + " . ".join(["love night love night love"] * 4)] * 4)
    assert lyric_frame_budget(short, frame_rate=25, limit=6750) == 250
    b = lyric_frame_budget(long, frame_rate=25, limit=6750)
    assert b > 250 and b % 250 == 0 and b >= 25 * (30 + 4 * 4 * 5 * 0.6)
    assert lyric_frame_budget(long, frame_rate=25, limit=300) == 300
    assert lyric_frame_budget("not a lyric", frame_rate=25, limit=300) == 300

    model = LeLM(_with_positions(tiny_config(), 2000))
    limit = model_frame_limit(model)
    s = SDPOSettings.from_cfg(compose_config(["recipe=sdpo", "reward.scorer=toy", "sdpo.prompts=P.jsonl"]))
    assert s.frames == "auto" and s.identity()["sdpo.max_frames"] == "auto"
    sampling, ps = frame_budgets(s, model, [Prompt(short, None), Prompt(long, None)])
    assert [p.max_frames for p in ps] == [lyric_frame_budget(p.lyric, frame_rate=model.cfg.frame_rate, limit=limit)
                                          for p in ps] and ps[0].max_frames < ps[1].max_frames <= limit
    assert sampling.max_frames == limit
    s = SDPOSettings.from_cfg(compose_config(["recipe=sdpo", "reward.scorer=toy", "sdpo.prompts=P.jsonl",
                                              "sdpo.max_frames=model"]))
    sampling, ps = frame_budgets(s, model, [Prompt(short, None)])
    assert sampling.max_frames == limit and ps[0].max_frames is None
    toy = SDPOSettings.from_cfg(compose_config(["recipe=sdpo", "reward.scorer=toy"]))
    assert toy.sampling.max_frames == 96 and toy.identity()["sdpo.max_frames"] == 96
    from levo_train.settings import UsageError

    big = SDPOSettings.from_cfg(compose_config(["recipe=sdpo", "reward.scorer=toy", f"sdpo.max_frames={limit + 10**4}"]))
    with pytest.raises(UsageError, match="sdpo.max_frames"):
        frame_budgets(big, model, [Prompt(short, None)])


def test_rollout_generates_each_prompt_to_its_own_budget(tiny_model):
    """Prompts of different budgets are generated in their own batches: each song has at most its
    budget's frames and is the song ``generate`` gives for that budget and seed."""
    ps = [dataclasses.replace(PROMPTS[0], max_frames=3), dataclasses.replace(PROMPTS[1], max_frames=7)]
    cands = sample_and_score(tiny_model, ps, None, Sampling(max_frames=5, batch_size=8, temperature=0.3),
                             per_prompt=2, seed=3)
    for c in cands:
        budget = ps[c.prompt_index].max_frames
        g = generate(tiny_model, [ps[c.prompt_index].lyric], [ps[c.prompt_index].style], max_frames=budget,
                     temperature=0.3, seed=[c.seed])
        assert np.array_equal(c.song.tokens, g.codes[0, :, :int(g.lengths[0])].numpy())
        assert c.song.meta["ended_with_eos"] == (c.frames < budget)


def test_sampling_compat_gives_the_released_rules(tiny_model):
    """``sdpo.sampling=compat``: the released rules with their defaults (temperature 0.8, top-k 5000
    on codebook 0, greedy vocal/bgm, penalty): the candidates are levo-infer's compat songs."""
    s = SDPOSettings.from_cfg(compose_config(["recipe=sdpo", "reward.scorer=toy", "sdpo.sampling=compat"]))
    assert (s.sampling.compat, s.sampling.temperature, s.sampling.top_k) == (True, 0.8, 5000)
    assert s.identity()["sdpo.sampling"] is True
    d = SDPOSettings.from_cfg(compose_config(["recipe=sdpo", "reward.scorer=toy"]))
    assert (d.sampling.compat, d.sampling.temperature, d.sampling.top_k, d.sampling.top_p) == (False, 1.0, 0, 0.0)
    sampling = dataclasses.replace(s.sampling, max_frames=6)
    cands = sample_and_score(tiny_model, PROMPTS[:2], None, sampling, per_prompt=2, seed=5)
    for c in cands:
        g = generate(tiny_model, [PROMPTS[c.prompt_index].lyric], [PROMPTS[c.prompt_index].style], max_frames=6,
                     temperature=0.8, top_k=5000, compat=True, seed=[c.seed])
        assert np.array_equal(c.song.tokens, g.codes[0, :, :int(g.lengths[0])].numpy())
    with pytest.raises(Exception, match="sdpo.sampling=released"):
        SDPOSettings.from_cfg(compose_config(["recipe=sdpo", "reward.scorer=toy", "sdpo.sampling=released"]))
    json.dumps(s.identity())  # stored in checkpoints


def test_gen_memory_gb_picks_the_engines_slots_from_the_planner():
    """``sdpo.gen_memory_gb``: the engine's slot count is the planner's for the longest prompt budget
    in ``gen_dtype`` (at most ``gen_batch_size``); without it the slots are ``gen_batch_size``; a
    budget that cannot hold one song is refused naming the setting and the planner's terms; resume
    may change it (it is not part of the run's identity: per-song seeds give the same songs)."""
    from levo_infer.planner import plan_generation
    from levo_train.methods.sdpo import generation_slots
    from levo_train.settings import UsageError

    model = LeLM(_with_positions(tiny_config(), 2000))
    base = ["recipe=sdpo", "reward.scorer=toy", "sdpo.prompts=P.jsonl", "sdpo.gen_batch_size=64"]
    prompts = [Prompt("[verse] la da", None, max_frames=250), Prompt("[verse] la", None, max_frames=500)]
    plain = SDPOSettings.from_cfg(compose_config(base))
    assert generation_slots(plain, plain.sampling, prompts, model.cfg, "cpu").batch_size == 64
    s = SDPOSettings.from_cfg(compose_config([*base, "sdpo.gen_memory_gb=0.05"]))
    assert s.identity() == plain.identity()
    want = plan_generation(model.cfg, memory_gb=0.05, max_frames=500, dtype=torch.float32, max_slots=64).slots
    got = generation_slots(s, s.sampling, prompts, model.cfg, "cpu")
    assert 1 <= got.batch_size == want < 64 and dataclasses.replace(got, batch_size=64) == s.sampling
    small = SDPOSettings.from_cfg(compose_config([*base, "sdpo.gen_memory_gb=0.001"]))
    with pytest.raises(UsageError, match=r"sdpo.gen_memory_gb=0.001: .*GiB"):
        generation_slots(small, small.sampling, prompts, model.cfg, "cpu")
    with pytest.raises(UsageError, match="sdpo.gen_memory_gb=0.0: expected a number of GiB > 0"):
        SDPOSettings.from_cfg(compose_config([*base, "sdpo.gen_memory_gb=0"]))
