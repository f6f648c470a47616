"""The toy song world: a simulator and reward oracle for CPU runs, not a data format.

* :mod:`levo_train.toy.world`: the world (conditions, rendering, the hidden per-dimension scores,
  toy PER) and the cached toy song data set.
* :mod:`levo_train.toy.pairs`: toy preference pairs (the init model's samples or world renderings),
  ranked by the hidden scores (or by a scorer the caller passes in).
* :mod:`levo_train.toy.scored`: the toy reward data (scored songs sampled from the init plus world
  renderings).
* :class:`levo_train.toy.scorer.ToyOracleScorer` turns the hidden scores into a
  :class:`~levo_train.rollout.Scorer`.
"""
