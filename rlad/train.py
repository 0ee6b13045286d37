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

Around it: ``rlad/launch.py`` starts a run (``train``: every setting, the output folder, the
models, the data and the reward checked first by ``rlad/preflight.py``; the folder locked by
``rlad/rundir.py``; the process group under torchrun); ``rlad/models.py`` builds the models,
``rlad/checkpoint.py`` resumes and saves, ``rlad/report.py`` writes the summary.

Algorithms (``--algo``; ``rlad/algorithms.py`` has one row each: what it scores, its loss, its
advantages; ``collect`` and ``micro_loss`` read the row):
  rlad  TRRD: the PPO ratio anchored to pi_old^alpha * pi_teacher^(1 - alpha)
  grpo  plain GRPO / PPO-clip
  kdrl  GRPO + beta_t * KD(student || teacher), k1/k2/k3 on sampled tokens or the exact
        full-vocabulary reverse KL; beta linearly annealed; no KD on rewarded responses
        (kd_variant rlad_paper, the RLAD paper's: k3 at a constant beta on every response)
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

import contextlib
import json
import math
import random
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from rlad_kernels import LMHead, TokenInputs, linear_divergence, linear_logprobs, linear_policy_loss

from . import distributed as D
from . import signals
from .algorithms import DIVERGENCE, GROUP, NLL, POLICY, ROLLOUTS, TASK_SOLUTIONS, TEACHER_LOG_RATIO, TEACHER_SOLUTIONS
from .batching import same_count
from .checkpoint import Checkpoint, latest_checkpoint, restore, save_run
from .config import TrainConfig
from .diagnostics import trrd_token_stats, update_stats
from .evaluate import eval_key_order, evaluate
from .models import build_models, decoder_hidden
from .preflight import Setup
from .report import MetricsLog, log_line, write_summary
from .rollout import Rollout, build_sft_pool, from_pairs, generate, group_advantages, score
from .rundir import write_atomic
from .runtime import autocast_for, progress
from .tasks.budget import reference_response

if TYPE_CHECKING:
    from rlad_kernels import PolicyLossConfig


def run(cfg: TrainConfig, setup: Setup, start: Checkpoint | None) -> dict:
    """The run itself, in its locked and prepared folder (``launch.train``): from step 0, or from
    ``start``. Rank 0 writes the metrics, the config, the summary and the plot."""
    out, dist, task, tok = Path(cfg.out_dir), D.state(), setup.task, setup.tok
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    amp = autocast_for(cfg.dtype, setup.device)
    torch.manual_seed(cfg.seed)
    data_rng = random.Random(cfg.seed)
    models = build_models(cfg, tok, setup.device, start)
    student = models.student
    optimizer, scheduler = optimizer_for(cfg, student)
    sft_pool = (build_sft_pool(cfg, models.teacher, tok, task, setup.levels, cfg.seed + 7, template=setup.template)
                if cfg.algorithm.batch == TEACHER_SOLUTIONS else None)
    log = MetricsLog(out / "metrics.jsonl")
    state = {"step": 0, "nan_skips": 0, "reward_errors": 0}
    if start is not None:
        restore(start, student, optimizer, scheduler, data_rng, state, models.trained_names)
    if dist.main:  # a resumed run's log keeps the records up to its checkpoint
        if start is not None:
            log.rewind(state["step"])
        else:
            log.reset()
        write_atomic(out / "config.json", json.dumps(cfg.to_dict(), indent=2))
    counts_reward_errors = getattr(task, "user_reward", False)  # a module:function reward's failures, scored 0

    if state["step"] == 0:
        print(f"eval step 0: accuracy {evaluation(cfg, setup, student, amp, log, 0)['accuracy']:.3f}", flush=True)
    bar = progress(cfg.quiet or not dist.main, total=cfg.steps, initial=state["step"], desc=f"{cfg.algo} steps")
    for step in range(state["step"], cfg.steps):
        D.fail_hook(step)
        t0, times = time.perf_counter(), {}
        student.eval()
        examples, seeds = draw(cfg, task, data_rng, setup.levels, step)
        with amp():
            roll = collect(cfg, student, models.teacher, models.ref, tok, task, examples, sft_pool, seeds, times,
                           template=setup.template)
        times["rollout_s"] = time.perf_counter() - t0
        student.train()
        with phase(times, "update_s"):
            stats = update(cfg, student, models.teacher, roll, optimizer, scheduler, step, amp, state)
        stats.update(token_diagnostics(cfg, student, roll, amp, times))
        m = step_metrics(cfg, step, roll, stats, t0, times, scheduler.get_last_lr()[0], state)
        if counts_reward_errors:
            m["reward_errors"] = count_reward_errors(task, state)
        state["step"] = step + 1
        if dist.main:
            log.write({"step": step + 1, **m})
        bar.write(log_line(step + 1, cfg.steps, m))
        bar.update(1)
        bar.set_postfix({k: f"{m[k]:.3f}" for k in ("reward", "nll", "divergence") if k in m})
        last = step + 1 == cfg.steps
        if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) and not last:
            res = evaluation(cfg, setup, student, amp, log, step + 1)
            bar.write(f"eval step {step + 1}: accuracy {res['accuracy']:.3f}")
        if (cfg.save_every and (step + 1) % cfg.save_every == 0) or last:
            with signals.finish_first():  # a stop signal waits for the checkpoint (a second one abandons it)
                save_run(cfg, step + 1, last, student, optimizer, scheduler, data_rng, state, tok)
    bar.close()

    final = final_evaluation(cfg, setup, student, amp, log, resumed=start is not None, at_end=state["step"])
    if counts_reward_errors:
        count_reward_errors(task, state)  # a collective when distributed: before rank 0 alone writes the summary
    if not dist.main:
        return {"final": final}
    return write_summary(cfg, setup.held, log, final, state, latest_checkpoint(out), counts_reward_errors)


