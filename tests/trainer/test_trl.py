"""``rlad.integrations.trl``: RLAD inside TRL's ``GRPOTrainer``.

* With ``alpha=1`` the fused loss and its gradients equal TRL's own ``GRPOTrainer._compute_loss``
  on the same batch, for each aggregation (grpo, bnpo, dr_grpo, dapo), CISPO, GSPO (sequence-level
  ratio), the reference KL (``beta``), two-sided clipping (``delta``) and the entropy bonus under
  gradient accumulation; the reference is TRL's code itself.
* With ``alpha < 1`` the loss is the TRRD formula written out here on TRL's own per-token
  log-probs (float64).
* Two training steps end to end (generation, rewards, teacher scoring, the fused loss, an
  optimizer step) for TRRD and KDRL, on the tiny trained teacher / student of ``conftest.py``.
* A teacher whose tokenizer differs from the student's is refused before training.
"""

import copy
import math
import shutil
from pathlib import Path

import pytest
import torch

trl = pytest.importorskip("trl", reason="trl is not installed (pip install 'rlad[trl]')")
datasets = pytest.importorskip("datasets")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from rlad.integrations.trl import RLADConfig, RLADTrainer  # noqa: E402

from helpers import assert_rel  # noqa: E402

B, P, K = 6, 5, 7  # completions, prompt length, completion length


def _reward(completions, **kwargs):
    return [float("####" in c) for c in completions]


def _mixed_reward(completions, **kwargs):
    """1, 0, 1, 0, ... by position: TRL passes a group's completions next to each other, so every
    group gets two rewards of each kind and non-zero advantages, whatever was sampled."""
    return [float(i % 2 == 0) for i in range(len(completions))]


def _dataset(n=8):
    return datasets.Dataset.from_dict({"prompt": [f"Echo {i % 10}." for i in range(n)]})


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, per_device_train_batch_size=4,
                num_generations=4, max_completion_length=8, learning_rate=1e-3, logging_steps=1, save_strategy="no",
                seed=0, rlad_impl="torch", disable_tqdm=True, bf16=False)
    base.update(kw)
    return base


