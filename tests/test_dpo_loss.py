"""The DPO loss family: against naive per-pair formulas, and parity with the installed TRL's own
``DPOTrainer`` loss computation (tiny Llama policy + reference on CPU, offline)."""

from __future__ import annotations

import math

import pytest
import torch

from levo_train.train.dpo_loss import LOSS_TYPES, combined_dpo_loss, dpo_loss, sft_loss

# transformers 5 deprecation noise from TRL's config handling
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


# ----------------------------------------------------------------------------- naive formulas
def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def naive(pc: float, pr: float, rc: float, rr: float, beta: float, loss_type: str, eps: float) -> float:
    d = (pc - rc) - (pr - rr)
    if loss_type == "sigmoid":
        return -(1 - eps) * _logsig(beta * d) - eps * _logsig(-beta * d)
    if loss_type == "robust":
        return (-(1 - eps) * _logsig(beta * d) + eps * _logsig(-beta * d)) / (1 - 2 * eps)
    if loss_type == "hinge":
        return max(0.0, 1 - beta * d)
    if loss_type == "ipo":
        return (d - 1 / (2 * beta)) ** 2
    raise AssertionError(loss_type)


def random_logps(B: int = 64, seed: int = 0, scale: float = 20.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = -torch.rand(4, B, generator=g, dtype=torch.float64) * 200
    return list(base + torch.randn(4, B, generator=g, dtype=torch.float64) * scale)


CASES = [("sigmoid", 0.0), ("sigmoid", 0.1), ("sigmoid", 0.3), ("robust", 0.0), ("robust", 0.2),
         ("hinge", 0.0), ("ipo", 0.0)]


@pytest.mark.parametrize("beta", [0.05, 0.5])
@pytest.mark.parametrize(("loss_type", "eps"), CASES)
def test_matches_naive_formula(loss_type: str, eps: float, beta: float) -> None:
    pc, pr, rc, rr = random_logps(seed=int(beta * 100) + len(loss_type))
    losses, cr, rj = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps)
    want = torch.tensor([naive(*map(float, v), beta, loss_type, eps) for v in zip(pc, pr, rc, rr)],
                        dtype=torch.float64)
    assert losses.shape == cr.shape == rj.shape == (64,)
    torch.testing.assert_close(losses, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(cr, beta * (pc - rc))
    torch.testing.assert_close(rj, beta * (pr - rr))
    if loss_type == "hinge":  # both regimes of the hinge are exercised
        assert (losses == 0).any() and (losses > 0).any()


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "hinge", "ipo"])
def test_gradient_reaches_policy_only_and_rewards_are_detached(loss_type: str) -> None:
    pc, pr, rc, rr = (t.float().requires_grad_() for t in random_logps(B=8, scale=2.0))
    losses, cr, rj = dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type=loss_type)
    losses.sum().backward()
    assert pc.grad is not None and pr.grad is not None and pc.grad.abs().sum() > 0
    assert rc.grad is None and rr.grad is None  # reference log-probs are constants
    assert not cr.requires_grad and not rj.requires_grad
    # d loss / d policy_rejected = - d loss / d policy_chosen (the loss depends on Δ only)
    torch.testing.assert_close(pr.grad, -pc.grad)


def test_bf16_inputs_computed_in_fp32() -> None:
    pc, pr, rc, rr = (t.to(torch.bfloat16) for t in random_logps(B=4))
    losses, cr, _ = dpo_loss(pc, pr, rc, rr)
    assert losses.dtype == torch.float32 and cr.dtype == torch.float32


def test_bad_arguments_are_clear_errors() -> None:
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="unknown DPO loss_type 'kto'.*sigmoid, robust, hinge, ipo"):
        dpo_loss(x, x, x, x, loss_type="kto")
    with pytest.raises(ValueError, match="sigmoid, robust, hinge, ipo, sft"):
        combined_dpo_loss(x, x, x, x, loss_type=["sigmoid", "dpo"])
    with pytest.raises(ValueError, match="same shape"):
        dpo_loss(x, x, x, torch.zeros(4))
    with pytest.raises(ValueError, match=r"label_smoothing must lie in \[0, 0.5\)"):
        dpo_loss(x, x, x, x, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="no meaning for loss_type='hinge'"):
        dpo_loss(x, x, x, x, loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match="beta must be > 0"):
        dpo_loss(x, x, x, x, beta=0.0)
    with pytest.raises(ValueError, match="'sft' needs chosen_token_counts"):
        combined_dpo_loss(x, x, x, x, loss_type=["sigmoid", "sft"])
    with pytest.raises(ValueError, match="'ipo' needs chosen_token_counts and rejected_token_counts"):
        combined_dpo_loss(x, x, x, x, loss_type="ipo")
    with pytest.raises(ValueError, match="2 loss types"):
        combined_dpo_loss(x, x, x, x, loss_type=["sigmoid", "hinge"], loss_weights=[1.0])
    with pytest.raises(ValueError, match="used only by"):
        combined_dpo_loss(x, x, x, x, loss_type="hinge", label_smoothing=0.1)
    assert set(LOSS_TYPES) == {"sigmoid", "robust", "hinge", "ipo", "sft"}


