"""The generation engine (issue #22): continuous batching over fixed slots, static KV cache, 8-bit
cache, per-song seed streams, the memory planner.

The reference for every song is the same song generated alone (batch 1, one slot): a song's tokens
must not depend on the slot count, the songs beside it, the queue order or the refill policy, bit
for bit on CPU fp32. Greedy ``compat`` generation against the released loop is
``tests/test_infer.py::test_compat_greedy_equals_naive_released_loop`` (unchanged).
"""

from __future__ import annotations

import pytest
import torch
from test_infer import LYRICS, STYLES, make_model, prompts_for

from levo_infer.engine import planned_steps
from levo_infer.generate import generate

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
            for slots, policy in ((1, "continuous"), (3, "continuous"), (3, "static"), (8, "continuous"))}
    for (slots, policy), out in runs.items():
        assert out.codes.shape == (8, 3, max(FRAMES))
        for i in range(8):
            assert int(out.lengths[i]) == lengths[i], (slots, policy, i)
            assert torch.equal(out.raw_codes[i, :, :FRAMES[i]], alone[i].raw_codes[0]), (slots, policy, i)
            assert (out.raw_codes[i, :, FRAMES[i]:] == m.pad_id).all()
    # continuous batching refills slots: fewer decode steps than static batches at the same slot count
    assert runs[(3, "continuous")].steps < runs[(3, "static")].steps
    perm = [3, 1, 7, 0, 5, 2, 6, 4]
    shuffled = generate(m, [LYRICS[i] for i in perm], [STYLES[i] for i in perm], prompt[perm],
                        max_frames=[FRAMES[i] for i in perm], seed=[SEEDS[i] for i in perm], slots=3, **kw)
    assert torch.equal(shuffled.raw_codes, runs[(1, "continuous")].raw_codes[perm])


def test_planned_steps_schedule():
    assert planned_steps([10, 2, 2, 2, 2], 2) == 10  # the short songs pass through the other slot
    assert planned_steps([10, 2, 2, 2, 2], 2, "static") == 10 + 2 + 2
    assert planned_steps([5, 5, 5], 1) == 15 == planned_steps([5, 5, 5], 1, "static")
