"""What the fused lm_head ops share. An op imports from here, never from another op.

* ``numerics``: the compute dtype, the guarded ``log a`` / ``log(1 - a)`` of mixture weights.
* ``inputs``: input preparation (flattening, autocast down-casting, ``LinearInputs``).
* ``normalizer``: what a reduced loss is divided by (the default token mean, ``normalizer=``
  as a float32 scalar, checked on the CPU and NaN-guarded on a device).
* ``chunked``: the torch twins of the tile helpers (chunk sizes, the scaled head, online
  statistics, the soft-max logit gradient, tile accumulation) for the ``impl="torch"`` paths.
* ``launch``: ``TritonConfig``, the vocabulary split, the ``Head`` kernel argument.
* ``tiles``: Triton device helpers: logit tiles, grid mapping, online statistics, split merge.
* ``logprob``: the per-token log-prob statistics that ``logprobs`` and ``policy_loss`` both
  finish in their own kernels (scan, finish, split merge), their forward launcher, and the
  shared backward kernel for any loss that is a function of per-token log-prob and entropy.
* ``scratch_backward``: logit-gradient regions -> dX, dW, db with GEMMs (every op's backward).
"""
