"""pytest-benchmark suite at small shapes; runs anywhere, CPU included:

    python -m pytest benchmarks/ --benchmark-only

One fwd+bwd benchmark per (op, provider). A provider that cannot run on this machine is
reported as skipped with its reason, never dropped silently. The large-shape sweeps with CSV
output are the bench_*.py scripts.
"""

import pytest
import torch

from benchmarks.harness import Shape, Unavailable, fwd_bwd, make_inputs
from benchmarks.providers import PROVIDERS

# torch's own deprecation, raised when torch.compile first imports inductor (torch.utils.mkldnn uses
# torch.jit.script_method; Liger's chunked losses and the torch.compile provider compile): not ours,
# so a run with -W error::DeprecationWarning still fails on the ops' deprecated keyword form only
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPE = Shape(N=512, H=128, V=4096, H_t=160, dtype=torch.bfloat16 if DEVICE.type == "cuda" else torch.float32,
              seq_len=256)
CASES = [(op, p.name) for op in PROVIDERS for p in PROVIDERS[op](SHAPE.seq_len)]


@pytest.fixture(scope="module")
def inputs():
    return make_inputs(SHAPE, DEVICE)


@pytest.mark.parametrize("op,name", CASES, ids=[f"{op}-{name}" for op, name in CASES])
def test_fwd_bwd(benchmark, inputs, op, name):
    prov = {p.name: p for p in PROVIDERS[op](SHAPE.seq_len)}[name]
    x = dict(inputs)
    leaves = []
    for key in prov.leaves:
        x[key] = x[key].detach().requires_grad_()
        leaves.append(x[key])
    try:
        closure = prov.make(x)
    except Unavailable as e:
        pytest.skip(f"{name}: {e}")

    call = fwd_bwd(prov, closure)

    def step():
        for t in leaves:
            t.grad = None
        call()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.group = op
    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)
