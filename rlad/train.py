"""The rlad training loop: RL-aware distillation (RLAD / TRRD) and its baselines, top to bottom.

Each step:
  1. draw ``prompts_per_step`` problems from the task;
  2. sample ``group_size`` responses per prompt from the student (Hugging Face ``generate``) and
     score them with the task's rule-based reward (sft: draw the teacher's correct solutions);
     a response cut off at ``max_new_tokens`` before its EOS is truncated (``drop_truncated``:
     out of the loss and its normalizer, its reward still in its group);
  3. per-token log-probs of the sampled tokens, as the algorithm needs them, under the old
     student, the teacher and the reference model, with the fused op (no ``[tokens x vocab]`` logits);
  4. advantages: per group ``A_i = (R_i - mean_G R) / (std_G R + 1e-6)`` (no std: Dr. GRPO), or
     per token for opd sampled;
  5. ``ppo_epochs`` passes of ``mini_batches`` optimizer steps with the algorithm's loss,
     gradient accumulation over micro-batches with one global normalizer; metrics stay on the
     device until the step's log line;
  6. log, evaluate, checkpoint (atomically, verified on resume).

Before any of it, ``train`` checks every setting, the output folder, the models, the data and the
reward (``rlad/preflight.py``), then locks the output folder for the run (``rlad/rundir.py``).

Algorithms (``--algo``; ``rlad/algorithms.py`` has one row each: what it scores, its loss, its
advantages; ``collect`` and ``micro_loss`` read the row):
  rlad  TRRD: the PPO ratio anchored to pi_old^alpha * pi_teacher^(1 - alpha)
  grpo  plain GRPO / PPO-clip
  kdrl  GRPO + beta_t * KD(student || teacher), k1/k2/k3 on sampled tokens or the exact
        full-vocabulary reverse KL; beta linearly annealed; no KD on rewarded responses
  opd   on-policy distillation: full-vocabulary JSD_beta / reverse KL on student samples, or
        the sampled-token form with per-token advantage -(lp - lp_teacher)
  sft   offline distillation: NLL on teacher solutions, kept only when correct

Scale-out: ``torchrun --nproc-per-node N -m rlad train ...`` runs the same loop on N ranks
(``rlad/distributed.py``: FSDP2-sharded student, teacher and reference; each rank samples its
share of the step's prompts; the normalizer and the metrics are all-reduced; sharded DCP
checkpoints). Without torchrun it is one process, exactly as before.

Simplifications: the teacher and reference run in the trainer's processes, sampling and training
use the same weights (no separate inference engine), and the old policy's log-probs are
recomputed by the trainer.

    rlad train --algo rlad --teacher preset:tiny-teacher --task arithmetic --steps 50
    rlad train --config run.yaml --lr 5e-5          # YAML, then flag overrides
    rlad train --config run.yaml --resume true      # continue after a crash
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch

from rlad_kernels import LMHead, TokenInputs, linear_divergence, linear_logprobs, linear_policy_loss

from . import distributed as D
from . import signals
from .algorithms import DIVERGENCE, GROUP, NLL, POLICY, ROLLOUTS, TEACHER_LOG_RATIO, TEACHER_SOLUTIONS
from .batching import micro_batches, same_count
from .checkpoint import (
    Checkpoint,
    latest_checkpoint,
    load_latest,
    load_plain_optimizer,
    load_sharded,
    read_checkpoint,
    rng_state,
    save_checkpoint,
    save_sharded_checkpoint,
    set_rng_state,
)
from .config import TrainConfig
from .evaluate import eval_key_order, evaluate
from .models import check_vocab, decoder_hidden, load_model
from .preflight import Setup, preflight
from .report import MetricsLog, log_line, markdown_table, plot
from .rollout import Rollout, from_pairs, generate, group_advantages, score
from .rundir import RunDirError, RunLock, prepare, write_atomic
from .runtime import autocast_for, frozen, progress


def lr_lambda(cfg: TrainConfig, total: int):
    def f(i: int) -> float:
        if cfg.warmup_steps and i < cfg.warmup_steps:
            return (i + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        frac = min(1.0, (i - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
        return 1.0 - frac if cfg.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))
    return f


# ----------------------------------------------------------------------------- rollouts
def collect(cfg: TrainConfig, student, teacher, ref, tok, task, examples, sft_pool, seeds=None) -> Rollout:
    """The step's batch, as the algorithm's row says: sampled responses with rewards, the per-token
    log-probs it scores, its advantages and KD weights; or teacher solutions drawn from the pool.
    ``seeds``: one sampling seed per example (see ``rollout.generate``); None: torch's global stream.
    Distributed: ``examples`` are this rank's; sft draws the global picks and keeps this rank's share."""
    alg = cfg.algorithm
    if alg.batch == TEACHER_SOLUTIONS:  # offline distillation: the teacher's correct solutions, drawn from the pool
        picks = [sft_pool[i] for i in torch.randint(len(sft_pool), (cfg.prompts_per_step,)).tolist()]
        picks = picks[D.my_slice(len(picks))]
        return from_pairs(tok, [p[0] for p in picks], [p[1] for p in picks], None, template=cfg.prompt_template,
                          device=next(student.parameters()).device)
    roll = generate(student, tok, examples, task, group_size=cfg.group_size, temperature=cfg.temperature,
                    top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, template=cfg.prompt_template, seeds=seeds)
    if cfg.drop_truncated:  # DAPO's overlong filtering: out of the loss, their rewards still in the groups
        roll.keep = ~roll.truncated
    kw = dict(temperature=cfg.temperature, micro_batch=cfg.micro_batch_size, micro_batch_tokens=cfg.micro_batch_tokens)
    if alg.scores_old:
        roll.old_logp = score(student, roll, **kw)
    if alg.scores_teacher:  # normalized over the student's V columns of a possibly padded teacher head
        roll.teacher_logp = score(teacher, roll, head_rows=LMHead.of(student).weight.shape[0], **kw)
    if ref is not None:
        roll.ref_logp = score(ref, roll, **kw)
    if alg.advantages == GROUP:
        roll.advantages = group_advantages(roll.rewards, cfg.group_size, cfg.adv_std_norm)
    elif alg.advantages == TEACHER_LOG_RATIO:  # the sampled reverse KL, per token, as the advantage
        roll.token_advantages = torch.where(roll.response_mask, roll.teacher_logp - roll.old_logp, 0.0)
    if alg.kd:  # reward-guided KD: no KD term on the responses that got reward 1
        keep = (roll.rewards < 1.0) if cfg.kd_reward_mask else torch.ones_like(roll.rewards, dtype=torch.bool)
        roll.kd_weights = keep.float()[:, None].expand(roll.targets.shape).contiguous()
    return roll


def build_sft_pool(cfg, teacher, tok, task, levels, seed: int):
    """Offline distillation data: the teacher samples solutions; only correct ones are kept (with
    ``drop_truncated``, only those that also ended within ``max_new_tokens``)."""
    rng = random.Random(seed)
    examples = task.sample(rng, cfg.sft_prompts, levels)
    pool, cut = [], 0
    bar = progress(cfg.quiet, total=len(examples), desc="teacher solutions", leave=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i in range(0, len(examples), cfg.prompts_per_step):
            chunk = examples[i:i + cfg.prompts_per_step]
            roll = generate(teacher, tok, chunk, task, group_size=cfg.group_size, temperature=cfg.temperature,
                            top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, template=cfg.prompt_template)
            for j, text in enumerate(roll.texts):
                if roll.rewards[j] < 1.0:
                    continue
                if cfg.drop_truncated and roll.truncated[j]:
                    cut += 1
                else:
                    pool.append((chunk[j // roll.group_size], text))
            bar.update(len(chunk))
    bar.close()
    if not pool:
        why = (f" (drop_truncated left out its {cut} correct solution(s) cut off at max_new_tokens="
               f"{cfg.max_new_tokens})" if cut else "")
        raise ValueError(f"sft: the teacher solved none of the prompts{why}, so there is nothing to distill; "
                         f"check the teacher, the task and max_new_tokens")
    if cut:
        print(f"sft: drop_truncated left {cut} correct but truncated teacher solution(s) out of the pool "
              f"({len(pool)} kept)", flush=True)
    return pool


# ----------------------------------------------------------------------------- the loss
def micro_loss(cfg: TrainConfig, student, teacher, mb: Rollout, normalizer, token_weights, step: int):
    """The algorithm's loss on one micro-batch, already divided by the global normalizer, and its
    metrics as detached scalar tensors (no host sync). A sharded student computes it inside its
    FSDP2 root's forward, where its lm_head weight is gathered (``distributed.forward_in``)."""
    loss, metrics = D.forward_in(student, _micro_loss, cfg, teacher, mb, normalizer, token_weights, step)
    if D.is_sharded(student):  # FSDP2 averages the gradients over ranks; the global loss is their sum
        loss = loss * D.state().world
    return loss, metrics


