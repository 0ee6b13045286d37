"""The backward shared by the fused lm_head ops: logit gradients through a bounded scratch.

An op provides ``fill(dl, row0, n_rows, col0, n_cols)``, which recomputes its logit tiles and
writes the gradient w.r.t. the raw logits ``x @ w.T + b`` for that region into ``dl``
(``[P, n_rows, n_cols]``: with 16-bit inputs two parts, hi and lo, whose sum carries 16
significant bits, see ``gemm.py``; one part otherwise). This module turns the regions into
parameter gradients with GEMMs over complete reductions:

* dX: for each chunk of C tokens, fill ``[P, C, V]`` (the whole vocabulary), ``dX[chunk] = dl @ W``;
* dW, db: for each slice of S vocabulary rows, fill ``[P, N, S]`` (all tokens),
  ``dW[slice] = dl.T @ X`` over the valid rows only (a NaN in an ignored row of X never reaches
  dW), ``db[slice] = dl.sum(0)``.

Each GEMM accumulates in float32 and writes its block of the gradient once, so there is no
float32 ``N x H`` or ``V x H`` buffer and nothing of size ``N x V``; C and S follow from
``scratch_bytes``. Each pass recomputes the logits (the price of O(N) memory).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .gemm import tn_gemm
from .launch import TritonConfig


def scratch_backward(x: torch.Tensor, w: torch.Tensor, bias_dtype: torch.dtype | None,
                     fill: Callable[[torch.Tensor, int, int, int, int], None], valid: torch.Tensor,
                     cfg: TritonConfig, *, need_dx: bool, need_dw: bool, need_db: bool):
    """Returns (dX [N, H] x.dtype | None, dW [V, H] w.dtype | None, db [V] bias_dtype | None);
    ``valid [N]`` (uint8) marks the rows that count; ``fill`` must write zeros on the others."""
    N, V = x.shape[0], w.shape[0]
    parts = 2 if cfg.split_scratch and x.element_size() == 2 else 1
    elt = x.element_size() * parts
    dx = dw = db = None
    if need_dx:
        dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        rows = max(cfg.bwd_block_n, (cfg.scratch_bytes // (V * elt)) // cfg.bwd_block_n * cfg.bwd_block_n)
        rows = max(1, min(rows, N))
        scratch = torch.empty((parts, rows, V), dtype=x.dtype, device=x.device) if N else None
        for r0 in range(0, N, rows):
            r = min(rows, N - r0)
            fill(scratch[:, :r], r0, r, 0, V)
            if parts == 1:
                torch.mm(scratch[0, :r], w, out=dx[r0:r0 + r])
            else:
                tn_gemm(scratch[:, :r].transpose(1, 2), w, dx[r0:r0 + r], cfg)
    if need_dw or need_db:
        dw = torch.zeros(w.shape, dtype=w.dtype, device=w.device) if need_dw else None
        db = torch.zeros(V, dtype=torch.float32, device=x.device) if need_db else None
        if N:
            cols = max(cfg.bwd_block_v, (cfg.scratch_bytes // (N * elt)) // cfg.bwd_block_v * cfg.bwd_block_v)
            cols = min(cols, V)
            scratch = torch.empty((parts, N, cols), dtype=x.dtype, device=x.device)
            for c0 in range(0, V, cols):
                c = min(cols, V - c0)
                view = scratch[:, :, :c]
                fill(view, 0, N, c0, c)
                if need_dw:
                    tn_gemm(view, x, dw[c0:c0 + c], cfg, valid=valid)
                if need_db:
                    torch.sum(view, dim=(0, 1), dtype=torch.float32, out=db[c0:c0 + c])
        if db is not None:
            db = db.to(bias_dtype)
    return dx, dw, db
