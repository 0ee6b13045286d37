"""The fused lm_head ops, one folder each (``logprobs``, ``policy_loss``, ``divergence``), and
``common``, what they share: an op imports from ``common`` and ``utils``, never from another op.

Every op folder follows one template: ``api.py`` (its public function: checks at the boundary,
then dispatch on ``impl``), ``naive.py`` (the reference, which materializes the logits),
``chunked.py``, ``kernels.py``, ``triton_impl.py`` and a ``README.md`` with the math and the
gradient, plus modules of its own (the policy loss's ``config.py`` and ``math.py``, the
divergence's ``kinds.py``). The policy loss has no ``naive.py``: its reference is its torch math
(``math.py``) on naive log-probs, composed in ``rlad_kernels/losses.py``.

One path, one name per layer: the ``impl`` value is the public name, and the internal names
(module, autograd Function, entry function) follow one scheme in every op, ``<op>`` being the
folder and ``<Op>`` its CamelCase (``Logprobs``, ``PolicyLoss``, ``Divergence``):

* ``impl="torch"``: vocab-chunked PyTorch, the CPU default. Module ``chunked.py``, autograd
  Function ``Chunked<Op>``, entry ``<op>_chunked``.
* ``impl="triton"``: ``kernels.py`` (the ``@triton.jit`` code) and ``triton_impl.py`` (the host
  side: launches, autograd Function ``Triton<Op>``, entry ``<op>_triton``).
* ``impl="naive"``: the reference, differentiated by autograd: ``naive.py``'s
  ``linear_<op>_naive`` (the policy loss: its math on ``linear_logprobs_naive``'s log-probs).
"""