def _micro_loss(student, cfg: TrainConfig, teacher, mb: Rollout, normalizer, token_weights, step: int):
    alg = cfg.algorithm
    h = decoder_hidden(student, mb.input_ids, mb.attention_mask, mb.position_ids)[:, :-1]
    head = LMHead.of(student)  # its weight, bias, logit scale and final-logit soft cap
    targets = mb.loss_targets  # the response tokens of the rows kept in the loss (drop_truncated)
    tokens = mb.loss_mask.sum().clamp_min(1)

    def teacher_hidden():
        def run(t):  # a sharded teacher's root stays gathered after its forward (distributed.shard)
            with torch.no_grad():
                ht = decoder_hidden(t, mb.input_ids, mb.attention_mask, mb.position_ids)[:, :-1]
            return ht.detach(), LMHead.of(t).detach()
        return D.forward_in(teacher, run)

    if alg.loss == NLL:
        lp = linear_logprobs(h, head, targets)
        w = token_weights if token_weights is not None else 1.0
        loss = -(lp * w).sum() / normalizer
        return loss, {"nll": loss.detach() * normalizer / tokens}
    if alg.loss == DIVERGENCE:  # beta is JSD's (the other kinds ignore it)
        ht, teacher_head = teacher_hidden()
        loss = linear_divergence(h, head, ht, teacher_head, kind=alg.divergence, beta=cfg.opd_beta,
                                 temperature=cfg.temperature, mask=mb.loss_mask, token_weights=token_weights,
                                 normalizer=normalizer, reduction="mean")
        return loss, {"divergence": loss.detach() * normalizer / tokens}
    assert alg.loss == POLICY, alg
    pcfg = cfg.policy_config(step)
    kw = {}
    if pcfg.kd_estimator == "full":  # the exact reverse KL needs the teacher's hidden states and head
        kw.update(zip(("teacher_hidden", "teacher_head"), teacher_hidden(), strict=True))
    inputs = TokenInputs(advantages=mb.token_advantage(), old_logp=mb.old_logp,
                         teacher_logp=mb.teacher_logp if alg.teacher_in_policy_loss else None, ref_logp=mb.ref_logp,
                         token_weights=token_weights, kd_weights=mb.kd_weights)
    out = linear_policy_loss(h, head, targets, inputs, normalizer=normalizer, temperature=cfg.temperature,
                             config=pcfg, **kw)
    return out.loss, {k: v.detach() for k, v in out.metrics.items()}


