"""Per-token log-prob statistics: the part that ``logprobs`` and ``policy_loss`` share.

Both ops stream the vocabulary once per token block with the same online statistics
(``scan_rows``) and finish the rows the same way (``finish_rows``); each op's own forward
kernel does that and adds its own epilogue (the policy loss's is in ``policy_loss/kernels.py``).
When the vocabulary is split across programs to fill the GPU, each program stores partial
statistics and the op's combine kernel merges them (``merge_partials``) before finishing.
``logprob_forward`` launches an op's pair of kernels.

The backward is the same for any loss that is a function of per-token log-prob and entropy:
``logprob_dlogits_kernel`` recomputes logit tiles and writes
``dL/du = s (g (1[j = y] - p_j) - h p_j (z_j - E_p[z]))`` for upstream per-token ``g``, ``h``,
and ``logprob_backward`` turns that into dX, dW, db through ``scratch_backward``.
Derivations: ``ops/logprobs/README.md``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .launch import ScanPlan, TritonConfig, get_config, head, tiles
from .numerics import LogitMap
from .scratch_backward import scratch_backward
from .tiles import (
    logit_slope,
    logits_tile,
    mul_safe,
    online_max,
    region_tile,
    rescale_moment,
    shift,
    split_max,
    split_part,
    store_region,
)


class Rows(NamedTuple):
    """Per-token outputs [N] float32: the log-prob, and what the backward needs: the row's
    ``shift`` (its max logit, 0 for a row that saw none) and ``log_sum`` = log sum exp(z - shift),
    so that log p = (z - shift) - log_sum is formed without subtracting two numbers of the size
    of the logits, and the entropy (a placeholder unless ENTROPY)."""

    lp: torch.Tensor
    shift: torch.Tensor
    log_sum: torch.Tensor
    ent: torch.Tensor


class Partials(NamedTuple):
    """Per-split statistics [SPLIT, N] float32: running max, sum-exp, entropy moment, target logit."""

    m: torch.Tensor
    l: torch.Tensor  # noqa: E741 - the sum-exp, as in the derivations
    s: torch.Tensor
    t: torch.Tensor


# Device side: the scan, the split merge, the finish, the backward's logit-gradient kernel.
@triton.jit
def load_targets(y_ptr, o_n, m_n, ignore_index):
    b_y = tl.load(y_ptr + o_n, mask=m_n, other=ignore_index)
    return b_y, m_n & (b_y != ignore_index)


@triton.jit
def scan_rows(head, H, b_y, o_n, valid, v_lo, v_hi, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
              ENTROPY: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr, DOT_PRECISION: tl.constexpr,
              UPCAST: tl.constexpr):
    """Online statistics over columns [v_lo, v_hi): running max m, l = sum exp(z - m),
    s = sum exp(z - m) (z - m) and the target logit t (0 when the target is outside the range).
    s is kept relative to m so the entropy log(l) - s/l never subtracts two large numbers.
    A block of ignored tokens skips the GEMM."""
    b_m = tl.full((BN,), float("-inf"), dtype=tl.float32)
    b_l = tl.zeros((BN,), dtype=tl.float32)
    b_s = tl.zeros((BN,), dtype=tl.float32)
    b_t = tl.zeros((BN,), dtype=tl.float32)
    if tl.sum(valid.to(tl.int32), axis=0) > 0:
        for v0 in range(v_lo, v_hi, BV):
            o_v = v0 + tl.arange(0, BV)
            m_v = o_v < v_hi
            b_z = logits_tile(head, H, o_n, valid, o_v, m_v, HAS_BIAS, SOFTCAP, BN, BV, BH, DOT_PRECISION, UPCAST)
            b_t += tl.sum(tl.where(o_v[None, :] == b_y[:, None], b_z, 0.0), axis=1)
            b_m_new, b_sh, b_r, b_u = online_max(b_m, b_z)
            b_e = tl.exp(b_u)
            if ENTROPY:
                b_s = rescale_moment(b_s, b_r, shift(b_m) - b_sh, b_l) + tl.sum(mul_safe(b_e, b_u), axis=1)
            b_l = b_l * b_r + tl.sum(b_e, axis=1)
            b_m = b_m_new
    return b_m, b_l, b_s, b_t


@triton.jit
def store_partials(parts, i_s, N, o_n, m_n, b_m, b_l, b_s, b_t):
    o_p = i_s * N + o_n
    tl.store(parts.m + o_p, b_m, mask=m_n)
    tl.store(parts.l + o_p, b_l, mask=m_n)
    tl.store(parts.s + o_p, b_s, mask=m_n)
    tl.store(parts.t + o_p, b_t, mask=m_n)


@triton.jit
def merge_partials(parts, o_n, m_n, N, SPLIT: tl.constexpr, BN: tl.constexpr):
    """Merge the SPLIT partial statistics of rows o_n into whole-vocabulary ones."""
    b_m = split_max(parts.m, o_n, m_n, N, SPLIT, BN)
    b_sh = shift(b_m)
    b_l = tl.zeros((BN,), dtype=tl.float32)
    b_s = tl.zeros((BN,), dtype=tl.float32)
    b_t = tl.zeros((BN,), dtype=tl.float32)
    for i in range(SPLIT):
        b_li, b_ri, b_di = split_part(parts.m, parts.l, i, o_n, m_n, N, b_sh)
        b_s += rescale_moment(tl.load(parts.s + i * N + o_n, mask=m_n, other=0.0), b_ri, b_di, b_li)
        b_l += b_ri * b_li
        b_t += tl.load(parts.t + i * N + o_n, mask=m_n, other=0.0)
    return b_m, b_l, b_s, b_t


@triton.jit
def finish_rows(rows, b_m, b_l, b_s, b_t, b_y, valid, o_n, m_n, V, ENTROPY: tl.constexpr):
    """logp (+ entropy) of finished rows and the backward's row statistics, stored; returns
    (logp, entropy). Ignored rows give 0, valid rows with an id outside [0, V) give NaN. Every
    quantity stays relative to the shift: logp = (t - shift) - log l, entropy = log l - s / l."""
    b_sh = shift(b_m)
    b_l = tl.where(valid, b_l, 1.0)  # skipped rows have l = 0
    b_logl = tl.log(b_l)
    bad = valid & ((b_y < 0) | (b_y >= V))
    b_lp = tl.where(bad, float("nan"), (b_t - b_sh) - b_logl)
    b_lp = tl.where(valid, b_lp, 0.0)
    b_ent = tl.where(valid, b_logl - b_s / b_l, 0.0)
    tl.store(rows.lp + o_n, b_lp, mask=m_n)
    tl.store(rows.shift + o_n, b_sh, mask=m_n)
    tl.store(rows.log_sum + o_n, b_logl, mask=m_n)
    if ENTROPY:
        tl.store(rows.ent + o_n, b_ent, mask=m_n)
    return b_lp, b_ent


@triton.jit(do_not_specialize=["row0", "n_rows", "col0", "n_cols"])
def logprob_dlogits_kernel(
    head, y_ptr, shift_ptr, logsum_ptr, ent_ptr, glp_ptr, gent_ptr, dl_ptr,
    row0, n_rows, col0, n_cols, H, stride_dp, stride_dr, stride_dc, ignore_index,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, HAS_GENT: tl.constexpr, SPLIT: tl.constexpr, GROUP: tl.constexpr,
    BN: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """dl[r, c] = dz/dr * (g_lp (onehot - p) - g_ent p (log p + H)) for rows row0 + r, columns
    col0 + c of the logits (z - E_p[z] = log p + H); rows that are ignored or have zero upstream
    gradient give 0. log p = (z - shift) - log_sum, from the forward's row statistics."""
    o_r, m_r, o_n, o_c, m_c, o_v = region_tile(row0, n_rows, col0, n_cols, GROUP, BN, BV)
    b_y, valid = load_targets(y_ptr, o_n, m_r, ignore_index)
    b_glp = tl.load(glp_ptr + o_n, mask=valid, other=0.0)
    active = valid & (b_glp != 0.0)
    if HAS_GENT:
        b_gent = tl.load(gent_ptr + o_n, mask=valid, other=0.0)
        active = active | (valid & (b_gent != 0.0))
    b_dl = tl.zeros((BN, BV), dtype=tl.float32)
    if tl.sum(active.to(tl.int32), axis=0) > 0:  # tiles with no gradient skip the GEMM
        b_z = logits_tile(head, H, o_n, active, o_v, m_c, HAS_BIAS, SOFTCAP, BN, BV, BH, DOT_PRECISION, UPCAST)
        # inactive rows: log_sum = +inf makes log p = -inf and p = 0 there (no overflow in exp)
        b_sh = tl.load(shift_ptr + o_n, mask=active, other=0.0)
        b_logl = tl.load(logsum_ptr + o_n, mask=active, other=float("inf"))
        b_logp = (b_z - b_sh[:, None]) - b_logl[:, None]
        b_p = tl.exp(b_logp)
        b_dl = tl.where(o_v[None, :] == b_y[:, None], b_glp[:, None], 0.0) - b_glp[:, None] * b_p
        if HAS_GENT:
            b_ent = tl.load(ent_ptr + o_n, mask=active, other=0.0)
            b_dl -= b_gent[:, None] * mul_safe(b_p, b_logp + b_ent[:, None])
        b_dl = tl.where(active[:, None] & m_c[None, :], b_dl * logit_slope(b_z, head, SOFTCAP), 0.0)
    store_region(dl_ptr, b_dl, o_r, m_r, o_c, m_c, stride_dp, stride_dr, stride_dc, SPLIT)


