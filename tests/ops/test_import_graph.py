"""The layering of ``rlad_kernels``: an op imports from ``ops/common`` and ``utils``, never from
another op; what composes ops (``losses.py``: the public policy loss with the teacher's
log-probs, the naive and sequence-level paths and the exact KD term) sits above them, at the
package's top level. ``common`` and ``utils`` import no op; nothing imports the trainer.

Run this file as a script to print the module-level import graph:

    PYTHONPATH=tests python tests/ops/test_import_graph.py
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from helpers import import_graph as project_imports

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "rlad_kernels"
OPS = ("logprobs", "divergence", "policy_loss")


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules (``rlad_kernels.*``, ``rlad.*``) it imports."""
    return project_imports(PKG, ("rlad_kernels", "rlad"))
COMPOSITE = "rlad_kernels.losses"  # the public policy loss, composed of the ops


def layer(name: str) -> str:
    """'op:<op>', 'common', 'utils', 'top' (the package and its modules) or 'trainer'."""
    parts = name.split(".")
    if parts[0] == "rlad":
        return "trainer"
    if len(parts) >= 3 and parts[1] == "ops":
        return "common" if parts[2] == "common" else f"op:{parts[2]}"
    if len(parts) >= 2 and parts[1] == "utils":
        return "utils"
    return "top"


def violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for src, deps in graph.items():
        for dst in deps:
            ls, ld = layer(src), layer(dst)
            if ld == "trainer":
                bad.append(f"{src} imports the trainer ({dst})")
            elif ls == "utils" and ld != "utils":
                bad.append(f"{src} (utils) imports {dst}")
            elif ls == "common" and ld not in ("common", "utils"):
                bad.append(f"{src} (common) imports {dst}")
            elif ls.startswith("op:") and ld.startswith("op:") and ls != ld:
                bad.append(f"{src} imports another op's module {dst}")
            elif ls.startswith("op:") and ld == "top":
                bad.append(f"{src} imports the package top level {dst}")
    return sorted(bad)


def test_every_op_is_present():
    """Each op: its public function (api), a reference, the torch path (chunked), its Triton kernels
    and their host side. The policy loss's reference is its torch math (math.py) on the naive
    log-probs of ``linear_logprobs``, composed in ``losses.py``."""
    graph = import_graph()
    for op in OPS:
        reference = "math" if op == "policy_loss" else "naive"
        for part in ("api", reference, "chunked", "kernels", "triton_impl"):
            assert f"rlad_kernels.ops.{op}.{part}" in graph, f"ops/{op}/{part}.py is missing"
    assert any(layer(m) == "common" for m in graph)


def test_ops_import_only_common_and_utils():
    graph = import_graph()
    assert violations(graph) == []
    # the composition happens above the ops: the composite uses all three
    assert {f"rlad_kernels.ops.{op}.api" for op in OPS} <= graph[COMPOSITE]


def test_the_checker_catches_a_cross_op_import():
    graph = {"rlad_kernels.ops.divergence.chunked": {"rlad_kernels.ops.logprobs.chunked"},
             "rlad_kernels.ops.common.tiles": {"rlad_kernels.ops.policy_loss.math"},
             "rlad_kernels.ops.logprobs.api": {"rlad.train"}}
    assert len(violations(graph)) == 3


if __name__ == "__main__":
    g = import_graph()
    for src in sorted(g):
        inside = sorted(d for d in g[src] if d.startswith("rlad_kernels"))
        print(f"{src}\n    -> " + ("\n    -> ".join(inside) if inside else "(nothing in the package)"))
    bad = violations(g)
    print("\nlayering:", "ok" if not bad else "\n  " + "\n  ".join(bad))
    sys.exit(1 if bad else 0)


TRAINER_ONLY = ("transformers", "tokenizers", "yaml", "tqdm", "matplotlib", "trl", "safetensors", "huggingface_hub")
KERNELS_ALONE = f"""
import importlib.abc, os, sys

class TrainerDependency(importlib.abc.MetaPathFinder):  # as if installed without the train extra
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {TRAINER_ONLY!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

sys.meta_path.insert(0, TrainerDependency())
os.environ["TRITON_INTERPRET"] = "1"
import torch
from rlad_kernels import linear_divergence, linear_logprobs, linear_policy_loss

h, w, t = torch.randn(6, 16), torch.randn(40, 16), torch.randint(0, 40, (6,))
for impl in ("torch", "triton"):
    linear_logprobs(h, w, t, impl=impl)
    linear_divergence(h, w, h, w, impl=impl)
    linear_policy_loss(h, w, t, torch.randn(6), torch.randn(6), impl=impl)
print("ok", sorted(m for m in sys.modules if m.split(".")[0] in {TRAINER_ONLY!r}))
"""


def test_the_kernels_need_only_torch_and_triton():
    """``pip install rlad`` (no ``train`` extra) gives torch, Triton and numpy: every op, on both
    paths, imports and runs with the trainer's dependencies absent (.ci/run also installs the
    package alone in a fresh environment)."""
    proc = subprocess.run([sys.executable, "-c", KERNELS_ALONE], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "ok []"


def test_the_rlad_command_without_the_train_extra_says_what_to_install():
    blocker = KERNELS_ALONE.split("import torch")[0]
    code = blocker + "from rlad.cli import main\nsys.exit(main(['train']))\n"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr == ("rlad train: error: the trainer needs transformers, tokenizers, pyyaml, tqdm, matplotlib, "
                           "which are not installed; install them with: pip install \"rlad[train]\" (pip install -e "
                           "\".[train]\" in a checkout)\n")


def test_the_public_names_load_on_first_use_and_the_options_need_no_torch():
    """``rlad_kernels`` loads its public names when first used; the policy options (what a trainer's
    flags are made of) import without torch, so ``rlad train --help`` never waits for it."""
    code = ("import sys\nimport rlad_kernels\nfrom rlad_kernels.ops.policy_loss.options import PolicyOptions\n"
            "import rlad.config\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n"
            "assert set(rlad_kernels.__all__) == set(rlad_kernels._EXPORTS) | {'__version__'}\n"
            "from rlad_kernels import *\n"
            "assert 'torch' in sys.modules\n"
            "assert all(getattr(rlad_kernels, n) is globals()[n] for n in rlad_kernels.__all__)\nprint('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "ok"