def normalizer_for(cfg: TrainConfig, roll: Rollout, idx: torch.Tensor):
    """(normalizer, token weights [B, L-1] | None) of one optimizer step over rows ``idx``:
    global over all of its micro-batches (and ranks), so accumulation gives the full batch's gradient. Rows
    left out of the loss (``roll.keep``, drop_truncated) count neither their tokens nor themselves."""
    mask = roll.loss_mask
    if cfg.aggregation == "token_mean":  # distributed: summed over ranks (each holds its share of the rows)
        return D.all_sum(mask[idx].sum()).clamp_min(1).float(), None
    rows = roll.keep[idx].sum() if roll.keep is not None else torch.tensor(len(idx), device=mask.device)
    count = D.all_sum(rows).float().clamp_min(1)
    if cfg.aggregation == "seq_mean":  # every sequence weighs 1/|o_i|; the weights cover all rows
        per_seq = 1.0 / mask.sum(-1, keepdim=True).clamp_min(1).float()
        return count, per_seq.expand(roll.targets.shape)
    return count * cfg.max_new_tokens, None


def update(cfg: TrainConfig, student, teacher, roll: Rollout, optimizer, scheduler, step: int, amp,
           state) -> dict[str, list[torch.Tensor]]:
    """``ppo_epochs`` x ``mini_batches`` optimizer steps on the batch. A non-finite loss or
    gradient skips the optimizer step (counted in ``state['nan_skips']``); a mini-batch with no
    loss token (all of its rows dropped) takes no optimizer step. Returns the metrics'
    values on device: one per micro-batch, and ``loss`` / ``grad_norm`` one per optimizer step."""
    params = [p for p in student.parameters() if p.requires_grad]
    stats = defaultdict(list)
    for epoch in range(cfg.ppo_epochs):
        gen = _perm_generator(cfg, step, epoch, roll)
        perm = torch.randperm(len(roll), device=roll.input_ids.device, generator=gen)
        for mini in perm.tensor_split(cfg.mini_batches):  # exactly mini_batches, sizes differing by at most one
            norm, tw = normalizer_for(cfg, roll, mini)
            optimizer.zero_grad(set_to_none=True)
            total = torch.zeros((), device=norm.device)
            parts = list(micro_batches(roll, mini, tw, size=cfg.micro_batch_size, tokens=cfg.micro_batch_tokens))
            for mb, mtw, real in same_count(parts):  # under torchrun, as many on every rank (FSDP2's gathers)
                with amp():
                    loss, m = micro_loss(cfg, student, teacher, mb, norm, mtw, step)
                if not real:  # a padding micro-batch: in the collectives, not in the gradient
                    (loss * 0.0).backward()
                    continue
                loss.backward()
                total = total + loss.detach()
                tokens = mb.loss_mask.sum()  # the micro-batch's metrics are means over its loss tokens
                for k, v in m.items():
                    stats[k].append((v, tokens))
            gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            if hasattr(gnorm, "full_tensor"):  # FSDP2: a DTensor, already the norm over every rank's shard
                gnorm = gnorm.full_tensor()
            # the loss over every rank (each divided by the same global normalizer; see micro_loss for the world
            # factor) and the mini-batch's loss tokens; one process: the two as they are
            total, tokens_all = D.all_sum(torch.stack([total / D.state().world,
                                                       roll.loss_mask[mini].sum().to(total.dtype)]))
            # the one host sync of an optimizer step: whether to skip it
            finite, has_tokens = torch.stack([torch.isfinite(total) & torch.isfinite(gnorm),
                                              tokens_all > 0]).tolist()
            if not finite:
                optimizer.zero_grad(set_to_none=True)
                state["nan_skips"] += 1
                print(f"step {step}: non-finite loss ({float(total):.4g}) or gradient norm ({float(gnorm):.4g}); "
                      f"optimizer step skipped ({state['nan_skips']} so far)", flush=True)
                continue
            if has_tokens:
                optimizer.step()
            # else every row of the mini-batch was left out of the loss (drop_truncated): no optimizer
            # step, so AdamW's moments and weight decay do not move on a zero gradient; the schedule
            # still advances, so it reaches its end
            with warnings.catch_warnings():  # torch warns when the first scheduler step has no optimizer step
                warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
                scheduler.step()
            stats["loss"].append((total, 1))
            stats["grad_norm"].append((gnorm, 1))
    return dict(stats)


