"""``levo-eval reward``: how well a reward model ranks a policy's songs on held-out toy conditions.

The policy samples ``n`` songs for ``world.heldout_conditions(n, seed)`` (styles with the top tier
tag, untagged, or both alternating) through :func:`levo_train.rollout.sample_and_score` with the
toy world's hidden scores; the reward model scores the same songs; each of its outputs is compared
with the hidden score it stands for (``overall`` with ``quality``, each dimension with itself):
LCC, SRCC, KTAU and pairwise accuracy over pairs whose hidden margin is at least 0.05
(:func:`levo_train.reward.metrics.ranking_metrics`). The same seed gives the same numbers.
"""

from __future__ import annotations

import os
from typing import Any

from levo_train.reward.metrics import ranking_metrics
from levo_train.reward.model import OVERALL, RewardModelError, RewardScorer
from levo_train.rollout import Sampling, sample_and_score
from levo_train.toy.pairs import heldout_prompts, load_toy_model
from levo_train.toy.scorer import ToyOracleScorer

TIER_MODES = ("both", "top", "none")


def reward_eval(rm: str | os.PathLike, policy: str | os.PathLike, *, n: int = 512, seed: int = 0, tier: str = "both",
                world_seed: int = 0, batch_size: int = 128, max_frames: int = 96, temperature: float = 1.0,
                device: str = "cpu") -> dict[str, Any]:
    """``{"overall": {lcc, srcc, ktau, pair_acc}, <dim>: {...}, ...}`` and, under ``"_info"``, the
    sample count and mean hidden quality (the caller pops it before printing the contract JSON)."""
    if tier not in TIER_MODES:
        raise ValueError(f"--tier {tier!r}: expected one of {TIER_MODES}")
    if n < 2:
        raise ValueError(f"--n {n}: ranking metrics need at least 2 songs")
    scorer = RewardScorer(rm, device=device, batch_size=batch_size)
    oracle = ToyOracleScorer(world_seed)
    unknown = [d for d in scorer.dimensions if d not in oracle.dimensions]
    if unknown:
        raise RewardModelError(f"{rm}: reward.json dimensions {list(scorer.dimensions)} include {unknown}, which the "
                               f"toy world does not score (it has {list(oracle.dimensions)})")
    policy_model = load_toy_model(policy, device)
    if scorer.info.get("policy_code_size") not in (None, policy_model.cfg.lm.code_size):
        raise RewardModelError(f"{rm} was trained on songs of {scorer.info['policy_code_size']} codes, the policy "
                               f"{policy} has code_size={policy_model.cfg.lm.code_size}")
    tiers = ("top", "none") if tier == "both" else (tier,)
    prompts = heldout_prompts(oracle.world, n, seed=seed, tier=tiers)
    cands = sample_and_score(policy_model, prompts, oracle, Sampling(temperature=temperature, max_frames=max_frames,
                                                                     batch_size=batch_size), seed=seed)
    songs = [c.song for c in cands]
    predicted = scorer.score(songs)
    out: dict[str, Any] = {}
    for name, hidden in ((OVERALL, oracle.overall), *((d, d) for d in scorer.dimensions)):
        out[name] = ranking_metrics([p[name] for p in predicted], [c.scores[hidden] for c in cands])
    quality = [c.scores[oracle.overall] for c in cands]
    out["_info"] = {"n": len(cands), "mean_quality": sum(quality) / len(quality), "tier": tier,
                    "temperature": temperature}
    return out


__all__ = ["TIER_MODES", "reward_eval"]
