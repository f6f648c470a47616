"""The aesthetic reward model (``levo-train recipe=reward``, ``levo-eval reward``): the network and its
export in :mod:`levo_train.reward.model`, metrics in :mod:`levo_train.reward.metrics`, the held-out
evaluation in :mod:`levo_train.reward.evaluate`. Laid out like DPO: the Lightning module is
:mod:`levo_train.train.reward`, its data :mod:`levo_train.data.scored` (scored songs), its toy data
:mod:`levo_train.toy.scored`."""