def host_metrics(stats: dict[str, list[tuple]]) -> dict[str, float]:
    """Each metric's weighted mean over its ``(value, weight)`` pairs, with one device-to-host
    transfer for them all. The weights say what a value is a mean over: a micro-batch's token
    metrics weigh its valid tokens (so the step's value is the mean over all of the step's
    tokens, whatever the micro-batch sizes), an optimizer step's loss and gradient norm weigh 1.
    Distributed: each metric's ``sum(v * w)`` and ``sum(w)`` are summed over ranks (one all-reduce;
    every rank holds the same metric names, with the same micro-batch and optimizer-step counts),
    so the values are the global batch's. A metric whose weights are all 0 (every token dropped)
    is left out."""
    stats = {k: v for k, v in stats.items() if v}
    if not stats:
        return {}
    device = next(x.device for values in stats.values() for pair in values for x in pair if torch.is_tensor(x))

    def f64(x):
        return x.detach().to(torch.float64) if torch.is_tensor(x) else torch.tensor(float(x), dtype=torch.float64,
                                                                                    device=device)

    sums = torch.stack([sum(f64(v) * f64(w) for v, w in values) for values in stats.values()])
    weights = torch.stack([sum(f64(w) for _, w in values) for values in stats.values()])
    s, w = D.all_sum(torch.stack([sums, weights])).tolist()  # one transfer
    return {k: s[j] / w[j] for j, k in enumerate(stats) if w[j] > 0}