def optimizer_for(cfg: TrainConfig, student):
    """AdamW over the student's trained parameters, and its learning-rate schedule over every
    optimizer step of the run (``steps x ppo_epochs x mini_batches``)."""
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg, cfg.steps * cfg.ppo_epochs * cfg.mini_batches))
    return optimizer, scheduler


def lr_lambda(cfg: TrainConfig, total: int):
    def f(i: int) -> float:
        if cfg.warmup_steps and i < cfg.warmup_steps:
            return (i + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        frac = min(1.0, (i - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
        return 1.0 - frac if cfg.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))
    return f


def draw(cfg: TrainConfig, task, data_rng: random.Random, levels, step: int):
    """The step's prompts, and their sampling seeds (None: torch's global stream). Distributed:
    the global batch is drawn on every rank, each keeps its share, sampled with per-prompt seeds."""
    examples = task.sample(data_rng, cfg.prompts_per_step, levels)
    if not D.state().enabled:
        return examples, None
    seeds = [D.row_seed(cfg.seed, step, i) for i in range(len(examples))]
    mine = D.my_slice(len(examples))
    return examples[mine], seeds[mine]


def collect(cfg: TrainConfig, student, teacher, ref, tok, task, examples, sft_pool, seeds=None,
            times: dict | None = None, *, template: str) -> Rollout:
    """The step's batch, as the algorithm's row says: sampled responses with rewards, the per-token
    log-probs it scores, its advantages and KD weights; or teacher solutions drawn from the pool.
    ``seeds``: one sampling seed per example (see ``rollout.generate``); None: torch's global stream.
    ``times``: the seconds of each phase are added to it (``generate_s``, ``score_old_s``,
    ``score_teacher_s``, ``score_ref_s``). ``template``: the run's prompt template (``Setup.template``).
    Distributed: ``examples`` are this rank's; sft draws the global picks and keeps this rank's share."""
    alg = cfg.algorithm
    if alg.batch == TEACHER_SOLUTIONS:  # offline distillation: the teacher's correct solutions, drawn from the pool
        picks = [sft_pool[i] for i in torch.randint(len(sft_pool), (cfg.prompts_per_step,)).tolist()]
        picks = picks[D.my_slice(len(picks))]
        return from_pairs(tok, [p[0] for p in picks], [p[1] for p in picks], None, template=template,
                          device=next(student.parameters()).device)
    if alg.batch == TASK_SOLUTIONS:  # supervised fine-tuning: the step's prompts with the task's worked solutions
        solutions = [reference_response(e)[0] for e in examples]
        return from_pairs(tok, examples, solutions, None, template=template,
                          device=next(student.parameters()).device)
    with phase(times, "generate_s"):
        roll = generate(student, tok, examples, task, group_size=cfg.group_size, temperature=cfg.temperature,
                        top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, template=template,
                        seeds=seeds, stop=cfg.stop)
    if cfg.drop_truncated:  # DAPO's overlong filtering: out of the loss, their rewards still in the groups
        roll.keep = ~roll.truncated
    kw = dict(temperature=cfg.temperature, micro_batch=cfg.micro_batch_size, micro_batch_tokens=cfg.micro_batch_tokens)
    if alg.scores_old:
        with phase(times, "score_old_s"):
            roll.old_logp = score(student, roll, **kw)
    # normalized over the student's V columns of a possibly padded teacher head; with diagnostics
    # for any algorithm with a teacher (TRRD's view of a grpo batch)
    if alg.scores_teacher or (cfg.diagnosed and teacher is not None):
        with phase(times, "score_teacher_s"):
            roll.teacher_logp = score(teacher, roll, head_rows=LMHead.of(student).weight.shape[0], **kw)
    if ref is not None:
        with phase(times, "score_ref_s"):
            roll.ref_logp = score(ref, roll, **kw)
    if alg.advantages == GROUP:
        roll.advantages = group_advantages(roll.rewards, cfg.group_size, cfg.adv_std_norm)
    elif alg.advantages == TEACHER_LOG_RATIO:  # the sampled reverse KL, per token, as the advantage
        roll.token_advantages = torch.where(roll.response_mask, roll.teacher_logp - roll.old_logp, 0.0)
    if alg.kd:  # reward-guided KD: no KD term on the responses that got reward 1 (not in the RLAD paper's variant)
        masked = cfg.kd_reward_mask and not cfg.paper_kd
        keep = (roll.rewards < 1.0) if masked else torch.ones_like(roll.rewards, dtype=torch.bool)
        roll.kd_weights = keep.float()[:, None].expand(roll.targets.shape).contiguous()
    return roll


def token_diagnostics(cfg: TrainConfig, student, roll: Rollout, amp, times: dict) -> dict[str, list[tuple]]:
    """What TRRD does to the batch's tokens (``rlad.diagnostics``), where the batch has old and
    teacher log-probs and advantages; with ``cfg.diagnostics`` also how far the update moved the
    policy: the batch scored again by the updated student (``score_new_s``)."""
    if roll.advantages is None or roll.old_logp is None:  # group advantages only (every such row scores old)
        return {}
    A, mask, out = roll.token_advantage(), roll.loss_mask, {}
    if roll.teacher_logp is not None:
        out.update(trrd_token_stats(A, mask, roll.old_logp, roll.teacher_logp, alpha=cfg.alpha,
                                    clamp=cfg.teacher_clamp, eps_low=cfg.eps_low, eps_high=cfg.eps_high))
    if cfg.diagnosed:
        student.eval()
        with phase(times, "score_new_s"), amp():
            new = score(student, roll, temperature=cfg.temperature, micro_batch=cfg.micro_batch_size,
                        micro_batch_tokens=cfg.micro_batch_tokens)
        out.update(update_stats(A, mask, roll.old_logp, new, roll.teacher_logp, eps_high=cfg.eps_high))
    return {k: [pair] for k, pair in out.items()}


def micro_loss(cfg: TrainConfig, student, teacher, mb: Rollout, normalizer, token_weights,
               policy: PolicyLossConfig | None):
    """The algorithm's loss on one micro-batch, already divided by the global normalizer, and its
    metrics as detached scalar tensors (no host sync). ``policy``: the policy loss's options at
    this step (``cfg.policy_config(step)``; None for the other losses). A sharded student computes
    it inside its FSDP2 root's forward, where its lm_head weight is gathered
    (``distributed.forward_in``)."""
    loss, metrics = D.forward_in(student, _micro_loss, cfg, teacher, mb, normalizer, token_weights, policy)
    if D.is_sharded(student):  # FSDP2 averages the gradients over ranks; the global loss is their sum
        loss = loss * D.state().world
    return loss, metrics


def _micro_loss(student, cfg: TrainConfig, teacher, mb: Rollout, normalizer, token_weights,
                policy: PolicyLossConfig | None):
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
    assert alg.loss == POLICY and policy is not None, alg
    kw = {}
    if policy.kd_estimator == "full":  # the exact reverse KL needs the teacher's hidden states and head
        kw.update(zip(("teacher_hidden", "teacher_head"), teacher_hidden(), strict=True))
    inputs = TokenInputs(advantages=mb.token_advantage(), old_logp=mb.old_logp,
                         teacher_logp=mb.teacher_logp if alg.teacher_in_policy_loss else None, ref_logp=mb.ref_logp,
                         token_weights=token_weights, kd_weights=mb.kd_weights)
    out = linear_policy_loss(h, head, targets, inputs, normalizer=normalizer, temperature=cfg.temperature,
                             config=policy, **kw)
    return out.loss, {k: v.detach() for k, v in out.metrics.items()}


def normalizer_for(cfg: TrainConfig, roll: Rollout, idx: torch.Tensor):
    """(normalizer, token weights [B, L-1] | None) of one optimizer step over rows ``idx``:
    global over all of its micro-batches (and ranks), so accumulation gives the full batch's gradient. Rows
    left out of the loss (``roll.keep``, drop_truncated) count neither their tokens nor themselves.

    ``rlad_paper`` (the RLAD paper's Eq. 1/4: each response's token mean, averaged over its group's
    responses, then over the groups): row i of a group with K kept responses (of G) weighs
    u_i = G / K, so each group weighs the same whatever drop_truncated left of it; the tokens weigh
    u_i / |o_i| and the normalizer is the sum of u_i over the kept rows of ``idx`` (and ranks: a
    rank holds whole groups). With every row kept, u_i = 1: exactly seq_mean, whatever rows ``idx``
    holds (mini-batches split groups)."""
    mask = roll.loss_mask
    if cfg.aggregation == "token_mean":  # distributed: summed over ranks (each holds its share of the rows)
        return D.all_sum(mask[idx].sum()).clamp_min(1).float(), None
    kept = roll.keep if roll.keep is not None else torch.ones(len(roll), dtype=torch.bool, device=mask.device)
    per_seq = 1.0 / mask.sum(-1, keepdim=True).clamp_min(1).float()
    if cfg.aggregation == "rlad_paper":  # a response's weight G / K: its group's weight, shared by its kept rows
        groups = kept.view(-1, roll.group_size)
        share = (roll.group_size / groups.sum(-1, keepdim=True).clamp_min(1).float()).expand(groups.shape)
        share = torch.where(groups, share, 0.0).reshape(-1)
        return D.all_sum(share[idx].sum()).clamp_min(1), (share[:, None] * per_seq).expand(roll.targets.shape)
    count = D.all_sum(kept[idx].sum()).float().clamp_min(1)
    if cfg.aggregation == "seq_mean":  # every sequence weighs 1/|o_i|; the weights cover all rows
        return count, per_seq.expand(roll.targets.shape)
    return count * cfg.max_new_tokens, None


# metrics also logged for the first mini-batch alone (``<name>_first``): there the policy is still
# the old one, so any clipping is the anchor's (TRRD's teacher term), not the update's
FIRST_MINI_BATCH = {"clip_frac_pos": lambda adv, mask: (mask & (adv > 0)).sum(),  # name: the tokens it is over
                    "clip_frac_neg": lambda adv, mask: (mask & (adv < 0)).sum()}


def update(cfg: TrainConfig, student, teacher, roll: Rollout, optimizer, scheduler, step: int, amp,
           state) -> dict[str, list[torch.Tensor]]:
    """``ppo_epochs`` x ``mini_batches`` optimizer steps on the batch. A non-finite loss or
    gradient skips the optimizer step (counted in ``state['nan_skips']``); a mini-batch with no
    loss token (all of its rows dropped) takes no optimizer step. Returns the metrics'
    values on device: one per micro-batch, and ``loss`` / ``grad_norm`` one per optimizer step."""
    params = [p for p in student.parameters() if p.requires_grad]
    policy = cfg.policy_config(step)  # the policy loss's options at this step (None for the other losses)
    stats = defaultdict(list)
    for epoch in range(cfg.ppo_epochs):
        gen = _perm_generator(cfg, step, epoch, roll)
        perm = torch.randperm(len(roll), device=roll.input_ids.device, generator=gen)
        for j, mini in enumerate(perm.tensor_split(cfg.mini_batches)):  # exactly mini_batches, sizes within one
            first = epoch == 0 and j == 0
            norm, tw = normalizer_for(cfg, roll, mini)
            optimizer.zero_grad(set_to_none=True)
            total = torch.zeros((), device=norm.device)
            parts = list(roll.micro_batches(mini, tw, size=cfg.micro_batch_size, tokens=cfg.micro_batch_tokens))
            for mb, mtw, real in same_count(parts):  # under torchrun, as many on every rank (FSDP2's gathers)
                with amp():
                    loss, m = micro_loss(cfg, student, teacher, mb, norm, mtw, policy)
                if not real:  # a padding micro-batch: in the collectives, not in the gradient
                    (loss * 0.0).backward()
                    continue
                loss.backward()
                total = total + loss.detach()
                tokens = mb.loss_mask.sum()  # the micro-batch's metrics are means over its loss tokens
                for k, v in m.items():
                    stats[k].append((v, tokens))
                    if first and k in FIRST_MINI_BATCH:  # before any optimizer step on this batch; weighted by
                        # the tokens it is a fraction of, so the step's value is one ratio whatever the split
                        stats[k + "_first"].append((v, FIRST_MINI_BATCH[k](mb.token_advantage(), mb.loss_mask)))
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


def step_metrics(cfg: TrainConfig, step: int, roll: Rollout, stats: dict, t0: float, times: dict[str, float],
                 lr: float, state: dict) -> dict:
    """The step's log record: the loss's metrics (``host_metrics``), response lengths, and for
    sampled batches the reward, accuracy and truncated fraction (and with group advantages the
    fraction of groups whose rewards are all equal); the learning rate, throughput and
    times (``t0``: the step's start, ``time.perf_counter``; ``times``: seconds by phase, rollout_s
    the whole batch), and kdrl's KD coefficient."""
    stats.update(response_len=[(roll.lengths.float().mean(), 1)], tokens=[(roll.response_mask.sum(), 1)])
    if cfg.algorithm.batch == ROLLOUTS:  # sft and finetune train on given solutions: no reward to report
        stats.update(reward=[(roll.rewards.mean(), 1)], accuracy=[((roll.rewards >= 1).float().mean(), 1)],
                     truncated_frac=[(roll.truncated.float().mean(), 1)])
    if cfg.algorithm.advantages == GROUP:  # groups with no learning signal: every reward equal, so every A_i = 0
        equal = groups_equal(roll.rewards, roll.group_size)
        stats["groups_equal_frac"] = [(equal.float().mean(), equal.numel())]  # weighted by groups: global over ranks
        if len(set(cfg.levels)) > 1:  # per level, the same names on every rank
            levels = torch.tensor([e.level for e in roll.examples], device=equal.device)
            for level in sorted(set(cfg.levels)):  # weighted by the level's groups: none on a rank (or step) without it
                at = levels == level
                stats[f"groups_equal_frac/L{level}"] = [((equal & at).sum() / at.sum().clamp_min(1), at.sum())]
    m = host_metrics(stats)  # the step's metrics reach the host here, once
    dt = time.perf_counter() - t0
    m.update(lr=lr, tokens_per_s=m.pop("tokens") * D.state().world * (1 + cfg.ppo_epochs) / dt, **times,
             step_s=dt, nan_skips=state["nan_skips"])
    if cfg.algorithm.kd:
        m["kd_coef"] = cfg.kd_coef(step)
    return m


@contextlib.contextmanager
def phase(times: dict[str, float] | None, name: str):
    """Adds the block's wall time to ``times[name]`` (None: nothing), after the GPU's queued work."""
    t = time.perf_counter()
    yield
    if times is not None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        times[name] = times.get(name, 0.0) + time.perf_counter() - t


def groups_equal(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[groups] bool: the groups whose rewards are all equal (all right or all wrong): their group
    advantages are all 0, so the advantage term learns nothing from them."""
    r = rewards.view(-1, group_size)
    return r.amax(-1) == r.amin(-1)


def count_reward_errors(task, state: dict) -> int:
    """A module:function reward's failures so far (``reward_errors=zero``): every rank's new ones
    move from the task into ``state``."""
    state["reward_errors"] += int(D.all_sum(torch.tensor(task.failures)))
    task.failures = 0
    return state["reward_errors"]


def evaluation(cfg: TrainConfig, setup: Setup, student, amp, log: MetricsLog, step: int) -> dict:
    """The held-out evaluation at ``step``, in its own random stream (so evaluating, or not, never
    changes the training run); rank 0 logs it. Distributed: every rank evaluates the whole set
    (identical results)."""
    dist, device = D.state(), setup.device
    bar = progress(cfg.quiet or not dist.main, total=len(setup.eval_set), desc="eval", leave=False)
    t0 = time.perf_counter()
    with amp(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed + 2_000_003)
        res = evaluate(student, setup.tok, setup.held.task, setup.eval_set, template=setup.template,
                       max_new_tokens=cfg.max_new_tokens, samples=cfg.eval_samples, temperature=cfg.temperature,
                       temperatures=cfg.eval_temperatures, top_p=cfg.top_p, stop=cfg.stop, progress=bar)
    bar.close()
    if dist.main:
        log.write({"step": step, "eval": True, **{f"eval/{k}": v for k, v in res.items()},
                   "eval_s": time.perf_counter() - t0})
    return res


def final_evaluation(cfg: TrainConfig, setup: Setup, student, amp, log: MetricsLog, *, resumed: bool,
                     at_end: int) -> dict:
    """The final evaluation, unless it is already in the log (a finished run resumed, or one that
    died between its final evaluation and its summary): never two records of it."""
    records = log.records() if D.state().main else []
    done = [r for r in records if r.get("eval") and r["step"] == cfg.steps] if at_end == cfg.steps else []
    done = D.broadcast(done)
    if not (resumed and done):
        return evaluation(cfg, setup, student, amp, log, cfg.steps)
    print(f"final evaluation (step {cfg.steps}) already in {log.path}; not repeated", flush=True)
    return {k[len("eval/"):]: v for k, v in sorted(done[-1].items(), key=lambda kv: eval_key_order(kv[0][5:]))
            if k.startswith("eval/")}
