"""Triton kernels of ``linear_logprobs``: per-token log-probs (+ entropy) from ``hidden @ weight.T``.

* ``logprobs_fwd_kernel``: one program per (token block, vocab split) streams its share of
  the vocabulary in ``BV`` tiles (``common/logprob.py: scan_rows``); with one split it
  finishes the rows in the same launch, otherwise it stores O(N x SPLIT) partials that
  ``logprobs_combine_kernel`` merges and finishes.

The backward is the shared ``common/logprob.py: logprob_dlogits_kernel``. Derivations in ``README.md``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..common.logprob import finish_rows, load_targets, merge_partials, scan_rows, store_partials
from ..common.tiles import row_block, token_split


@triton.jit(do_not_specialize=["N", "tiles_per_split"])
def logprobs_fwd_kernel(
    head, y_ptr, rows, parts, N, V, H, ignore_index, tiles_per_split,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, ENTROPY: tl.constexpr, SPLIT: tl.constexpr,
    BN: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    i_s, i_n, o_n, m_n, v_lo, v_hi = token_split(N, V, tiles_per_split, BN, BV)
    b_y, valid = load_targets(y_ptr, o_n, m_n, ignore_index)
    b_m, b_l, b_s, b_t = scan_rows(head, H, b_y, o_n, valid, v_lo, v_hi, HAS_BIAS, SOFTCAP, ENTROPY, BN, BV, BH,
                                   DOT_PRECISION, UPCAST)
    if SPLIT == 1:
        finish_rows(rows, b_m, b_l, b_s, b_t, b_y, valid, o_n, m_n, V, ENTROPY)
    else:
        store_partials(parts, i_s, N, o_n, m_n, b_m, b_l, b_s, b_t)


@triton.jit(do_not_specialize=["N"])
def logprobs_combine_kernel(y_ptr, rows, parts, N, V, ignore_index, ENTROPY: tl.constexpr, SPLIT: tl.constexpr,
                            BN: tl.constexpr):
    """Second launch when the vocabulary was split: merge partials, then finish the rows."""
    i_n, o_n, m_n = row_block(N, BN)
    b_y, valid = load_targets(y_ptr, o_n, m_n, ignore_index)
    b_m, b_l, b_s, b_t = merge_partials(parts, o_n, m_n, N, SPLIT, BN)
    finish_rows(rows, b_m, b_l, b_s, b_t, b_y, valid, o_n, m_n, V, ENTROPY)