def _perm_generator(cfg: TrainConfig, step: int, epoch: int, roll: Rollout) -> torch.Generator | None:
    """Distributed: the mini-batch permutation's own stream, seeded from (seed, step, epoch) (the
    same on every rank, not drawn from torch's global stream); single process: None (the global one)."""
    if not D.state().enabled:
        return None
    return torch.Generator(device=roll.input_ids.device).manual_seed(D.row_seed(cfg.seed, step, epoch, 7))


# ----------------------------------------------------------------------------- the run
def train(cfg: TrainConfig) -> dict:
    """Run ``cfg`` in ``cfg.out_dir`` and return its summary. Every setting, the output folder,
    the model specs, the task's data, the reward and the context length are checked before any
    file is written or any model loaded; then the folder is locked for the run (one trainer at a
    time), a crash's temporary files are removed, an earlier run there is refused unless resumed
    (``resume``) or deleted (``overwrite``), and a resume starts from the latest usable checkpoint
    whose settings match (see ``resume_point``)."""
    if D.launched():
        D.check_launch(cfg.prompts_per_step, cfg.group_size if cfg.algorithm.batch == ROLLOUTS else 1,
                       cfg.mini_batches)  # before any work: the batch divides among the ranks
    setup = preflight(cfg)
    cfg = setup.cfg  # with max_new_tokens resolved from the task when it was not set
    with signals.graceful_stop():  # SIGTERM / SIGINT: the lock released, the last line says where to resume
        signals.own_writes()  # a process forked inside the run (by a reward) never writes its files
        try:
            if not D.launched():  # one process
                with RunLock(cfg.out_dir):
                    prepare(cfg.out_dir, resume=cfg.resume, overwrite=cfg.overwrite)
                    start = resume_point(cfg) if cfg.resume else None
                    return run(cfg, setup, start)
            return train_distributed(cfg, setup)
        except signals.Stopped as stop:
            stop.where = resume_hint(cfg)
            raise


def resume_hint(cfg: TrainConfig) -> str:
    """Where a stopped run can continue from, in a line."""
    last = latest_checkpoint(cfg.out_dir)
    if last is None:
        return f"no checkpoint in {cfg.out_dir} yet: --resume true starts it again from step 0"
    return f"the last checkpoint is {last}: continue with --resume true (same settings, out_dir {cfg.out_dir})"


def train_distributed(cfg: TrainConfig, setup: Setup) -> dict:
    """``train`` on every rank of a torchrun launch: join the process group; rank 0 locks and
    prepares the folder and picks the checkpoint to resume from (its decision, or its error, is
    given to every rank); every rank then runs the loop on its share of each batch."""
    import dataclasses

    dist, device = D.init(setup.device, cfg.dist_timeout)
    lock = RunLock(cfg.out_dir) if dist.main else None
    try:
        print(f"distributed: {dist.world} ranks ({'nccl' if device.type == 'cuda' else 'gloo'}), "
              f"{cfg.prompts_per_step // dist.world} prompts per rank per step", flush=True)
        held = {}

        def begin():
            lock.acquire()
            prepare(cfg.out_dir, resume=cfg.resume, overwrite=cfg.overwrite)
            held["start"] = resume_point(cfg) if cfg.resume else None
            return str(held["start"].path) if held["start"] is not None else None

        path = D.on_main(begin)
        start = held.get("start") if dist.main else (read_checkpoint(path, check=False) if path else None)
        summary = run(cfg, dataclasses.replace(setup, device=device), start)
        D.barrier()  # no rank leaves (and closes its connections) while another still works
        return summary
    finally:
        if lock is not None:
            lock.release()
        D.close()


