"""RLAD inside Hugging Face TRL: ``RLADTrainer`` is TRL's ``GRPOTrainer`` with a frozen teacher and
the TRRD ratio (or KDRL's KD term), its loss computed by ``rlad_kernels.linear_policy_loss``
straight from the student's hidden states (no ``[tokens x vocab]`` logits).

    from rlad.integrations.trl import RLADConfig, RLADTrainer

    args = RLADConfig(output_dir="out", teacher_model="Qwen/Qwen3-8B", alpha=0.5, teacher_clamp=1.0)
    trainer = RLADTrainer(model="Qwen/Qwen3-1.7B", reward_funcs=my_reward, args=args, train_dataset=ds)
    trainer.train()

What stays TRL's: generation (transformers, vLLM server or colocate), rewards and advantages,
batching (``per_device_train_batch_size``, ``steps_per_generation``, ``num_iterations``),
accelerate / DeepSpeed / FSDP launch, logging and checkpoints. The GRPO settings keep TRL's
meaning: ``loss_type`` (grpo, bnpo, dr_grpo, dapo, cispo), ``importance_sampling_level``
("sequence" is GSPO), ``epsilon`` / ``epsilon_high`` (CISPO's cap under cispo), ``beta`` (the k3
KL to the reference model), ``delta`` (two-sided clipping), ``num_items_in_batch`` and a static
``entropy_coef`` (TRL's token-mean bonus). With ``alpha=1`` the loss and its gradients are TRL's
own (``tests/trainer/test_trl.py`` checks this on the same batch). With a teacher and
``alpha < 1`` the TRRD anchor applies to the same ratio: GSPO+TRRD, CISPO+TRRD.

What RLAD adds: after TRL scores a generation batch, the teacher scores the same completions
(one no-grad forward, through the fused log-prob op), and the loss's ratio becomes
``alpha (lp - lp_old) + (1 - alpha) clamp(lp - lp_T, -c, c)``. ``distillation="kdrl"`` instead
keeps the GRPO ratio and adds ``kd_coef * KD(student || teacher)`` (annealed, none on responses
whose reward reaches ``kd_reward_threshold``). When TRL would skip the old-policy forward (its
generation and optimization steps aligned), this trainer computes it, since the fused op takes
``lp_old`` as an input: one extra no-grad student forward per generation batch.

Supported TRL versions: 1.16 up to (not including) 2.0; ``GRPOTrainer``'s internals this class
relies on (``_generate_and_score_completions``'s output keys, ``_compute_loss``,
``_calculate_rewards``) are those of that range. Options the fused loss cannot reproduce are
refused in ``RLADConfig`` with the reason, never silently changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from packaging.version import Version

try:
    import trl
    from accelerate.utils import is_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
    from trl import GRPOConfig, GRPOTrainer
    from trl.models import prepare_deepspeed, prepare_fsdp
    from trl.models.utils import disable_gradient_checkpointing
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError("rlad.integrations.trl needs TRL: pip install 'rlad[trl]' (trl>=1.16,<2)") from err

from rlad_kernels import PolicyLossConfig, apply_rlad_kernels
from rlad_kernels.ops.policy_loss.options import KD_ESTIMATORS, TeacherOptions, option

from ..gguf import gguf_model, gguf_source, gguf_tokenizer
from ..models import check_model_path, check_vocab
from ..tokenizer import TOKENIZER_FILES, carries_tokenizer

TRL_MIN, TRL_MAX = Version("1.16"), Version("2.0")
if not TRL_MIN <= Version(trl.__version__) < TRL_MAX:
    raise ImportError(f"rlad.integrations.trl supports trl >= {TRL_MIN}, < {TRL_MAX}; found trl {trl.__version__}")

DISTILLATIONS = ("trrd", "kdrl", "none")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo")
IGNORE = -100


@dataclass
class RLADConfig(TeacherOptions, GRPOConfig):
    """TRL's ``GRPOConfig`` plus the teacher and RLAD's options (see the module docstring): the TRRD
    options (``alpha``, ``teacher_clamp``, ``teacher_clamp_grad``, ``mixture``, the gates) are
    ``rlad_kernels``' ``TeacherOptions``, defined once for the op, ``rlad train`` and this config;
    TRL's own settings give the clip (``epsilon``, ``epsilon_high``, ``delta``), the reference KL
    (``beta``) and the entropy bonus."""

    teacher_model: str | None = field(
        default=None,
        metadata={"help": "Teacher model id or path (or pass `teacher_model=` to RLADTrainer). Required unless "
                          "distillation='none'."})
    teacher_model_init_kwargs: dict[str, Any] | None = field(
        default=None, metadata={"help": "Keyword arguments of AutoModelForCausalLM.from_pretrained for the teacher."})
    distillation: str = field(
        default="trrd",
        metadata={"help": "trrd (RLAD: the ratio anchored to the teacher), kdrl (GRPO + annealed KD term) or none "
                          "(plain GRPO through the fused loss).", "choices": list(DISTILLATIONS)})
    kd_estimator: str = option("kd_estimator", default="k2",  # sampled-token estimators only (no hidden states)
                               choices=[e for e in KD_ESTIMATORS if e not in (None, "full")])
    kd_beta: float = field(default=5e-3, metadata={"help": "KDRL: initial KD coefficient."})
    kd_beta_min: float = field(default=1e-3, metadata={"help": "KDRL: floor of the annealed KD coefficient."})
    kd_beta_decay: float = field(default=5e-5, metadata={"help": "KDRL: KD coefficient decrease per optimizer step."})
    kd_reward_threshold: float | None = field(
        default=1.0, metadata={"help": "KDRL: no KD term on completions whose total reward is at least this "
                                       "(None: KD on every completion)."})
    rlad_impl: str | None = field(
        default=None, metadata={"help": "rlad_kernels implementation: triton, torch or naive (default: triton on "
                                        "CUDA, torch otherwise)."})

    def __post_init__(self):
        super().__post_init__()
        refuse = []
        if self.distillation not in DISTILLATIONS:
            refuse.append(f"distillation={self.distillation!r}: choose one of {', '.join(DISTILLATIONS)}")
        if self.loss_type not in LOSS_TYPES:
            refuse.append(f"loss_type={self.loss_type!r}: the fused loss supports {', '.join(LOSS_TYPES)}")
        if self.top_entropy_quantile < 1.0:
            refuse.append("top_entropy_quantile < 1: the entropy mask needs the entropies before the fused loss runs")
        if self.off_policy_mask_threshold is not None:
            refuse.append("off_policy_mask_threshold: the off-policy mask needs the log-probs before the fused loss "
                          "runs")
        if self.use_adaptive_entropy:
            refuse.append("use_adaptive_entropy: the adaptive entropy controller is not supported (a static "
                          "entropy_coef is)")
        if self.beta != 0.0 and self.use_bias_correction_kl:
            refuse.append("use_bias_correction_kl=True with beta != 0: the ratio-weighted KL is not a term of the "
                          "fused loss; set use_bias_correction_kl=False (the plain k3 KL, TRL's earlier default)")
        if self.delta is not None and self.loss_type != "cispo" and self.delta <= 1.0 + self.eps_high:
            refuse.append(f"delta={self.delta} <= 1 + epsilon_high: the fused loss's dual clip equals TRL's "
                          f"two-sided clipping only for delta > 1 + epsilon_high")
        if self.use_vllm and self.vllm_importance_sampling_correction and self.beta != 0.0:
            refuse.append("beta != 0 with vllm_importance_sampling_correction: TRL weights only the policy term by "
                          "the importance ratio, the fused loss weights the whole token loss")
        if refuse:
            raise ValueError("RLADConfig: " + "; ".join(refuse))
        for name in ("kd_beta", "kd_beta_min", "kd_beta_decay"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"RLADConfig: {name} must be >= 0, got {getattr(self, name)}")
        self.policy_config(0)  # validates alpha, clamps, thresholds and estimator now, not at the first step

    @property
    def eps_high(self) -> float:
        """The upper clip epsilon: ``epsilon_high``, or ``epsilon`` when unset (TRL's rule)."""
        return self.epsilon_high if self.epsilon_high is not None else self.epsilon

    def kd_coef(self, step: int) -> float:
        """KDRL's KD coefficient at optimizer step ``step``: linearly annealed to its floor."""
        return max(self.kd_beta - self.kd_beta_decay * step, self.kd_beta_min)

    def policy_config(self, step: int) -> PolicyLossConfig:
        """The fused loss's options at optimizer step ``step``, with TRL's clip settings (under
        ``loss_type="cispo"`` TRL's ``epsilon_high`` is CISPO's absolute cap and ``delta`` is unused)."""
        trrd, kdrl = self.distillation == "trrd", self.distillation == "kdrl"
        cispo = self.loss_type == "cispo"
        extra = dict(objective="cispo", cispo_max=self.eps_high) if cispo else dict(eps_high=self.eps_high)
        return PolicyLossConfig(
            alpha=self.alpha if trrd else 1.0, eps_low=self.epsilon, **extra,
            ratio_level=self.importance_sampling_level,
            entropy_coef=self.entropy_coef, entropy_aggregation="token_mean",
            teacher_clamp=self.teacher_clamp, teacher_clamp_grad=self.teacher_clamp_grad,
            teacher_align_threshold=self.teacher_align_threshold if trrd else None,
            teacher_adv_threshold=self.teacher_adv_threshold if trrd else None,
            dual_clip=None if cispo else self.delta, mixture=self.mixture,
            kd_estimator=self.kd_estimator if kdrl else None, kd_coef=self.kd_coef(step) if kdrl else 0.0,
            ref_kl_coef=self.beta, compute_entropy=True)


def _tokenizer_of(processing_class):
    """The tokenizer of a processing class (a multimodal processor carries one as ``.tokenizer``)."""
    return getattr(processing_class, "tokenizer", None) or processing_class


def _check_teacher_path(spec: str, *, need_tokenizer: bool) -> None:
    """A teacher named by a path must be a model folder (``config.json``) with its tokenizer's files
    (unless ``teacher_processing_class`` is given), or a GGUF (a ``.gguf`` file or a folder holding
    one, its tokenizer in the file): a one-line ValueError naming ``teacher_model`` otherwise, before
    anything loads. A name that is no local path but looks like a Hugging Face Hub id is left to
    ``from_pretrained`` (``_load_or_explain``)."""
    check_model_path(spec, "RLADTrainer: teacher_model")
    local = Path(spec)
    if local.is_dir() and need_tokenizer and not carries_tokenizer(spec):
        raise ValueError(f"RLADTrainer: teacher_model={spec!r}: the folder has no tokenizer files "
                         f"({', '.join(TOKENIZER_FILES)}); save the teacher's tokenizer there, or pass "
                         f"teacher_processing_class=")


def _load_or_explain(spec: str, what: str, load, **kw):
    """``load(spec, **kw)``; Hugging Face's error (a hub id that cannot be reached, files it cannot
    read) as a one-line ValueError naming ``teacher_model``."""
    try:
        return load(spec, **kw)
    except (OSError, ValueError) as e:
        where = "" if Path(spec).is_dir() else " (no such local folder, and not loadable as a Hugging Face Hub id)"
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise ValueError(f"RLADTrainer: teacher_model={spec!r}: cannot load its {what}{where}: {first}") from None


class RLADTrainer(GRPOTrainer):
    """TRL's ``GRPOTrainer`` with RLAD's teacher-anchored ratio (or KDRL), through the fused loss.

    Takes ``GRPOTrainer``'s arguments plus ``teacher_model`` (an id/path or a loaded causal LM;
    default ``args.teacher_model``) and ``teacher_processing_class`` (default: loaded with the
    teacher when it is an id/path). The teacher must tokenize exactly as the student does (same
    ids for every token, same special tokens); a mismatch is refused before training starts. A
    teacher named by a path is checked before anything loads (a model folder, with its tokenizer
    unless ``teacher_processing_class`` is given), and its tokenizer is loaded then too.
    """

    _tag_names = ["trl", "grpo", "rlad"]

    def __init__(self, model, reward_funcs=None, args: RLADConfig | None = None, *, teacher_model=None,
                 teacher_processing_class=None, **kwargs):
        if args is None:
            raise ValueError("RLADTrainer needs args=RLADConfig(...) (the teacher and the RLAD options)")
        if not isinstance(args, RLADConfig):
            raise TypeError(f"RLADTrainer needs an RLADConfig, got {type(args).__name__}")
        teacher_model = teacher_model if teacher_model is not None else args.teacher_model
        if args.distillation != "none" and teacher_model is None:
            raise ValueError(f"distillation={args.distillation!r} needs a teacher: set RLADConfig.teacher_model or "
                             f"pass teacher_model= (or use distillation='none')")
        if args.distillation != "none" and isinstance(teacher_model, str):  # before anything loads
            _check_teacher_path(teacher_model, need_tokenizer=teacher_processing_class is None)
            if teacher_processing_class is None and (src := gguf_source(teacher_model)) is not None:
                teacher_processing_class = _load_or_explain(teacher_model, "tokenizer", lambda _: gguf_tokenizer(src))
            elif teacher_processing_class is None:
                teacher_processing_class = _load_or_explain(
                    teacher_model, "tokenizer", AutoTokenizer.from_pretrained, trust_remote_code=args.trust_remote_code)
        super().__init__(model, reward_funcs, args=args, **kwargs)
        ds = getattr(self.accelerator.state, "deepspeed_plugin", None) if self.is_deepspeed_enabled else None
        if ds is not None and ds.zero_stage == 3:
            raise ValueError("RLADTrainer: DeepSpeed ZeRO-3 gathers the lm_head weight only inside the lm_head's own "
                             "forward, which the fused loss bypasses; use ZeRO-1/2 or FSDP")
        self._pending_rewards = None
        student = self.model.get_base_model() if is_peft_model(self.model) else self.model
        apply_rlad_kernels(student, impl=args.rlad_impl)
        self._vocab = student.get_output_embeddings().weight.shape[0]
        self.teacher = None
        if args.distillation != "none":
            self.teacher = self._load_teacher(student, teacher_model, teacher_processing_class)

    # ------------------------------------------------------------------ the teacher
    def _load_teacher(self, student, spec, teacher_processing_class):
        args = self.args
        if isinstance(spec, str):
            kw = dict(args.teacher_model_init_kwargs or {})
            kw.setdefault("dtype", self.model.dtype)
            teacher_tok = teacher_processing_class  # loaded in __init__ when not given
            if (src := gguf_source(spec)) is not None:  # dequantized to the student's dtype
                teacher = gguf_model(src, kw.pop("dtype"), role=f"RLADTrainer: teacher_model={spec!r}",
                                     trust_remote_code=args.trust_remote_code, **kw)
            else:
                teacher = _load_or_explain(spec, "model", AutoModelForCausalLM.from_pretrained,
                                           trust_remote_code=args.trust_remote_code, **kw)
        elif isinstance(spec, PreTrainedModel):
            teacher, teacher_tok = spec, teacher_processing_class
            if teacher_tok is None:
                name = getattr(teacher.config, "_name_or_path", "")
                try:  # a GGUF-loaded teacher's name is the folder holding its file
                    src = gguf_source(name) if name else None
                    teacher_tok = (gguf_tokenizer(src) if src is not None
                                   else AutoTokenizer.from_pretrained(name) if name else None)
                except (OSError, ValueError, KeyError):
                    teacher_tok = None
                if teacher_tok is None:
                    raise ValueError("RLADTrainer: pass teacher_processing_class= with a teacher model instance (its "
                                     "tokenizer must be checked against the student's)")
        else:
            raise TypeError(f"teacher_model must be a model id/path or a PreTrainedModel, got {type(spec).__name__}")
        # the same ids on both sides: the heads' sizes and the tokenizers (rlad train's own check)
        check_vocab(student, teacher, _tokenizer_of(self.processing_class), _tokenizer_of(teacher_tok))
        teacher.eval()
        teacher.requires_grad_(False)
        apply_rlad_kernels(teacher, impl=args.rlad_impl)
        if self.is_deepspeed_enabled:
            return prepare_deepspeed(teacher, self.accelerator)
        if self.is_fsdp_enabled:
            return prepare_fsdp(teacher, self.accelerator)
        return self.accelerator.prepare_model(teacher, evaluation_mode=True)

    @torch.no_grad()
    def _score(self, model, inputs) -> torch.Tensor:
        """Per-token log-probs [B, T] of the completion tokens under ``model`` (fused, no logits),
        at the sampling temperature, in chunks of ``per_device_train_batch_size``."""
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        K = inputs["completion_ids"].size(1)
        labels = ids.masked_fill(attn == 0, IGNORE)
        chunk = self.args.per_device_train_batch_size
        out = []
        for i in range(0, ids.size(0), chunk):
            sl = slice(i, i + chunk)
            with self.accelerator.autocast():
                res = model(ids[sl], attention_mask=attn[sl], logprobs_of=labels[sl], labels_to_keep=K,
                            temperature=self.temperature, vocab_size=self._vocab)
            out.append(res.logprobs.float())
        return torch.cat(out)

    # ------------------------------------------------------------------ TRL hooks
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._pending_rewards = rewards  # all processes' rewards per function, for KDRL's reward mask
        return rewards

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        if out.get("old_per_token_logps") is None:  # the fused loss takes lp_old as an input; TRL's own pass
            with disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
                out["old_per_token_logps"] = self._score(self.model, out)
        if self.teacher is not None:
            out["teacher_per_token_logps"] = self._score(self.teacher, out)
        if self.args.distillation == "kdrl":
            n = out["completion_ids"].size(0)
            rewards = (self._pending_rewards * self.reward_weights.to(self._pending_rewards.device)).nansum(dim=1)
            rewards = rewards[self.accelerator.process_index * n:(self.accelerator.process_index + 1) * n]
            thr = self.args.kd_reward_threshold
            keep_kd = torch.ones_like(rewards) if thr is None else (~(rewards >= thr)).float()
            out["kd_weights"] = keep_kd.to(out["completion_ids"].device)
        self._pending_rewards = None
        return out

    def _compute_loss(self, model, inputs):
        args = self.args
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        completion_mask = inputs["completion_mask"]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        B, K = completion_ids.shape
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        targets = completion_ids.masked_fill(mask == 0, IGNORE)
        labels = torch.cat([prompt_ids.new_full(prompt_ids.shape, IGNORE), targets], dim=1)
        A = inputs["advantages"]
        A = A[:, None].expand(B, K) if A.dim() == 1 else A.expand(B, K)
        mode = "train" if self.model.training else "eval"
        accum = self.current_gradient_accumulation_steps if mode == "train" else 1

        # TRL's aggregation, as token weights and a normalizer of the fused loss's weighted sum
        weights = None
        if self.loss_type == "grpo":  # mean over sequences of each sequence's token mean
            weights = (1.0 / mask.sum(-1, keepdim=True).clamp(min=1.0)).float().expand(B, K)
            normalizer = float(B * accum)
        elif self.loss_type == "bnpo":
            normalizer = mask.sum().clamp(min=1.0).float() * accum
        elif self.loss_type == "dr_grpo":
            normalizer = float(B * args.max_completion_length * accum)
        else:  # dapo, cispo: num_items_in_batch spans the generation batch; rescaled to one accumulation window
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0).float() / self.accelerator.num_processes
            if mode == "train":
                normalizer = normalizer * accum / args.steps_per_generation
        if self.use_vllm and self.vllm_importance_sampling_correction:
            isr = inputs["importance_sampling_ratio"].float().expand(B, K)
            weights = isr if weights is None else weights * isr

        cfg = args.policy_config(self.state.global_step)
        loss_kw = dict(advantages=A.float(), old_logp=inputs["old_per_token_logps"].float(), config=cfg,
                       normalizer=normalizer, token_weights=weights)
        if self.teacher is not None:
            loss_kw["teacher_logp"] = inputs["teacher_per_token_logps"]
        if cfg.kd_estimator is not None:
            loss_kw["kd_weights"] = inputs["kd_weights"][:, None].expand(B, K).float()
        if self.beta != 0.0:
            loss_kw["ref_logp"] = inputs["ref_per_token_logps"].float()
        if cfg.entropy_coef != 0.0:  # TRL's bonus: a token mean over the micro-batch, scaled for accumulation
            loss_kw["entropy_normalizer"] = mask.sum().clamp(min=1.0).float() * accum
        with self.accelerator.autocast():
            out = model(input_ids, attention_mask=attention_mask, logprobs_of=labels, labels_to_keep=K,
                        temperature=self.temperature, policy_loss=loss_kw)
        self._log_loss_metrics(mode, out.metrics, A, mask, cfg)
        return out.loss

    def _log_loss_metrics(self, mode: str, m: dict, A: torch.Tensor, mask: torch.Tensor, cfg: PolicyLossConfig):
        """The fused loss's metrics as global token means (sums and counts reduced over processes, one
        transfer), under TRL's names where the meaning is TRL's and ``rlad/`` otherwise. At sequence
        level TRL's clip ratios count sequences; the fused loss's count tokens, so they are logged
        as ``rlad/clip_frac*`` there."""
        valid = mask.bool()
        n = m["num_tokens"]
        n_pos, n_neg = ((A > 0) & valid).sum().float(), ((A < 0) & valid).sum().float()
        sums = {"entropy": (m["entropy_mean"] * n, n), "rlad/ratio_mean": (m["ratio_mean"] * n, n)}
        high, low, region = m["clip_frac_pos"] * n_pos, m["clip_frac_neg"] * n_neg, m["clip_frac"] * n
        if cfg.cispo:  # TRL: weights capped on A > 0 tokens; the fused loss: capped whatever the sign
            sums["cispo_clip_ratio"] = (high, n)
            sums["rlad/cispo_cap_frac"] = (m["cispo_cap_frac"] * n, n)
        elif cfg.sequence_level:
            sums.update({"rlad/clip_frac_pos": (high, n), "rlad/clip_frac_neg": (low, n),
                         "rlad/clip_frac": (region, n)})
        else:
            sums.update({"clip_ratio/high_mean": (high, n), "clip_ratio/low_mean": (low, n),
                         "clip_ratio/region_mean": (region, n)})
        if "ref_kl_mean" in m:
            sums["kl"] = (m["ref_kl_mean"] * n, n)
        for name in ("teacher_gap", "teacher_clamp_frac", "teacher_clamp_hi", "teacher_clamp_lo",
                     "teacher_gate_frac", "kd_mean"):
            if name in m:
                sums[f"rlad/{name}"] = (m[name] * n, n)
        if "dual_clip_frac" in m:
            sums["rlad/dual_clip_frac"] = (m["dual_clip_frac"] * n_neg, n_neg)
        names = sorted(sums)  # the same order on every process
        local = torch.stack([torch.stack([sums[k][0].float(), sums[k][1].float()]) for k in names])
        total = self.accelerator.reduce(local, reduction="sum").tolist()
        for k, (s, c) in zip(names, total, strict=True):
            self._metrics[mode][k].append(s / max(c, 1.0))
        if cfg.kd_estimator is not None and mode == "train":
            self._metrics[mode]["rlad/kd_coef"].append(cfg.kd_coef)
