"""The aesthetic reward model: a (possibly truncated) LeLM trunk with one score head.

A song ``codes [B, K, T]`` (with its lyric, style and optional audio prompt) runs through the
trunk's two stacks with EOS appended, so the last position has read every frame. The pooled
hidden state goes through a small MLP to ``D + 1`` scores: one per dimension, then ``overall``.

Pooling (``pooling``):

* ``mean``: the masked mean over the song's frames (real frames + EOS) of the main-stack hidden
  state (stream 0) concatenated with the mean of the sub-stack states (streams 1..K-1): the main
  stack reads the mixed stream, the sub-stack the vocal/bgm streams, and each dimension lives in
  different streams, so both are kept.
* ``attn``: the same features, plus a learned attention pooling over frames (one query per
  output), for rewards that hinge on a few frames.
* ``mean_logp``: the ``mean`` features plus, per stream, statistics of the song's own token
  log-probabilities under the trunk's LM heads (mean, share below ``LOW_LOGP``, minimum): a wrong
  word, an off-pattern bgm code or a broken mix code is a token the SFT trunk finds unlikely, which a
  mean of hidden states cannot show. Needs the trunk's LM heads, so it is meant for untruncated trunks.

Export folder (``levo-train recipe=reward`` writes it to ``RUN/export``):

* ``config.yaml``: the trunk's LeLM config (truncated layer counts), in the released layout;
* ``reward.pt``: the :class:`RewardModel` state dict (tensors only: loads with ``weights_only``);
* ``reward.json``: ``{"format": 1, "dimensions", "overall", "pooling", "policy_code_size",
  "targets", "source", ...}``;
* ``checksums.json``: the size and checksum of the three (:mod:`levo_infer.integrity`), written
  last and checked on every load: a corrupted export is refused naming the file.

Targets are the raw scores (the toy world's are in [0, 1]); nothing is standardised, so an
exported RM's numbers are on the data's own scale.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from levo_infer.config import ModelConfig, load_config, save_config
from levo_infer.integrity import (
    IntegrityError,
    remove_manifest,
    verify_folder,
    verify_torch_zip,
    write_manifest,
)
from levo_infer.jsonio import write_json_atomic
from levo_infer.model import Conditions, LeLM
from levo_infer.safe_load import torch_load
from levo_infer.tokens import append_eos
from levo_train.checkpointing import write_torch_stream
from levo_train.data.batch import collate_songs
from levo_train.data.shards import OVERALL, Song

EXPORT_FORMAT = 1
POOLINGS = ("mean", "attn", "mean_logp")
#: per-stream token log-prob statistics of ``mean_logp``: mean, share below LOW_LOGP, minimum
LOGP_STATS = 3
LOW_LOGP = -3.0
WEIGHTS_FILE, INFO_FILE, CONFIG_FILE = "reward.pt", "reward.json", "config.yaml"


class RewardModelError(ValueError):
    """A reward-model export cannot be loaded; the message names the file and what is wrong."""


class RewardHead(nn.Module):
    """Pooled trunk features -> ``n_out`` scores (see the module docstring for ``pooling``)."""

    def __init__(self, dim: int, n_out: int, pooling: str = "mean", code_depth: int = 3) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"reward.pooling={pooling!r}: expected one of {POOLINGS}")
        self.pooling, self.n_out = pooling, n_out
        feat = 2 * dim + (LOGP_STATS * code_depth if pooling == "mean_logp" else 0)
        if pooling == "attn":
            self.attn = nn.Linear(feat, n_out)
            feat = feat + 2 * dim
        self.mlp = nn.Sequential(nn.LayerNorm(feat), nn.Linear(feat, dim), nn.GELU(), nn.Linear(dim, n_out))

    def forward(self, H: torch.Tensor, mask: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """``H`` [B, K, T, D] frame hidden states, ``mask`` [B, T] frames to pool, ``extra`` [B, F]
        per-song features (``mean_logp``) -> [B, n_out]."""
        x, mean = mean_pool(H, mask)
        if self.pooling == "mean_logp":
            if extra is None:
                raise ValueError("pooling mean_logp needs the token log-prob features")
            mean = torch.cat([mean, extra.float()], dim=-1)
        if self.pooling == "attn":
            a = self.attn(x).masked_fill(~mask.unsqueeze(-1), float("-inf")).softmax(dim=1)  # [B, T, n_out]
            # one attention read per output, averaged: keeps the feature size independent of n_out
            mean = torch.cat([mean, torch.einsum("bto,btf->bf", a, x) / self.n_out], dim=-1)
        return self.mlp(mean)


def mean_pool(H: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``H`` [B, K, T, D], ``mask`` [B, T] -> (per-frame features [B, T, 2D]: the main-stack state
    concatenated with the mean sub-stack state, fp32; their masked mean over frames [B, 2D])."""
    x = torch.cat([H[:, 0], H[:, 1:].mean(dim=1)], dim=-1).float()
    m = mask.to(x.dtype).unsqueeze(-1)
    return x, (x * m).sum(1) / m.sum(1).clamp_min(1.0)


