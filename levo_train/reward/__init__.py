"""The aesthetic reward model (``levo-train recipe=reward``, ``levo-eval reward``): model and export in
:mod:`levo_train.reward.model`, training data in :mod:`levo_train.reward.data`, metrics in
:mod:`levo_train.reward.metrics`."""