def resume_point(cfg: TrainConfig) -> Checkpoint | None:
    """The checkpoint to continue from: the newest usable one (damaged ones are skipped with a
    warning), read into memory. Its settings must match ``cfg`` except for the safe ones
    (``RESUME_SAFE``) unless ``force_resume``; ``steps`` may not end before it. None when the run
    has no checkpoint yet (it starts from step 0, if its config.json matches)."""
    out = Path(cfg.out_dir)

    def check(saved: dict, where: Path) -> None:
        changes = cfg.resume_changes(saved)
        if changes and not cfg.force_resume:
            raise RunDirError(f"resume: settings differ from those {where} was written with, in ways that change the "
                              f"run: {'; '.join(changes)}; resume with the same settings, or add --force-resume "
                              f"true to continue with the new ones, or start a new run (--overwrite true or another "
                              f"--out-dir)")
        if changes:
            print(f"warning: resume: continuing with changed settings (force_resume): {'; '.join(changes)}",
                  flush=True)

    ckpt = load_latest(out, check)
    if ckpt is None:
        if (out / "config.json").is_file():
            try:
                saved = json.loads((out / "config.json").read_text())
            except (OSError, ValueError):
                saved = None
            if isinstance(saved, dict):
                check(saved, out / "config.json")
        print(f"resume: no checkpoint in {out / 'checkpoints'}; starting from scratch", flush=True)
        return None
    if ckpt.step > cfg.steps:
        raise RunDirError(f"resume: config: steps={cfg.steps} ends before the checkpoint {ckpt.path} (step "
                          f"{ckpt.step}); set steps >= {ckpt.step}")
    return ckpt


def eval_table(first: dict | None, final: dict) -> str:
    """Markdown: each metric (all levels, then per level) at the start and the end, with standard
    errors, and the eval set's size."""
    from .evaluate import metric_names, with_se

    levels = sorted(int(k[len("n/L"):]) for k in final if k.startswith("n/L"))
    rows = []
    for lv in [None, *levels]:
        suffix = "" if lv is None else f"/L{lv}"
        for name in metric_names(final):
            rows.append((name + suffix, int(final.get("n" + suffix, 0)), with_se(first, name, lv) if first else "n/a",
                         with_se(final, name, lv)))
    return markdown_table(["metric", "prompts", "start", "end"], rows)