# Host side: the launchers.
def logprob_forward(fwd_kernel, combine_kernel, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                    y: torch.Tensor, lmap: LogitMap, ignore_index: int, want_entropy: bool, plan: ScanPlan,
                    cfg: TritonConfig, **extra):
    """Launch an op's forward kernels over ``x [N, H]``, ``w [V, H]``, ``y [N]``: ``fwd_kernel``
    scans the vocabulary (and finishes the rows when ``plan.split == 1``), ``combine_kernel``
    merges the splits and finishes them otherwise. ``extra`` holds the op's own kernel
    arguments, passed to whichever kernel finishes the rows. Returns float32 ``Rows`` of [N]
    tensors (``ent`` is None unless ``want_entropy``)."""
    N, H = x.shape
    V = w.shape[0]
    f32 = dict(dtype=torch.float32, device=x.device)
    rows = Rows(*(torch.empty(N, **f32) for _ in range(3)), torch.empty(N, **f32) if want_entropy else None)
    if N == 0:
        return rows
    out = rows._replace(ent=rows.ent if want_entropy else rows.lp)  # a placeholder pointer without entropy
    if plan.split > 1:
        parts = Partials(*(torch.empty((plan.split, N), **f32) for _ in range(4)))
    else:
        parts = Partials(*[rows.lp] * 4)  # unused
    fwd_kernel[(triton.cdiv(N, cfg.block_n) * plan.split,)](
        head(x, w, b, lmap), y, out, parts, N=N, V=V, H=H, ignore_index=ignore_index,
        tiles_per_split=plan.tiles_per_split, HAS_BIAS=b is not None, SOFTCAP=lmap.capped, ENTROPY=want_entropy,
        SPLIT=plan.split,
        **tiles(x.dtype, cfg), **extra,
    )
    if plan.split > 1:
        combine_kernel[(plan.blocks,)](y, out, parts, N=N, V=V, ignore_index=ignore_index, ENTROPY=want_entropy,
                                       SPLIT=plan.split, BN=cfg.epilogue_block, **extra)
    return rows


