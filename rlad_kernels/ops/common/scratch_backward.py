"""The backward shared by the fused lm_head ops: logit gradients through a bounded scratch.

An op provides ``fill(dl, row0, n_rows, col0, n_cols)``, which recomputes its logit tiles and
writes the gradient w.r.t. the raw logits ``x @ w.T + b`` for that region into ``dl``. This
module turns the regions into parameter gradients with GEMMs over complete reductions:

* dX: for each chunk of C tokens, fill ``[C, V]`` (the whole vocabulary), ``dX[chunk] = dl @ W``;
* dW, db: for each slice of S vocabulary rows, fill ``[N, S]`` (all tokens),
  ``dW[slice] = dl.T @ X`` over the valid rows only (``masked_gemm.py``: a NaN in an ignored
  row of X never reaches dW), ``db[slice] = dl.sum(0)``.

Each GEMM accumulates in float32 internally and writes its block of the gradient once, so there
is no float32 ``N x H`` or ``V x H`` buffer and nothing of size ``N x V``; C and S follow from
``scratch_bytes``. Each pass recomputes the logits (the price of O(N) memory).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .launch import TritonConfig
from .masked_gemm import masked_tn_gemm


def scratch_backward(x: torch.Tensor, w: torch.Tensor, bias_dtype: torch.dtype | None,
                     fill: Callable[[torch.Tensor, int, int, int, int], None], valid: torch.Tensor,
                     cfg: TritonConfig, *, need_dx: bool, need_dw: bool, need_db: bool):
    """Returns (dX [N, H] x.dtype | None, dW [V, H] w.dtype | None, db [V] bias_dtype | None);
    ``valid [N]`` (uint8) marks the rows that count; ``fill`` must write zeros on the others."""
    N, V = x.shape[0], w.shape[0]
    scratch_bytes, row_align, col_align = cfg.scratch_bytes, cfg.bwd_block_n, cfg.bwd_block_v
    elt = x.element_size()
    dx = dw = db = None
    if need_dx:
        dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        rows = max(row_align, (scratch_bytes // (V * elt)) // row_align * row_align)
        rows = max(1, min(rows, N))
        scratch = torch.empty((rows, V), dtype=x.dtype, device=x.device) if N else None
        for r0 in range(0, N, rows):
            r = min(rows, N - r0)
            fill(scratch[:r], r0, r, 0, V)
            torch.mm(scratch[:r], w, out=dx[r0:r0 + r])
    if need_dw or need_db:
        dw = torch.zeros(w.shape, dtype=w.dtype, device=w.device) if need_dw else None
        db = torch.zeros(V, dtype=torch.float32, device=x.device) if need_db else None
        if N:
            cols = max(col_align, (scratch_bytes // (N * elt)) // col_align * col_align)
            cols = min(cols, V)
            scratch = torch.empty((N, cols), dtype=x.dtype, device=x.device)
            for c0 in range(0, V, cols):
                c = min(cols, V - c0)
                view = scratch[:, :c]
                fill(view, 0, N, c0, c)
                if need_dw:
                    masked_tn_gemm(view, x, valid, dw[c0:c0 + c], cfg)
                if need_db:
                    torch.sum(view, dim=0, dtype=torch.float32, out=db[c0:c0 + c])
        if db is not None:
            db = db.to(bias_dtype)
    return dx, dw, db