def trunk_states(lm: LeLM, codes: torch.Tensor, lengths: torch.Tensor, cond: Conditions,
                 ended: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(frame hidden states [B, K, T+1, D], the codes with EOS appended [B, K, T+1], the mask of
    real frames + EOS [B, T+1]) of songs ``codes`` [B, K, T] (right-padded; ``lengths`` [B]).
    ``ended`` [B] bool (None: all): a song cut at its frame limit gets no EOS (its frames alone;
    see :func:`levo_infer.tokens.append_eos`)."""
    dev = lm.device
    lengths = lengths.to(dev)
    seq = append_eos(codes.to(dev), lengths, lm.eos_id, lm.pad_id, ended)
    H = lm.frame_hidden(seq, cond)
    last = lengths if ended is None else lengths - (~ended.to(dev, torch.bool)).long()
    mask = torch.arange(seq.shape[2], device=dev)[None, :] <= last[:, None]  # real frames (+ EOS)
    return H, seq, mask


def reward_forward(lm: LeLM, head: RewardHead, codes: torch.Tensor, lengths: torch.Tensor,
                   cond: Conditions, ended: torch.Tensor | None = None) -> torch.Tensor:
    """Scores [B, n_out] of songs ``codes`` [B, K, T] (right-padded; ``lengths`` [B] real frames;
    ``ended``: see :func:`trunk_states`)."""
    H, seq, mask = trunk_states(lm, codes, lengths, cond, ended)
    extra = token_logp_features(lm, H, seq, mask) if head.pooling == "mean_logp" else None
    return head(H, mask, extra)


def token_logp_features(lm: LeLM, H: torch.Tensor, seq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per stream: mean token log-prob of the song (frames + EOS) under the trunk's LM heads, the
    share of tokens below ``LOW_LOGP`` and the minimum (log-probs clipped at -20, scaled by 1/5)
    -> [B, LOGP_STATS * K]."""
    feats = []
    n = mask.sum(1).clamp_min(1).float()
    for k in range(lm.code_depth):
        logits = lm.head(k, H[:, k]).float()                              # [B, T, V]
        tgt = seq[:, k].clamp_max(logits.shape[-1] - 1)
        lp = logits.log_softmax(-1).gather(-1, tgt.unsqueeze(-1)).squeeze(-1).clamp_min(-20.0)
        feats += [(lp * mask).sum(1) / n / 5.0, ((lp < LOW_LOGP) & mask).sum(1) / n,
                  lp.masked_fill(~mask, 0.0).min(1).values / 5.0]
    return torch.stack(feats, dim=-1)


def truncate_trunk(lm: LeLM, layers: int | None, layers_sub: int | None) -> ModelConfig:
    """Keep the first ``layers`` main-stack and ``layers_sub`` sub-stack layers of ``lm`` (None:
    all), in place; ``lm.cfg`` becomes the truncated config, which is returned."""
    c = lm.cfg.lm
    main = c.num_layers if layers is None else int(layers)
    sub = c.num_layers_sub if layers_sub is None else int(layers_sub)
    if not 1 <= main <= c.num_layers:
        raise ValueError(f"reward.layers={layers}: the init has {c.num_layers} main-stack layers; keep 1..{c.num_layers}")
    if not 0 <= sub <= c.num_layers_sub:
        raise ValueError(f"reward.layers_sub={layers_sub}: the init has {c.num_layers_sub} sub-stack layers; "
                         f"keep 0..{c.num_layers_sub}")
    lm.transformer.model.layers = nn.ModuleList(list(lm.transformer.model.layers)[:main])
    lm.transformer2.model.layers = nn.ModuleList(list(lm.transformer2.model.layers)[:sub])
    lm.cfg = dataclasses.replace(lm.cfg, lm=dataclasses.replace(c, num_layers=main, num_layers_sub=sub))
    return lm.cfg


class RewardModel(nn.Module):
    """LeLM trunk + :class:`RewardHead`: ``forward(codes, lengths, cond) -> [B, D + 1]`` (the
    dimensions in order, then ``overall``). ``lm``/``head``: existing modules to wrap (export)."""

    def __init__(self, config: ModelConfig, dimensions: Sequence[str], *, pooling: str = "mean",
                 lm: LeLM | None = None, head: RewardHead | None = None) -> None:
        super().__init__()
        self.dimensions = tuple(str(d) for d in dimensions)
        if OVERALL in self.dimensions or len(set(self.dimensions)) != len(self.dimensions):
            raise ValueError(f"reward.dimensions={list(self.dimensions)}: names must be distinct and not {OVERALL!r}")
        self.pooling = pooling
        self.lm = lm if lm is not None else LeLM(config)
        self.head = head if head is not None else RewardHead(config.lm.dim, len(self.dimensions) + 1, pooling,
                                                             config.lm.code_depth)

    @property
    def outputs(self) -> tuple[str, ...]:
        return (*self.dimensions, OVERALL)

    @property
    def config(self) -> ModelConfig:
        return self.lm.cfg

    def forward(self, codes: torch.Tensor, lengths: torch.Tensor, cond: Conditions,
                ended: torch.Tensor | None = None) -> torch.Tensor:
        return reward_forward(self.lm, self.head, codes, lengths, cond, ended)

    @torch.no_grad()
    def score_songs(self, songs: Sequence[Song], batch_size: int = 64) -> torch.Tensor:
        """Scores [N, D + 1] of songs (eval mode, no grad), in the given order."""
        out = []
        for i in range(0, len(songs), batch_size):
            b = collate_songs(songs[i:i + batch_size], self.config.lm.code_size)
            cond = self.lm.prepare_conditions(b["lyrics"], b["styles"], b["prompts"])
            out.append(self(b["codes"], b["lengths"], cond, b["eos"]).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, len(self.outputs))

    @torch.no_grad()
    def embed(self, songs: Sequence[Song], batch_size: int = 64) -> torch.Tensor:
        """Pooled song features [N, 2 * dim] (fp32, no grad, in the given order): the masked mean
        over frames + EOS of the main-stack state concatenated with the mean sub-stack state, the
        ``mean`` features every pooling's head reads (what ``levo-eval tokens`` takes Fréchet
        distances over). Call ``eval()`` first for deterministic features."""
        out = []
        for i in range(0, len(songs), batch_size):
            b = collate_songs(songs[i:i + batch_size], self.config.lm.code_size)
            cond = self.lm.prepare_conditions(b["lyrics"], b["styles"], b["prompts"])
            H, _, mask = trunk_states(self.lm, b["codes"], b["lengths"], cond, b["eos"])
            out.append(mean_pool(H, mask)[1].cpu())
        return torch.cat(out) if out else torch.zeros(0, 2 * self.config.lm.dim)


def save_reward_model(model: RewardModel, folder: str | os.PathLike, info: dict[str, Any],
                      dtype: torch.dtype | None = None) -> Path:
    """Write the export folder (``config.yaml``, ``reward.pt``, ``reward.json``, ``checksums.json``)
    of ``model``; ``info`` adds fields to ``reward.json`` (e.g. ``source``)."""
    sd = model.state_dict()
    return write_reward_export(folder, model.config, model.dimensions, model.pooling, info,
                               {k: (tuple(v.shape), v.dtype) for k, v in sd.items()}, sd.__getitem__, dtype)


def write_reward_export(folder: str | os.PathLike, config: ModelConfig, dimensions: Sequence[str], pooling: str,
                        info: dict[str, Any], entries: dict[str, tuple[tuple[int, ...], torch.dtype]],
                        get: Callable[[str], torch.Tensor], dtype: torch.dtype | None = None) -> Path:
    """The export folder from the :class:`RewardModel` state-dict ``entries`` (name -> shape, dtype,
    in state-dict order), each tensor asked of ``get`` only when ``reward.pt`` writes it (so a
    sharded checkpoint is exported without the whole model in memory). Floating tensors are
    written in ``dtype`` when given."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    remove_manifest(folder)
    out = {k: (dtype if dtype is not None and dt.is_floating_point else dt) for k, (_, dt) in entries.items()}
    write_torch_stream(folder / WEIGHTS_FILE, [(k, shape, out[k]) for k, (shape, _) in entries.items()],
                       lambda k: get(k).detach().to(out[k]))
    save_config(config, folder / CONFIG_FILE)
    meta = {"format": EXPORT_FORMAT, "dimensions": list(dimensions), "overall": OVERALL,
            "pooling": pooling, "policy_code_size": config.lm.code_size,
            "layers": config.lm.num_layers, "layers_sub": config.lm.num_layers_sub,
            "targets": "raw", **info}
    write_json_atomic(folder / INFO_FILE, meta)
    write_manifest(folder, [WEIGHTS_FILE, CONFIG_FILE, INFO_FILE])
    return folder


def read_reward_info(export_dir: str | os.PathLike) -> dict[str, Any]:
    """``reward.json`` of an export, checked; :class:`RewardModelError` naming the file otherwise."""
    folder = Path(export_dir)
    if not folder.is_dir():
        raise RewardModelError(f"{folder}: no such reward-model export folder (expected RUN/export of "
                               "`levo-train recipe=reward`)")
    missing = [n for n in (INFO_FILE, WEIGHTS_FILE, CONFIG_FILE) if not (folder / n).is_file()]
    if missing:
        raise RewardModelError(f"{folder}: not a reward-model export, it lacks {', '.join(missing)}")
    try:  # every file against checksums.json (when there is one), reward.pt's own CRCs always
        verify_folder(folder)
        verify_torch_zip(folder / WEIGHTS_FILE)
    except IntegrityError as e:
        raise RewardModelError(str(e)) from None
    p = folder / INFO_FILE
    try:
        info = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RewardModelError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(info, dict):
        raise RewardModelError(f"{p}: expected a JSON object, got {type(info).__name__}")
    if info.get("format") != EXPORT_FORMAT:
        raise RewardModelError(f"{p}: format {info.get('format')!r}, this levo-train reads format {EXPORT_FORMAT}")
    dims = info.get("dimensions")
    if not isinstance(dims, list) or not all(isinstance(d, str) for d in dims):
        raise RewardModelError(f"{p}: `dimensions` must be a list of names, got {dims!r}")
    if info.get("pooling") not in POOLINGS:
        raise RewardModelError(f"{p}: `pooling` {info.get('pooling')!r} is not one of {POOLINGS}")
    return info


def load_reward_model(export_dir: str | os.PathLike, device: str | torch.device = "cpu"
                      ) -> tuple[RewardModel, dict[str, Any]]:
    """(model in eval mode, fp32, on ``device``; its ``reward.json``) of an export folder."""
    folder = Path(export_dir)
    info = read_reward_info(folder)
    config = load_config(folder / CONFIG_FILE)
    model = RewardModel(config, info["dimensions"], pooling=info["pooling"])
    wp = folder / WEIGHTS_FILE
    sd = torch_load(wp, error=RewardModelError)  # weights_only: a crafted file runs no code; errors name it
    if not isinstance(sd, dict):
        raise RewardModelError(f"{wp}: expected a state dict, got {type(sd).__name__}")
    head_out = next((v.shape[0] for k, v in sd.items() if k.startswith("head.mlp.") and v.ndim == 2
                     and k.endswith(".weight") and k.split(".")[2] == "3"), None)
    if head_out is not None and head_out != len(info["dimensions"]) + 1:
        raise RewardModelError(f"{folder}: {INFO_FILE} lists {len(info['dimensions'])} dimensions "
                               f"({', '.join(info['dimensions'])}) + overall, but {WEIGHTS_FILE}'s head has "
                               f"{head_out} outputs")
    try:
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
    except RuntimeError as e:
        raise RewardModelError(f"{wp} does not fit {folder / CONFIG_FILE} / {INFO_FILE}: "
                               f"{str(e).splitlines()[0]} {' '.join(str(e).split())[:400]}") from None
    return model.to(device).eval(), info


def token_layout_mismatch(config: ModelConfig, other: str, *, code_size: int | None = None,
                          code_depth: int | None = None, delays: Sequence[int] | None = None) -> str | None:
    """What differs between the tokens a reward model reads (its ``config``) and those of ``other``
    (a phrase: ``"the policy (model.init)"``, ``"the candidates (DIR/index.json)"``): vocabulary
    (``code_size``), codebooks (``code_depth``) or delay pattern; None when they agree (a field
    passed as None is not compared). A different vocabulary indexes past the RM's embeddings; a
    different delay pattern scores every song silently wrong."""
    for name, want in (("code_size", code_size), ("code_depth", code_depth)):
        have = getattr(config.lm, name)
        if want is not None and int(have) != int(want):
            return f"the reward model reads {name}={have}, {other} has {name}={want}"
    if delays is not None and list(config.delays) != [int(d) for d in delays]:
        return f"the reward model has delay pattern {list(config.delays)}, {other} has {[int(d) for d in delays]}"
    return None


class RewardScorer:
    """A reward-model export as a :class:`~levo_train.rollout.Scorer`: each dimension of its
    ``reward.json`` plus ``overall``. Scores under ``no_grad`` in eval mode."""

    overall = OVERALL

    def __init__(self, export_dir: str | os.PathLike, *, device: str | torch.device = "cpu",
                 batch_size: int = 64) -> None:
        self.model, self.info = load_reward_model(export_dir, device)
        self.dimensions: tuple[str, ...] = self.model.dimensions
        self.batch_size = int(batch_size)
        self.name = f"reward-model({Path(export_dir).name})"

    @property
    def model_config(self) -> ModelConfig:
        return self.model.config

    def to(self, device: str | torch.device) -> RewardScorer:
        """Move the reward model (e.g. onto the policy's GPU once training has placed it)."""
        self.model.to(device)
        return self

    def score(self, songs: Sequence[Song]) -> list[dict[str, float]]:
        self.model.eval()
        s = self.model.score_songs(songs, self.batch_size).tolist()
        names = self.model.outputs
        return [dict(zip(names, row)) for row in s]


__all__ = ["OVERALL", "POOLINGS", "RewardHead", "RewardModel", "RewardModelError", "RewardScorer",
           "load_reward_model", "mean_pool", "read_reward_info", "reward_forward", "save_reward_model",
           "token_layout_mismatch", "token_logp_features", "trunk_states", "truncate_trunk", "write_reward_export"]