def run(cfg: TrainConfig, setup: Setup, start: Checkpoint | None) -> dict:
    """The run itself, in its locked and prepared folder: from step 0, or from ``start``."""
    out = Path(cfg.out_dir)
    device, tok, task, levels, eval_set = setup.device, setup.tok, setup.task, setup.levels, setup.eval_set
    dist = D.state()
    main = dist.main  # rank 0 writes the metrics, the config, the summary and the plot
    quiet = cfg.quiet or not main
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    amp = autocast_for(cfg.dtype, device)
    torch.manual_seed(cfg.seed)
    data_rng = random.Random(cfg.seed)

    alg = cfg.algorithm
    # trained parameters in float32 (bf16 autocast on GPU); frozen models in bf16 on GPU
    frozen_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    student = load_model(cfg.student, tok, device=device, seed=cfg.seed, dtype=torch.float32, role="student")
    if cfg.gradient_checkpointing:
        student.gradient_checkpointing_enable()
    student.train()
    teacher = None
    if cfg.teacher and alg.needs_teacher:
        teacher = frozen(load_model(cfg.teacher, tok, device=device, seed=cfg.seed + 1, dtype=frozen_dtype,
                                    role="teacher"))
        check_vocab(student, teacher, tok)
    ref = None
    if cfg.ref_kl_coef > 0 and alg.loss == POLICY:  # the reference KL is a term of the policy loss
        ref = frozen(load_model(cfg.ref, tok, device=device, dtype=frozen_dtype, role="ref") if cfg.ref
                     else copy.deepcopy(student).to(frozen_dtype))
        check_vocab(student, ref, tok, role="reference model")
    trained_names = [n for n, p in student.named_parameters() if p.requires_grad]
    if dist.enabled:  # FSDP2: the weights of a single-process checkpoint go in before sharding
        if start is not None and not start.sharded:
            start.load_weights(student)
        for model, trainable in ((student, True), (teacher, False), (ref, False)):
            if model is not None:  # the model keeps its FSDP2 root (distributed.forward_in)
                D.shard(model, device, trainable=trainable)

    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg, cfg.steps * cfg.ppo_epochs * cfg.mini_batches))
    sft_pool = build_sft_pool(cfg, teacher, tok, task, levels, cfg.seed + 7) if alg.batch == TEACHER_SOLUTIONS else None

    log = MetricsLog(out / "metrics.jsonl")
    state = {"step": 0, "nan_skips": 0, "reward_errors": 0}
    if start is not None:
        if start.sharded:  # torch.distributed.checkpoint reshards to this run's ranks (or one process)
            load_sharded(start.path, student, optimizer)
        elif dist.enabled:  # a single-process checkpoint: weights loaded before sharding, the optimizer here
            load_plain_optimizer(student, optimizer, start.trainer["optimizer"], trained_names)
        else:
            start.load_weights(student)
            optimizer.load_state_dict(start.trainer["optimizer"])
        scheduler.load_state_dict(start.trainer["scheduler"])
        set_rng_state(start.trainer["rng"], data_rng)
        state.update(start.trainer["state"])
        saved_world = start.trainer.get("world_size", 1)
        if saved_world != dist.world or bool(start.trainer.get("distributed")) != dist.enabled:
            print(f"note: resuming on {dist.world} rank(s) from a checkpoint written on {saved_world}: the prompts "
                  f"and their sampling seeds continue exactly; float sums (all-reduce order) and, with "
                  f"mini_batches > 1, the mini-batch split follow the new world size"
                  + ("" if dist.enabled == bool(start.trainer.get("distributed")) else
                     "; sampling switches between per-prompt seeds (torchrun) and torch's global stream (one "
                     "process)"), flush=True)
        if main:
            log.rewind(state["step"])
        print(f"resumed from {start.path} at step {state['step']}", flush=True)
    elif main:
        log.reset()
    if main:
        write_atomic(out / "config.json", json.dumps(cfg.to_dict(), indent=2))
    counts_reward_errors = getattr(task, "user_reward", False)  # a module:function reward's failures, scored 0

    def reward_errors() -> int:  # failures so far (reward_errors=zero), the task's new ones moved into state
        if counts_reward_errors:
            state["reward_errors"] += int(D.all_sum(torch.tensor(task.failures)))  # every rank's
            task.failures = 0
        return state["reward_errors"]

    def run_eval(step):  # distributed: every rank evaluates the whole set in step (identical results); rank 0 logs
        bar = progress(quiet, total=len(eval_set), desc="eval", leave=False)
        # its own random stream, so evaluating (or not) never changes the training run
        with amp(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(cfg.seed + 2_000_003)
            res = evaluate(student, tok, setup.held.task, eval_set, template=cfg.prompt_template,
                           max_new_tokens=cfg.max_new_tokens, samples=cfg.eval_samples,
                           temperature=cfg.temperature, top_p=cfg.top_p, progress=bar)
        bar.close()
        if main:
            log.write({"step": step, "eval": True, **{f"eval/{k}": v for k, v in res.items()}})
        return res

    def save(step, last):  # every rank writes its shards; the last checkpoint also gets the full model/
        trainer_state = {"scheduler": scheduler.state_dict(), "rng": rng_state(data_rng), "state": dict(state),
                         "config": cfg.to_dict()}
        if dist.enabled:
            save_sharded_checkpoint(out, step, student, optimizer, tok, {
                **trainer_state, "world_size": dist.world, "distributed": True}, keep=cfg.keep_checkpoints,
                export=last)
        else:
            save_checkpoint(out, step, student, tok, {"optimizer": optimizer.state_dict(), **trainer_state},
                            keep=cfg.keep_checkpoints)

    if state["step"] == 0:
        first = run_eval(0)
        print(f"eval step 0: accuracy {first['accuracy']:.3f}", flush=True)
    bar = progress(quiet, total=cfg.steps, initial=state["step"], desc=f"{cfg.algo} steps")
    for step in range(state["step"], cfg.steps):
        D.fail_hook(step)
        t0 = time.perf_counter()
        student.eval()
        examples, seeds = task.sample(data_rng, cfg.prompts_per_step, levels), None
        if dist.enabled:  # the global batch on every rank, then this rank's share; sampling seeded per prompt
            seeds = [D.row_seed(cfg.seed, step, i) for i in range(len(examples))]
            mine = D.my_slice(len(examples))
            examples, seeds = examples[mine], seeds[mine]
        with amp():
            roll = collect(cfg, student, teacher, ref, tok, task, examples, sft_pool, seeds)
        t_roll = time.perf_counter() - t0
        student.train()
        stats = update(cfg, student, teacher, roll, optimizer, scheduler, step, amp, state)
        stats.update(response_len=[(roll.lengths.float().mean(), 1)], tokens=[(roll.response_mask.sum(), 1)])
        if alg.batch == ROLLOUTS:  # sft trains on the teacher's correct solutions: their reward is 1 by construction
            stats.update(reward=[(roll.rewards.mean(), 1)], accuracy=[((roll.rewards >= 1).float().mean(), 1)],
                         truncated_frac=[(roll.truncated.float().mean(), 1)])
        m = host_metrics(stats)  # the step's metrics reach the host here, once
        dt = time.perf_counter() - t0
        m.update(lr=scheduler.get_last_lr()[0], tokens_per_s=m.pop("tokens") * dist.world * (1 + cfg.ppo_epochs) / dt,
                 rollout_s=t_roll, step_s=dt, nan_skips=state["nan_skips"])
        if alg.kd:
            m["kd_coef"] = cfg.kd_coef(step)
        if counts_reward_errors:
            m["reward_errors"] = reward_errors()
        state["step"] = step + 1
        if main:
            log.write({"step": step + 1, **m})
        bar.write(log_line(step + 1, cfg.steps, m))
        bar.update(1)
        bar.set_postfix({k: f"{m[k]:.3f}" for k in ("reward", "nll", "divergence") if k in m})
        last = step + 1 == cfg.steps
        if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) and not last:
            res = run_eval(step + 1)
            bar.write(f"eval step {step + 1}: accuracy {res['accuracy']:.3f}")
        if (cfg.save_every and (step + 1) % cfg.save_every == 0) or last:
            with signals.finish_first():  # a stop signal waits for the checkpoint (a second one abandons it)
                save(step + 1, last)
    bar.close()

    # the final evaluation, unless it is already in the log (a finished run resumed, or one that
    # died between its final evaluation and its summary): never two records of it
    records = log.records() if main else []
    done = [r for r in records if r.get("eval") and r["step"] == cfg.steps] if state["step"] == cfg.steps else []
    done = D.broadcast(done)
    if start is not None and done:
        final = {k[len("eval/"):]: v for k, v in sorted(done[-1].items(), key=lambda kv: eval_key_order(kv[0][5:]))
                 if k.startswith("eval/")}
        print(f"final evaluation (step {cfg.steps}) already in {log.path}; not repeated", flush=True)
    else:
        final = run_eval(cfg.steps)
        records = log.records() if main else []
    if counts_reward_errors:
        reward_errors()  # a collective when distributed: before rank 0 alone writes the summary
    if not main:
        return {"final": final}
    plot_path = plot(records, out / "curves.png", title=f"{cfg.algo} on {cfg.task}")
    first = next((r for r in records if r.get("eval") and r["step"] == 0), None)
    start_res = {k[5:]: v for k, v in (first or {}).items() if k.startswith("eval/")}
    table = eval_table(start_res or None, final)
    summary = {"algo": cfg.algo, "task": cfg.task, "steps": cfg.steps, "nan_skips": state["nan_skips"],
               "eval_task": cfg.eval_task or cfg.task, "eval_sizes": {f"L{k}": v for k, v in setup.held.sizes.items()},
               "train_rows_held_out": setup.held.dropped_from_training,
               "final": final, "start": start_res,
               "plots": str(plot_path) if plot_path else None,
               "checkpoint": str(latest_checkpoint(out))}
    if counts_reward_errors:
        summary["reward_errors"] = state["reward_errors"]
    write_atomic(out / "summary.json", json.dumps(summary, indent=2))
    write_atomic(out / "summary.md", f"# {cfg.algo} on {cfg.task}\n\n{table}\n")
    print(f"\n{table}\n\nmetrics: {log.path}\nplots: {plot_path}\ncheckpoint: {summary['checkpoint']}", flush=True)
    return summary