def _batch(tok, dtype, seed=0):
    """A hand-made generation batch (left-padded prompts, completions ending early)."""
    g = torch.Generator().manual_seed(seed)
    V = len(tok)
    prompt_ids = torch.randint(5, V, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[1, :2] = 0
    prompt_ids[prompt_mask == 0] = tok.pad_token_id
    completion_ids = torch.randint(5, V, (B, K), generator=g)
    completion_mask = torch.ones(B, K, dtype=torch.long)
    completion_mask[0, 4:] = 0
    completion_mask[3, 2:] = 0
    completion_ids[completion_mask == 0] = tok.pad_token_id
    return {
        "prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
        "completion_ids": completion_ids, "completion_mask": completion_mask,
        "advantages": torch.randn(B, generator=g, dtype=dtype),
        "num_items_in_batch": completion_mask.sum().float(),
    }


def _trl_logps(trainer, model, inputs):
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    with torch.no_grad():
        lp, _, _ = trainer._get_per_token_logps_and_entropies(model, ids, attn, K)
    return lp


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _pair(models, tmp_path, dtype, **kw):
    """TRL's GRPOTrainer and RLADTrainer (alpha=1) on two identical copies of the student."""
    tok = AutoTokenizer.from_pretrained(models["student"])
    student = AutoModelForCausalLM.from_pretrained(models["student"], dtype=dtype)
    ours_args = RLADConfig(**_args(tmp_path, **kw), teacher_model=models["teacher"], alpha=1.0,
                           teacher_model_init_kwargs={"dtype": dtype})
    trl_kw = {k: v for k, v in _args(tmp_path, **kw).items() if k != "rlad_impl"}
    theirs = trl.GRPOTrainer(copy.deepcopy(student), _reward, args=trl.GRPOConfig(**trl_kw),
                             train_dataset=_dataset(), processing_class=tok)
    ours = RLADTrainer(student, _reward, args=ours_args, train_dataset=_dataset(), processing_class=tok)
    for t in (theirs, ours):
        t.model.train()
        t.current_gradient_accumulation_steps = 1
    return theirs, ours


CASES = [
    pytest.param(dict(loss_type="grpo"), id="grpo"),
    pytest.param(dict(loss_type="bnpo", epsilon_high=0.28), id="bnpo-eps_high"),
    pytest.param(dict(loss_type="dr_grpo"), id="dr_grpo"),
    pytest.param(dict(loss_type="dapo", beta=0.04, use_bias_correction_kl=False), id="dapo-beta"),
    pytest.param(dict(loss_type="dapo", delta=1.5), id="dapo-delta"),
    pytest.param(dict(loss_type="cispo", epsilon_high=2.0), id="cispo"),
    pytest.param(dict(loss_type="grpo", importance_sampling_level="sequence"), id="gspo"),
    pytest.param(dict(loss_type="dapo", importance_sampling_level="sequence", beta=0.04,
                      use_bias_correction_kl=False), id="gspo-dapo-beta"),
    pytest.param(dict(loss_type="bnpo", entropy_coef=0.05), id="bnpo-entropy"),
    pytest.param(dict(loss_type="grpo", entropy_coef=0.05, gradient_accumulation_steps=2), id="grpo-entropy-accum2"),
]


@pytest.mark.parametrize("kw", CASES)
def test_alpha_one_equals_trl_grpo(models, tmp_path, kw):
    # float64 models: our side is then float64 throughout, while TRL's fused lm head returns float32
    # log-probs, so the two agree to float32 rounding of the log-probs (relative ~1e-7), not further
    dtype = torch.float64
    theirs, ours = _pair(models, tmp_path, dtype, **kw)
    for t in (theirs, ours):
        t.current_gradient_accumulation_steps = kw.get("gradient_accumulation_steps", 1)
    inputs = _batch(ours.processing_class, dtype)
    lp = _trl_logps(theirs, theirs.model, inputs)
    g = torch.Generator().manual_seed(1)
    noise = 0.6 if kw["loss_type"] == "cispo" else 0.3
    inputs["old_per_token_logps"] = lp + noise * torch.randn(lp.shape, generator=g, dtype=dtype)  # some clipped
    if "beta" in kw:
        inputs["ref_per_token_logps"] = lp + 0.2 * torch.randn(lp.shape, generator=g, dtype=dtype)
    ref_loss = theirs._compute_loss(theirs.model, dict(inputs))
    ref_loss.backward()
    ref_grads = _grads(theirs.model)
    mask = inputs["completion_mask"].bool()
    ratio = (lp - inputs["old_per_token_logps"]).exp()[mask]
    lo, hi = (0.0, 2.0) if kw["loss_type"] == "cispo" else (0.8, 1.2)
    if kw.get("importance_sampling_level") != "sequence":
        assert ((ratio < lo) | (ratio > hi)).any() and ((ratio > lo) & (ratio < hi)).any()

    ours_inputs = dict(inputs, teacher_per_token_logps=lp - 1.0)  # present, but alpha=1 ignores it
    loss = ours._compute_loss(ours.model, ours_inputs)
    # abs_tol: with the entropy bonus the loss is a difference of O(1) terms (TRL's float32 entropies)
    assert math.isclose(loss.item(), ref_loss.item(), rel_tol=2e-6, abs_tol=1e-6), (loss.item(), ref_loss.item())
    loss.backward()
    grads = _grads(ours.model)
    assert grads.keys() == ref_grads.keys()
    for n, ref in ref_grads.items():
        assert_rel(grads[n], ref, 2e-5, f"grad of {n}")  # measured: at most 4.2e-6 (q_proj, layer 0)
    metric = {"cispo": "cispo_clip_ratio"}.get(kw["loss_type"], "clip_ratio/region_mean")
    if kw.get("importance_sampling_level") != "sequence":  # TRL counts sequences there, the fused loss tokens
        assert ours._metrics["train"][metric][-1] == pytest.approx(theirs._metrics["train"][metric][-1], abs=1e-6)
        assert theirs._metrics["train"][metric][-1] > 0
    assert ours._metrics["train"]["entropy"][-1] == pytest.approx(theirs._metrics["train"]["entropy"][-1], rel=1e-5)
    if "beta" in kw:
        assert ours._metrics["train"]["kl"][-1] == pytest.approx(theirs._metrics["train"]["kl"][-1], rel=1e-5)


def test_on_policy_batch_matches_trl(models, tmp_path):
    """Without ``old_per_token_logps`` (TRL's aligned, on-policy case) TRL uses the current log-probs
    as lp_old; RLADTrainer scores them in a no-grad pass first: the same loss and gradients."""
    theirs, ours = _pair(models, tmp_path, torch.float64, loss_type="dapo")
    inputs = _batch(ours.processing_class, torch.float64, seed=2)
    ref_loss = theirs._compute_loss(theirs.model, dict(inputs))
    ref_loss.backward()
    ours_inputs = dict(inputs, old_per_token_logps=ours._score(ours.model, inputs).double(),
                       teacher_per_token_logps=torch.zeros(B, K, dtype=torch.float64))
    loss = ours._compute_loss(ours.model, ours_inputs)
    loss.backward()
    assert math.isclose(loss.item(), ref_loss.item(), rel_tol=1e-6)
    ref_grads, grads = _grads(theirs.model), _grads(ours.model)
    for n, ref in ref_grads.items():
        assert_rel(grads[n], ref, 2e-5, f"grad of {n}")


def test_trrd_loss_is_the_formula(models, tmp_path):
    """alpha=0.5, clamp 1, bnpo aggregation: the loss equals the TRRD formula on TRL's log-probs."""
    dtype = torch.float64
    theirs, ours = _pair(models, tmp_path, dtype, loss_type="bnpo")
    ours.args.alpha = 0.5
    inputs = _batch(ours.processing_class, dtype, seed=3)
    lp = _trl_logps(theirs, theirs.model, inputs)
    g = torch.Generator().manual_seed(4)
    old = lp + 0.2 * torch.randn(lp.shape, generator=g, dtype=dtype)
    lt = lp + 1.5 * torch.randn(lp.shape, generator=g, dtype=dtype)
    mask = inputs["completion_mask"].bool()
    A = inputs["advantages"][:, None].expand(B, K)
    log_r = 0.5 * (lp - old) + 0.5 * (lp - lt).clamp(-1.0, 1.0)
    r = log_r.exp()
    expected = torch.maximum(-A * r, -A * r.clamp(0.8, 1.2))[mask].sum() / mask.sum()
    assert ((lp - lt).abs()[mask] > 1).any()  # the clamp binds somewhere
    loss = ours._compute_loss(ours.model, dict(inputs, old_per_token_logps=old, teacher_per_token_logps=lt))
    assert math.isclose(loss.item(), expected.item(), rel_tol=2e-6)  # TRL's log-probs are float32
    assert ours._metrics["train"]["rlad/teacher_clamp_frac"][-1] == pytest.approx(
        ((lp - lt).abs()[mask] > 1).double().mean().item(), abs=1e-12)


@pytest.mark.parametrize("distillation", ["trrd", "kdrl"])
def test_two_training_steps(models, tmp_path, distillation):
    tok = AutoTokenizer.from_pretrained(models["student"])
    args = RLADConfig(**_args(tmp_path, max_steps=2, loss_type="dapo"), teacher_model=models["teacher"],
                      distillation=distillation, kd_beta=0.5)
    # a learning signal that does not depend on sampling luck (a "####" reward can be 0 for all)
    trainer = RLADTrainer(models["student"], _mixed_reward, args=args, train_dataset=_dataset(),
                          processing_class=tok)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    teacher_before = {n: p.detach().clone() for n, p in trainer.teacher.named_parameters()}
    trainer.train()
    assert trainer.state.global_step == 2
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) for h in logs)
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
    assert all(torch.equal(p, teacher_before[n]) for n, p in trainer.teacher.named_parameters())
    if distillation == "trrd":
        assert all("rlad/teacher_gap" in h and "rlad/teacher_clamp_frac" in h for h in logs)
    else:
        assert all("rlad/kd_mean" in h and "rlad/teacher_gap" not in h for h in logs)
        assert [h["rlad/kd_coef"] for h in logs] == pytest.approx([0.5, 0.5 - 5e-5])


