"""Opt-in autotuning (RLAD_AUTOTUNE=1): the fastest candidate of the GPU family's space is chosen
once per shape, applied to the forward and to the backward, and changes no result. Timing is
replaced by a fake clock that prefers one candidate (the real one times on a GPU)."""

import pytest
import torch

from rlad_kernels import linear_divergence, linear_logprobs, linear_policy_loss
from rlad_kernels.ops.common import autotune, launch
from rlad_kernels.ops.common.launch import AUTOTUNE_SPACE, DEFAULTS

from helpers import make_lm_inputs

N, H, V = 23, 16, 70


@pytest.fixture
def tuning(monkeypatch):
    """Autotuning on, a fresh table of tuned shapes, and a fake clock: a candidate's time is 1 ms,
    except the ``scratch_bytes`` override (0.5 ms), which every float32 space has: it must win."""
    monkeypatch.setenv(autotune.ENV, "1")
    monkeypatch.setattr(autotune, "_best", {})
    timed = []

    def fake_bench(run):
        run()
        timed.append(dict(launch._overrides))
        return 0.5 if "scratch_bytes" in launch._overrides else 1.0

    monkeypatch.setattr(autotune, "_bench", fake_bench)
    return timed


def test_space_covers_every_default_and_starts_with_it():
    assert AUTOTUNE_SPACE.keys() == DEFAULTS.keys()
    for key, space in AUTOTUNE_SPACE.items():
        assert space[0] == {} and len(space) >= 2, key
        assert len({tuple(sorted(c.items())) for c in space}) == len(space), key  # no duplicates


def test_tunes_once_per_shape_and_keeps_the_results(tuning, monkeypatch, device):
    hidden, weight, b, targets = make_lm_inputs(N, H, V, bias=True, seed=3)
    seen_cfg = []
    from rlad_kernels.ops.logprobs import triton_impl

    real = triton_impl.logprob_backward

    def spy(*args):
        seen_cfg.append(args[-1])
        return real(*args)

    monkeypatch.setattr(triton_impl, "logprob_backward", spy)

    def run():
        w = weight.clone().requires_grad_()
        lp, ent = linear_logprobs(hidden, w, targets, bias=b, return_entropy=True, impl="triton")
        (lp.sum() + ent.sum()).backward()
        return lp.detach(), ent.detach(), w.grad

    tuned = run()
    space = AUTOTUNE_SPACE[(launch.gpu_family(hidden.device), True)]
    assert len(tuning) == len(space) and [t for t in tuning if t] == space[1:]
    assert seen_cfg[-1].scratch_bytes == 256 << 20  # the call's own backward ran under the winner
    del tuning[:]
    again = run()
    assert not tuning  # the shape is tuned: no more timing
    assert all(torch.equal(a, b) for a, b in zip(tuned, again, strict=True))
    monkeypatch.delenv(autotune.ENV)
    plain = run()
    for a, b in zip(tuned, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # another shape (token count in another power-of-two bucket) is tuned again
    monkeypatch.setenv(autotune.ENV, "1")
    h2, w2, b2, y2 = make_lm_inputs(3 * N, H, V, bias=True, seed=4)
    linear_logprobs(h2, w2, y2, bias=b2, impl="triton")
    assert len(tuning) == len(space)


def test_policy_loss_and_divergence_are_tuned_too(tuning, device):
    hidden, weight, b, targets = make_lm_inputs(N, H, V, seed=5)
    adv, old = torch.randn(N, device=device), torch.full((N,), -3.0, device=device)
    w = weight.clone().requires_grad_()
    linear_policy_loss(hidden, w, targets, adv, old, impl="triton").loss.backward()
    n_policy = len(tuning)
    linear_divergence(hidden, w, hidden * 0.5, weight, kind="jsd", impl="triton").backward()
    assert n_policy == len(AUTOTUNE_SPACE[(launch.gpu_family(hidden.device), True)]) and len(tuning) == 2 * n_policy
    assert torch.isfinite(w.grad).all()


def test_off_by_default_and_for_the_torch_path(tuning, monkeypatch, device):
    hidden, weight, b, targets = make_lm_inputs(N, H, V, seed=6)
    linear_logprobs(hidden, weight, targets, impl="torch")
    assert not tuning
    monkeypatch.delenv(autotune.ENV)
    linear_logprobs(hidden, weight, targets, impl="triton")
    assert not tuning