def test_sft_and_combined_against_naive() -> None:
    pc, pr, rc, rr = random_logps(B=6)
    nc = torch.tensor([3, 10, 1, 7, 4, 2], dtype=torch.float64)
    nr = torch.tensor([5, 2, 8, 1, 6, 3], dtype=torch.float64)
    sft = sft_loss(pc, nc)
    assert sft.shape == ()
    torch.testing.assert_close(sft, -pc.sum() / nc.sum())  # per token over the batch, as TRL
    out = combined_dpo_loss(pc, pr, rc, rr, loss_type=["sigmoid", "sft", "ipo"], loss_weights=[1.0, 0.3, 0.5],
                            beta=0.2, label_smoothing=0.1, chosen_token_counts=nc, rejected_token_counts=nr)
    sig = sum(naive(*map(float, v), 0.2, "sigmoid", 0.1) for v in zip(pc, pr, rc, rr)) / 6
    ipo = sum(naive(float(a / c), float(b / r), float(x / c), float(y / r), 0.2, "ipo", 0.0)
              for a, b, x, y, c, r in zip(pc, pr, rc, rr, nc, nr)) / 6
    want = sig + 0.3 * float(-pc.sum() / nc.sum()) + 0.5 * ipo
    assert math.isclose(float(out.loss), want, rel_tol=1e-10)
    assert set(out.terms) == {"sigmoid", "sft", "ipo"}
    assert math.isclose(float(out.terms["ipo"]), ipo, rel_tol=1e-10)
    torch.testing.assert_close(out.chosen_rewards, 0.2 * (pc - rc))  # unnormalised, as TRL logs them


# ----------------------------------------------------------------------------- TRL parity
VOCAB_WORDS = [f"w{i}" for i in range(60)]


@pytest.fixture(scope="module")
def trl_setup():
    """A word-level tokenizer built with ``tokenizers``, a tiny Llama config and two weight sets
    (policy, reference), and a small preference dataset of plain-text prompt/chosen/rejected."""
    pytest.importorskip("trl")
    import datasets
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    datasets.disable_progress_bars()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(VOCAB_WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", bos_token="<s>",
                                  unk_token="<unk>")
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      initializer_range=0.3, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    states = [LlamaForCausalLM(cfg).state_dict() for _ in range(2)]  # policy, reference: different weights
    g = torch.Generator().manual_seed(1)

    def sent(n: int) -> str:
        return " ".join(VOCAB_WORDS[i] for i in torch.randint(0, len(VOCAB_WORDS), (n,), generator=g).tolist())

    # completions of different lengths (padding, per-token normalisation and the SFT token mean matter)
    rows = [dict(prompt=sent(2 + i % 4), chosen=" " + sent(1 + i % 5), rejected=" " + sent(1 + (3 * i) % 6))
            for i in range(6)]
    return tok, cfg, states, Dataset.from_list(rows)


def _trl_loss(trl_setup, tmp_path, **dpo_args):
    """TRL's loss on one batch of all pairs, plus our recomputation of its inputs: summed
    completion log-probs of policy and reference [B] and completion token counts [B]."""
    from transformers import LlamaForCausalLM
    from trl import DPOConfig, DPOTrainer

    tok, cfg, states, ds = trl_setup
    models = []
    for sd in states:
        m = LlamaForCausalLM(cfg)
        m.load_state_dict(sd)
        models.append(m)
    args = DPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, per_device_train_batch_size=len(ds),
                     disable_tqdm=True, **dpo_args)
    trainer = DPOTrainer(model=models[0], ref_model=models[1], args=args, train_dataset=ds, processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(ds))])
    loss = trainer.compute_loss(trainer.model, batch)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    # TRL's sequence log-prob: Σ over completion tokens of log_softmax(logits)[next token]
    ids, att, comp = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    mask = comp[:, 1:].double()

    def seq_logps(model: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=att).logits[:, :-1].double()
        tok_lp = logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        return (tok_lp * mask).sum(1)

    B = len(ds)
    pol, ref = seq_logps(models[0]), seq_logps(models[1])
    counts = comp.sum(1).double()
    lp = dict(pc=pol[:B], pr=pol[B:], rc=ref[:B], rr=ref[B:], nc=counts[:B], nr=counts[B:])
    return loss.detach().double(), metrics, lp


