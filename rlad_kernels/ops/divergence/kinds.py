"""The divergence kinds, defined once: ``kind=``'s public names and the code each one becomes.

The code is the ``KIND`` constexpr the Triton kernels branch on (``kernels.py``) and the int
the torch path compares with (``chunked.py``); ``api.py`` turns ``kind=`` into it with ``CODES``.
"""

from __future__ import annotations

import triton.language as tl

RKL: tl.constexpr = tl.constexpr(0)  # KL(p_s || p_t)
FKL: tl.constexpr = tl.constexpr(1)  # KL(p_t || p_s)
JSD: tl.constexpr = tl.constexpr(2)  # beta KL(p_t || M) + (1 - beta) KL(p_s || M)

CODES = {"reverse_kl": RKL.value, "forward_kl": FKL.value, "jsd": JSD.value}  # kind= -> KIND
KINDS = tuple(CODES)  # the public names