def test_mismatched_teacher_tokenizer_is_refused(models, tmp_path):
    tok = AutoTokenizer.from_pretrained(models["student"])
    other = AutoTokenizer.from_pretrained(models["teacher"])
    other.add_tokens(["<extra>"])
    teacher = AutoModelForCausalLM.from_pretrained(models["teacher"])
    args = RLADConfig(**_args(tmp_path))
    with pytest.raises(ValueError, match="the teacher's tokenizer differs from the student's: the student's has 399 "
                                         "tokens, the teacher's 400"):
        RLADTrainer(models["student"], _reward, args=args, train_dataset=_dataset(), processing_class=tok,
                    teacher_model=teacher, teacher_processing_class=other)
    with pytest.raises(ValueError, match="pass teacher_processing_class="):
        teacher.config._name_or_path = ""
        RLADTrainer(models["student"], _reward, args=args, train_dataset=_dataset(), processing_class=tok,
                    teacher_model=teacher)
    with pytest.raises(ValueError, match="distillation='trrd' needs a teacher"):
        RLADTrainer(models["student"], _reward, args=args, train_dataset=_dataset(), processing_class=tok)


@pytest.mark.parametrize("kw, match", [
    (dict(loss_type="sapo"), "loss_type='sapo'"),
    (dict(use_adaptive_entropy=True), "use_adaptive_entropy"),
    (dict(top_entropy_quantile=0.2), "top_entropy_quantile"),
    (dict(beta=0.1), "use_bias_correction_kl=True with beta != 0"),
    (dict(delta=1.1), r"delta=1.1 <= 1 \+ epsilon_high"),
    (dict(distillation="distil"), "distillation='distil'"),
    (dict(alpha=1.5), "alpha"),
])
def test_unsupported_settings_are_refused(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        RLADConfig(**_args(tmp_path), **kw)


def _no_tokenizer(models, tmp_path):
    """A teacher folder with the model's files but no tokenizer's."""
    folder = tmp_path / "teacher-model-only"
    folder.mkdir()
    for f in Path(models["teacher"]).iterdir():
        if f.is_file() and not f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy(f, folder / f.name)
    return str(folder)


@pytest.mark.parametrize("spec,match", [
    pytest.param(lambda m, t: str(t / "missing"), r"teacher_model: model folder '.*missing' not found", id="missing"),
    pytest.param(lambda m, t: str(t), r"teacher_model: folder '.*' has no config.json", id="not-a-model"),
    pytest.param(_no_tokenizer, r"teacher_model='.*teacher-model-only': the folder has no tokenizer files "
                                r"\(tokenizer.json, .*\); save the teacher's tokenizer there, or pass "
                                r"teacher_processing_class=", id="no-tokenizer"),
])
def test_a_teacher_path_is_checked_before_anything_loads(models, tmp_path, monkeypatch, spec, match):
    """A missing teacher folder, or one without a tokenizer, gave Hugging Face's own errors once
    the student was loaded; now a one-line ValueError naming teacher_model, before any loading."""
    teacher = spec(models, tmp_path)

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the teacher was checked")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_load)  # the teacher
    monkeypatch.setattr("trl.trainer.grpo_trainer.create_model_from_path", no_load)  # TRL's load of the student
    tok = AutoTokenizer.from_pretrained(models["student"])
    for kw in (dict(teacher_model=teacher), dict()):  # the argument, or RLADConfig.teacher_model
        args = RLADConfig(**_args(tmp_path), **({} if kw else dict(teacher_model=teacher)))
        with pytest.raises(ValueError, match=match) as err:
            RLADTrainer(models["student"], _reward, args=args, train_dataset=_dataset(), processing_class=tok, **kw)
        assert "\n" not in str(err.value)