PARITY = [
    # (TRL loss_type, TRL loss_weights, beta, label_smoothing, our label_smoothing)
    ("sigmoid", None, 0.1, 0.0, 0.0),
    # TRL 1.16 ignores label_smoothing for "sigmoid" (no cDPO there): its result is plain DPO,
    # i.e. ours with ε = 0 (our ε > 0 is cDPO, checked against the naive formula above).
    ("sigmoid", None, 0.1, 0.2, 0.0),
    ("robust", None, 0.1, 0.0, 0.0),
    ("robust", None, 0.3, 0.2, 0.2),
    ("hinge", None, 0.1, 0.0, 0.0),
    ("hinge", None, 0.02, 0.0, 0.0),
    # TRL's IPO divides each log-ratio by the completion's token count: combined_dpo_loss does the
    # same from the token counts (dpo_loss itself is fed per-token means in the check below).
    ("ipo", None, 0.1, 0.0, 0.0),
    ("ipo", None, 1.0, 0.0, 0.0),
    (["sigmoid", "sft"], [1.0, 0.5], 0.1, 0.0, 0.0),
    (["robust", "sft"], [0.7, 2.0], 0.2, 0.1, 0.1),
    (["ipo", "sft"], None, 0.5, 0.0, 0.0),
    (["sigmoid", "hinge", "ipo"], [0.5, 0.3, 0.2], 0.1, 0.0, 0.0),
]


@pytest.mark.parametrize(("loss_type", "weights", "beta", "trl_eps", "our_eps"), PARITY,
                         ids=lambda v: "+".join(map(str, v)) if isinstance(v, list) else str(v))
def test_parity_with_trl_dpo_trainer(trl_setup, tmp_path, loss_type, weights, beta, trl_eps, our_eps) -> None:
    trl_loss, metrics, lp = _trl_loss(trl_setup, tmp_path, loss_type=loss_type, loss_weights=weights, beta=beta,
                                      label_smoothing=trl_eps)
    # our recomputation of TRL's inputs is the one TRL used
    assert math.isclose(metrics["logps/chosen"], float(lp["pc"].mean()), rel_tol=1e-5)
    assert math.isclose(metrics["logps/rejected"], float(lp["pr"].mean()), rel_tol=1e-5)
    assert lp["nc"].ne(lp["nr"]).any()  # lengths differ, so normalisation matters

    out = combined_dpo_loss(lp["pc"], lp["pr"], lp["rc"], lp["rr"], loss_type=loss_type, loss_weights=weights,
                            beta=beta, label_smoothing=our_eps, chosen_token_counts=lp["nc"],
                            rejected_token_counts=lp["nr"])
    torch.testing.assert_close(out.loss, trl_loss, atol=1e-5, rtol=1e-5)
    assert math.isclose(metrics["rewards/chosen"], float(out.chosen_rewards.mean()), rel_tol=1e-4, abs_tol=1e-6)
    assert math.isclose(metrics["rewards/rejected"], float(out.rejected_rewards.mean()), rel_tol=1e-4, abs_tol=1e-6)
    assert math.isclose(metrics["rewards/margins"],
                        float((out.chosen_rewards - out.rejected_rewards).mean()), rel_tol=1e-4, abs_tol=1e-6)

    if isinstance(loss_type, str):  # the plain per-pair function gives the same
        args = [lp["pc"], lp["pr"], lp["rc"], lp["rr"]]
        if loss_type == "ipo":
            args = [args[0] / lp["nc"], args[1] / lp["nr"], args[2] / lp["nc"], args[3] / lp["nr"]]
        losses, _, _ = dpo_loss(*args, beta=beta, loss_type=loss_type, label_smoothing=our_eps)
        torch.testing.assert_close(losses.mean(), trl_loss, atol=1e-5, rtol=1e-5)
        if trl_eps != our_eps:  # our cDPO differs from what TRL 1.16 computes for sigmoid + ε
            cdpo, _, _ = dpo_loss(*args, beta=beta, loss_type=loss_type, label_smoothing=trl_eps)
            assert abs(float(cdpo.mean()) - float(trl_loss)) > 1e-3