def logprob_backward(x, w, b, y, rows: Rows, g_lp, g_ent, lmap: LogitMap, ignore_index: int, need_dx: bool,
                     need_dw: bool, need_db: bool, cfg: TritonConfig | None = None):
    """dX [N, H] (x.dtype), dW [V, H] (w.dtype), db [V] (b.dtype) for upstream per-token
    ``g_lp`` (log-prob) and ``g_ent`` (entropy; needs ``rows.ent``), each None when not needed;
    ``rows``: the forward's ``Rows``."""
    cfg = cfg or get_config(x.device, x.dtype)
    g_lp = g_lp.contiguous().float()
    g_ent = g_ent.contiguous().float() if g_ent is not None else None
    hd = head(x, w, b, lmap)
    t = tiles(x.dtype, cfg, backward=True)

    def fill(dl, row0, n_rows, col0, n_cols):
        grid = (triton.cdiv(n_rows, cfg.bwd_block_n) * triton.cdiv(n_cols, cfg.bwd_block_v),)
        logprob_dlogits_kernel[grid](
            hd, y, rows.shift, rows.log_sum, rows.ent if rows.ent is not None else rows.lp, g_lp,
            g_ent if g_ent is not None else g_lp, dl,
            row0, n_rows, col0, n_cols, x.shape[1], dl.stride(0), dl.stride(1), dl.stride(2), ignore_index,
            HAS_BIAS=b is not None, SOFTCAP=lmap.capped, HAS_GENT=g_ent is not None, SPLIT=dl.shape[0] == 2,
            GROUP=cfg.group, **t,
        )

    valid = (y != ignore_index).to(torch.uint8)
    return scratch_backward(x, w, b.dtype if b is not None else None, fill, valid, cfg, need_dx=need_dx,
                            need_dw=need_dw, need_db=need_db)
