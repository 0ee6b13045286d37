"""``rlad study``: algorithms x seeds under identical budgets, aggregated with confidence intervals.

A study is a YAML file::

    out_dir: studies/mini          # one folder per run below it: <arm>/seed_<s>/
    report_dir: studies/mini       # the tables and plots (optional; default out_dir)
    seeds: [0, 1, 2]
    jobs: 2                        # runs at a time (each gets cores / jobs torch threads)
    base:                          # TrainConfig settings shared by every run
      task: arithmetic
      levels: [1, 2, 3]
      teacher: runs/teacher
      steps: 40
    arms:                          # name: the settings that make the arm (they override base)
      rlad: {algo: rlad, lr: 3.0e-4}
      grpo: {algo: grpo, lr: 3.0e-4}
      rlad-a0.25: {algo: rlad, alpha: 0.25}
    headline: mean@8_T0.6          # optional: the metric of the plots and comparisons (default accuracy)
    pairs: [[rlad, grpo]]          # optional: a - b per seed, with its 95% CI over seeds, per level
    verdict:                       # optional, written before the runs: the rule that decides the study
      pair: [rlad, grpo]
      metric: mean@8_T0.6/L3
      support_above: 0.0           # supported if the paired CI lies entirely above this
      reproduce_below: 0.03        # not reproduced if its upper bound is below this; else unresolved

Every arm runs on the same budget: the budget settings (``budget_of``: steps, prompts per step,
responses per prompt, PPO epochs, mini-batches, response length) may not differ between arms,
except that an sft arm draws ``prompts_per_step x group_size`` teacher solutions per step, so it
trains on as many responses, with as many optimizer steps, as the RL arms. Each run is ``rlad
train`` in a subprocess (its log in ``<run>/train.log``); a run whose ``summary.json`` exists
with the same settings is skipped, an unfinished one is resumed from its last checkpoint, so a
study can be stopped and started again. A progress bar covers the whole grid.

Two studies may share ``out_dir`` (an ablation that reuses the main study's runs of the same
settings: they are skipped as done) and write their reports to different ``report_dir`` folders.

Outputs, in ``report_dir`` (default ``out_dir``): ``runs.csv`` (one row per run: final
metrics, overall and per level, and its mean diagnostics), ``curves.csv`` (every evaluation of
every run), ``results.md`` (per arm: mean and 95% confidence interval across seeds, overall and
per level; the headline per level; the paired differences and the verdict; diagnostics), and the
plots ``accuracy.png`` (the headline against step) and ``levels.png`` (the final headline per
level), both mean +- 95% CI across seeds (Student t). Paired by seed, a difference between arms
cancels what the arms share on that seed (its training prompts, and every evaluation's problems),
so its interval is narrower than the two arms' intervals side by side.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .config import ConfigError, TrainConfig, read_yaml, type_problem
from .evaluate import metric_names
from .report import MetricsLog, markdown_table, save_figure
from .rundir import claim, describe_holder, lock_holder, owner_problem, write_atomic
from .signals import Stopped, child_environment, graceful_stop, stop_children

STUDY_KEYS = ("out_dir", "report_dir", "seeds", "jobs", "base", "arms", "headline", "pairs", "verdict")
VERDICT_KEYS = ("pair", "metric", "support_above", "reproduce_below")
# per-step metrics averaged over a run for the diagnostics table (those a run logs)
DIAGNOSTICS = ("reward", "groups_equal_frac", "clip_frac", "clip_frac_pos", "clip_frac_neg", "clip_frac_pos_first",
               "clip_frac_neg_first", "kl_old_new", "trrd_zeroed_frac", "trrd_protected_frac", "teacher_pref_frac",
               "room_used", "teacher_clamp_frac", "teacher_clamp_hi", "teacher_clamp_lo", "teacher_gate_frac",
               "teacher_gap", "ratio_mean", "kd_mean", "divergence", "nll", "entropy_mean", "response_len")
# two-sided 95% Student t quantiles t_{0.975, df}, df = 1..30; 1.96 beyond
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


class StudyError(ValueError):
    """An invalid study file, or runs that failed."""


@dataclass
class Run:
    arm: str
    seed: int
    config: TrainConfig

    @property
    def out(self) -> Path:
        return Path(self.config.out_dir)

    @property
    def name(self) -> str:
        return f"{self.arm}/seed_{self.seed}"


@dataclass
class Verdict:
    """A prediction written before the study runs: the paired difference ``pair[0] - pair[1]`` of
    ``metric`` (``mean@8_T0.6/L4``) across seeds supports the claim if its 95% CI lies entirely
    above ``support_above``, does not reproduce it if the CI's upper bound is below
    ``reproduce_below``, and leaves it unresolved otherwise."""
    pair: tuple[str, str]
    metric: str
    support_above: float = 0.0
    reproduce_below: float = 0.03

    def decide(self, mean: float, half: float, n: int) -> str:
        if n < 2 or not math.isfinite(mean):
            return f"unresolved: {n} paired seed(s), too few for an interval"
        lo, hi = mean - half, mean + half
        ci = f"{self.pair[0]} - {self.pair[1]} on {self.metric}: {mean:+.3f}, 95% CI [{lo:+.3f}, {hi:+.3f}], {n} seeds"
        if lo > self.support_above:
            return f"supported ({ci}: entirely above {self.support_above:g})"
        if hi < self.reproduce_below:
            return f"not reproduced ({ci}: upper bound below {self.reproduce_below:g})"
        return f"unresolved ({ci})"


@dataclass
class Study:
    out_dir: Path     # the runs: <out_dir>/<arm>/seed_<s>
    report_dir: Path  # the aggregated tables and plots (default: out_dir)
    seeds: list[int]
    jobs: int
    runs: list[Run]
    arms: list[str]
    headline: str = "accuracy"  # the metric of the plots, the per-level table and the paired differences
    pairs: list[tuple[str, str]] = field(default_factory=list)  # (a, b): a - b, paired by seed
    verdict: Verdict | None = None


def load_study(path, *, out_dir: str | None = None, jobs: int | None = None, seeds: list[int] | None = None,
               arms: list[str] | None = None) -> Study:
    """The study file ``path``, with command-line overrides; every run's config is built and
    validated here, before anything runs."""
    values, lines = read_yaml(path)
    unknown = sorted(set(values) - set(STUDY_KEYS))
    if unknown:
        raise StudyError(f"{path}: unknown key(s) {unknown}; a study has {', '.join(STUDY_KEYS)}")
    for key, kind in (("seeds", "list[int]"), ("jobs", "int"), ("out_dir", "str"), ("report_dir", "str")):
        if key in values and (problem := type_problem(values[key], kind)):
            raise StudyError(f"{path}:{lines[key]}: {key}: {problem}")
    base, spec_arms = values.get("base") or {}, values.get("arms") or {}
    if not isinstance(base, dict) or not isinstance(spec_arms, dict) or not spec_arms:
        raise StudyError(f"{path}: 'base' must be a mapping of settings and 'arms' a non-empty mapping of arm names "
                         f"to settings")
    root = Path(out_dir or values.get("out_dir") or "studies/" + Path(path).stem)
    seeds = list(seeds if seeds is not None else values.get("seeds", [0]))
    jobs = jobs if jobs is not None else values.get("jobs", 1)
    if not seeds or len(set(seeds)) != len(seeds):
        raise StudyError(f"seeds={seeds}: give one or more distinct seeds")
    if jobs < 1:
        raise StudyError(f"jobs={jobs}: must be >= 1")
    chosen = list(spec_arms) if not arms else arms
    missing = [a for a in chosen if a not in spec_arms]
    if missing:
        raise StudyError(f"arms {missing} are not in {path} (it has {', '.join(spec_arms)})")
    for key in ("out_dir", "seed", "resume", "overwrite", "force_resume"):
        if key in base or any(key in (spec_arms[a] or {}) for a in chosen):
            raise StudyError(f"{path}: '{key}' is set by the study for each run; remove it from base and arms")
    threads = max(1, (os.cpu_count() or 1) // jobs)
    runs = []
    for arm in chosen:
        settings = {**base, **(spec_arms[arm] or {})}
        if "/" in arm or arm.startswith("."):
            raise StudyError(f"arm name {arm!r}: use a plain folder name")
        for seed in seeds:
            values_ = {"threads": threads, "quiet": True, **settings, "seed": seed,
                       "out_dir": str(root / arm / f"seed_{seed}")}
            try:
                cfg = TrainConfig.from_dict(values_, source=f"{path}: arm {arm!r}")
            except ConfigError as err:
                raise StudyError(f"{path}: arm {arm!r}: {err}") from None
            if cfg.algorithm.responses_per_prompt(cfg.group_size) == 1:  # as many responses per step as an RL
                cfg = cfg.replace(prompts_per_step=cfg.prompts_per_step * cfg.group_size)  # arm: prompts x G
            runs.append(Run(arm, seed, cfg))
    check_budgets(runs)
    report = Path(values["report_dir"]) if values.get("report_dir") and not out_dir else root
    headline, pairs, verdict = comparisons(path, values, lines, spec_arms)
    return Study(root, report, seeds, jobs, runs, chosen, headline, pairs, verdict)


def comparisons(path, values: dict, lines: dict, arms: dict) -> tuple[str, list[tuple[str, str]], Verdict | None]:
    """The study file's ``headline`` metric, its ``pairs`` of arms to difference per seed, and
    its pre-registered ``verdict``, checked against its arms."""
    def where(key):
        return f"{path}:{lines.get(key, '?')}: {key}"

    headline = values.get("headline", "accuracy")
    if not isinstance(headline, str) or not headline or "/" in headline:
        raise StudyError(f"{where('headline')}: give a metric name such as accuracy or mean@8_T0.6 (no level)")

    def pair_of(item, key):
        if (not isinstance(item, list) or len(item) != 2 or not all(isinstance(a, str) for a in item)
                or item[0] == item[1]):
            raise StudyError(f"{where(key)}: {item!r}: give a pair of two different arm names, [a, b]")
        missing = [a for a in item if a not in arms]
        if missing:
            raise StudyError(f"{where(key)}: arm(s) {missing} not in the study (it has {', '.join(arms)})")
        return tuple(item)

    raw = values.get("pairs") or []
    if not isinstance(raw, list):
        raise StudyError(f"{where('pairs')}: give a list of [a, b] pairs")
    pairs = [pair_of(item, "pairs") for item in raw]
    spec = values.get("verdict")
    if spec is None:
        return headline, pairs, None
    if not isinstance(spec, dict) or set(spec) - set(VERDICT_KEYS) or not {"pair", "metric"} <= set(spec):
        raise StudyError(f"{where('verdict')}: give pair and metric (and optionally support_above, "
                         f"reproduce_below); the keys are {', '.join(VERDICT_KEYS)}")
    for key in ("support_above", "reproduce_below"):
        if key in spec and (problem := type_problem(spec[key], "float")):
            raise StudyError(f"{where('verdict')}: {key}: {problem}")
    if not isinstance(spec["metric"], str) or not spec["metric"]:
        raise StudyError(f"{where('verdict')}: metric: give a metric name, with its level (mean@8_T0.6/L4)")
    verdict = Verdict(pair_of(spec["pair"], "verdict"), spec["metric"],
                      **{k: float(spec[k]) for k in ("support_above", "reproduce_below") if k in spec})
    if verdict.support_above > verdict.reproduce_below:
        raise StudyError(f"{where('verdict')}: support_above must not exceed reproduce_below")
    if verdict.pair not in pairs:
        pairs.append(verdict.pair)
    return headline, pairs, verdict


def budget_of(cfg: TrainConfig) -> dict[str, int]:
    """Responses per step, optimizer steps, and the other budget settings of a run."""
    responses = cfg.prompts_per_step * cfg.algorithm.responses_per_prompt(cfg.group_size)
    return {"responses_per_step": responses, "optimizer_steps": cfg.steps * cfg.ppo_epochs * cfg.mini_batches,
            **{k: getattr(cfg, k) for k in ("steps", "ppo_epochs", "mini_batches", "max_new_tokens")}}


def check_budgets(runs: list[Run]) -> None:
    budgets = {r.arm: budget_of(r.config) for r in runs}
    first = next(iter(budgets))
    for arm, b in budgets.items():
        diff = {k: (budgets[first][k], v) for k, v in b.items() if budgets[first][k] != v}
        if diff:
            raise StudyError(f"arms {first!r} and {arm!r} have different budgets ({diff}); every arm must run the "
                             f"same steps, responses, PPO epochs, mini-batches and response length")


# ----------------------------------------------------------------------------- running
def run_state(run: Run) -> str:
    """``done`` (a summary of exactly this run: the same settings, the budget included),
    ``partial`` (started with the same settings, or finished with fewer steps under a schedule
    that does not depend on them: it is resumed and carried on to the study's steps), ``new``;
    a run folder written with other settings is refused."""
    saved_path = run.out / "config.json"
    if not saved_path.is_file():
        return "new"
    try:
        saved = json.loads(saved_path.read_text())
    except (OSError, ValueError):
        return "partial"  # a crash while writing it: resume decides
    if not isinstance(saved, dict):
        return "partial"
    if run.config.max_new_tokens is None:  # resolved from the task by the run
        saved = {**saved, "max_new_tokens": None}
    changes = run.config.resume_changes(saved)
    if changes:
        raise StudyError(f"{run.out}: written with other settings ({'; '.join(changes)}); give the study another "
                         f"out_dir, or delete that run")
    if saved.get("steps") != run.config.steps:  # resume_changes lets steps change under a constant schedule
        if not isinstance(saved.get("steps"), int) or saved["steps"] > run.config.steps:
            raise StudyError(f"{run.out}: ran to steps={saved.get('steps')!r}, but the study asks for "
                             f"steps={run.config.steps}; give the study another out_dir, or delete that run")
        return "partial"  # fewer steps: continued from its last checkpoint to the study's budget
    return "done" if summary_of(run) is not None else "partial"


def summary_of(run: Run) -> dict | None:
    """The run's summary.json when it is the summary of this run's budget (its steps), else None."""
    try:
        summary = json.loads((run.out / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and summary.get("steps") == run.config.steps else None


class Children:
    """The ``rlad train`` processes a study has running. Each runs in its own session (a terminal's
    Ctrl-C reaches the study alone, which passes it on once) and dies with the study
    (``rlad.signals.adopt_parent``: SIGTERM when the study dies, even by SIGKILL)."""

    def __init__(self):
        self.procs: dict[str, subprocess.Popen] = {}
        self.lock = threading.Lock()
        self.stopping = False

    def run(self, name: str, cmd: list[str], log) -> int | None:
        """Run ``cmd`` to its end; None when the study is stopping and it was not started."""
        with self.lock:
            if self.stopping:
                return None
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                    env=child_environment())
            self.procs[name] = proc
        try:
            return proc.wait()
        finally:
            with self.lock:
                self.procs.pop(name, None)

    def stop(self, signum: int) -> list[str]:
        """Stop every running run (``signals.stop_children``) and start no other; their names."""
        with self.lock:
            self.stopping = True
            procs = dict(self.procs)
        stop_children(list(procs.values()), signum)
        return list(procs)


def launch(run: Run, resume: bool, children: Children) -> int | None:
    """``rlad train`` for one run in a subprocess, its output in ``<run>/train.log``."""
    claim(run.out, "run", setting="study run folder")  # rlad's (the marker) before the log goes in
    spec = run.out / "run.yaml"
    import yaml

    write_atomic(spec, yaml.safe_dump(run.config.to_dict(), sort_keys=False))
    cmd = [sys.executable, "-m", "rlad", "train", "--config", str(spec)] + (["--resume", "true"] if resume else [])
    with open(run.out / "train.log", "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        return children.run(run.name, cmd, log)


def steps_done(run: Run) -> int:
    """The last step in a run's metrics log (for the progress bar)."""
    records = MetricsLog(run.out / "metrics.jsonl").records()
    return int(records[-1].get("step", 0)) if records else 0


def run_study(study: Study, *, quiet: bool = False) -> dict:
    """Run what is not done yet (``jobs`` at a time), then aggregate. Raises StudyError naming the
    failed runs and their logs (a non-zero exit, or no summary), after the others have finished
    and the finished ones are aggregated: every run asked for is in runs.csv or named there.
    SIGINT / SIGTERM stop the running runs (``signals.stop_children``) and raise ``Stopped``."""
    from .runtime import progress

    claim(study.out_dir, "study", setting="study out_dir")  # new, empty or a study's: never someone else's
    for r in study.runs:  # every run folder: new, empty or an rlad run's, before any run starts
        if problem := owner_problem(r.out, "run"):
            raise StudyError(f"study run folder {problem}")
    states = {r.name: run_state(r) for r in study.runs}
    todo = [r for r in study.runs if states[r.name] != "done"]
    busy = {r.name: holder for r in todo if (holder := lock_holder(r.out))}
    if busy:  # an earlier study's run still going (an orphan, or another study sharing out_dir)
        raise StudyError("runs in use by another process: " + "; ".join(f"{n} ({describe_holder(h)})"
                                                                       for n, h in busy.items()))
    total = sum(r.config.steps for r in study.runs)
    skipped = len(study.runs) - len(todo)
    print(f"study {study.out_dir}: {len(study.runs)} runs ({len(study.arms)} arms x {len(study.seeds)} seeds), "
          f"{skipped} already done, {len(todo)} to run, {study.jobs} at a time", flush=True)
    children = Children()
    bar = progress(quiet, total=total, desc="study steps")
    with graceful_stop(), ThreadPoolExecutor(study.jobs) as pool:
        futures = {r.name: pool.submit(launch, r, states[r.name] == "partial", children) for r in todo}
        try:
            while True:
                finished = all(f.done() for f in futures.values())
                bar.n = sum(r.config.steps if states[r.name] == "done" or (r.name in futures and futures[r.name].done())
                            else min(steps_done(r), r.config.steps) for r in study.runs)
                running = [n for n, f in futures.items() if f.running()]
                bar.set_postfix_str(", ".join(running)[:60])
                bar.refresh()
                if finished:
                    break
                time.sleep(1.0)
        except Stopped as stop:
            for f in futures.values():
                f.cancel()
            stopped = children.stop(stop.signum)
            stop.where = (f"runs stopped: {', '.join(stopped) or 'none'}; the same rlad study command resumes "
                          f"them from their last checkpoints")
            raise
    bar.close()
    failed = {name: f"exit {f.result()}" for name, f in futures.items() if f.result() != 0}
    try:
        result = aggregate(study)
    except StudyError:
        if not failed:
            raise
        result = {"runs": {}}
    for r in study.runs:  # asked for, not failed, yet not in runs.csv: a summary missing or of another run
        if r.name not in result["runs"] and r.name not in failed:
            failed[r.name] = "exit 0 without a summary.json" if r.name in futures else "no summary.json"
    if failed:
        raise StudyError("runs failed: " + "; ".join(f"{n} ({why}, log {study.out_dir / n / 'train.log'})"
                                                     for n, why in failed.items()))
    return result


# ----------------------------------------------------------------------------- aggregation
def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval (Student t, n - 1 degrees of
    freedom; 0 for one value)."""
    xs = [v for v in values if v is not None and math.isfinite(v)]
    n = len(xs)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(xs) / n
    if n == 1:
        return mean, 0.0
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    t = T975[n - 2] if n - 1 <= len(T975) else 1.96
    return mean, t * sd / math.sqrt(n)


def read_run(run: Run, headline: str = "accuracy") -> dict | None:
    """A finished run's summary, evaluation curve (of ``headline``) and mean diagnostics (None if
    not finished)."""
    summary = summary_of(run)
    if summary is None:
        return None
    records = MetricsLog(run.out / "metrics.jsonl").records()
    steps = [r for r in records if not r.get("eval")]
    diag = {}
    for k in DIAGNOSTICS + tuple(sorted({k for r in steps for k in r if k.startswith("groups_equal_frac/")})):
        vals = [r[k] for r in steps if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])]
        if vals:
            diag[k] = sum(vals) / len(vals)
    curve = [(r["step"], r.get(f"eval/{headline}")) for r in records if r.get("eval")]
    return {"summary": summary, "curve": curve, "diag": diag}


def aggregate(study: Study) -> dict:
    """Write runs.csv, curves.csv, results.md and the plots from the finished runs."""
    data = {r.name: read_run(r, study.headline) for r in study.runs}
    done = [r for r in study.runs if data[r.name] is not None]
    if not done:
        raise StudyError(f"study {study.out_dir}: no finished run to aggregate")
    finals_of = {r.name: data[r.name]["summary"]["final"] for r in done}
    levels = sorted({int(k[len("n/L"):]) for f in finals_of.values() for k in f if k.startswith("n/L")})
    metrics = list(dict.fromkeys(m for r in done for m in metric_names(data[r.name]["summary"]["final"])))
    finals = {}
    start_keys = headline_keys(study, levels) if study.headline != "accuracy" else []
    for r in done:
        final = finals_of[r.name]
        row = {"arm": r.arm, "seed": r.seed, "algo": r.config.algo, "lr": r.config.lr}
        for m in metrics:
            for suffix in [""] + [f"/L{lv}" for lv in levels]:
                row[m + suffix] = final.get(m + suffix)
                row[f"{m}_se{suffix}"] = final.get(f"{m}_se{suffix}")
        start = data[r.name]["summary"].get("start", {})
        row["start_accuracy"] = start.get("accuracy")
        for key in start_keys:
            row[f"start_{key}"] = start.get(key)
        row.update({f"mean_{k}": v for k, v in data[r.name]["diag"].items()})
        finals[r.name] = row
    study.report_dir.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for row in finals.values() for k in row))
    write_csv(study.report_dir / "runs.csv", columns, finals.values())
    write_csv(study.report_dir / "curves.csv", ["arm", "seed", "step", study.headline],
              [{"arm": r.arm, "seed": r.seed, "step": step, study.headline: acc}
               for r in done for step, acc in data[r.name]["curve"]])
    arms = [a for a in study.arms if any(r.arm == a for r in done)]
    table: dict[str, dict[str, tuple[float, float]]] = {}
    for arm in arms:
        rows = [finals[r.name] for r in done if r.arm == arm]
        table[arm] = {k: mean_ci([row.get(k) for row in rows]) for k in columns
                      if k not in ("arm", "seed", "algo", "lr") and "_se" not in k}
        table[arm]["seeds"] = (len(rows), 0.0)
    budget = budget_of(done[0].config)
    diffs = {(a, b): {key: paired_difference([finals[r.name] for r in done], a, b, key)
                      for key in headline_keys(study, levels)
                      + ([study.verdict.metric] if study.verdict and study.verdict.pair == (a, b) else [])}
             for a, b in study.pairs}
    md = results_markdown(study, arms, table, metrics, levels, budget, diffs)
    write_atomic(study.report_dir / "results.md", md)
    plots = plot_study(study, arms, data, done, table, levels)
    print(md, flush=True)
    return {"table": table, "runs": finals, "markdown": md, "plots": plots, "pairs": diffs,
            "verdict": verdict_line(study, diffs)}


def headline_keys(study: Study, levels) -> list[str]:
    """The headline metric overall and at each level: ``mean@8_T0.6``, ``mean@8_T0.6/L2``, ..."""
    return [study.headline] + [f"{study.headline}/L{lv}" for lv in levels]


def paired_difference(rows: list[dict], a: str, b: str, key: str) -> tuple[float, float, int]:
    """``key`` of arm ``a`` minus arm ``b``, paired by seed (the same seed: the same starting
    student, training prompts and sampling streams where the arms draw alike): the mean difference,
    the half-width of its 95% CI (Student t over the seeds both arms finished) and their number."""
    of = {arm: {row["seed"]: row.get(key) for row in rows if row["arm"] == arm} for arm in (a, b)}
    diffs = [of[a][s] - of[b][s] for s in sorted(set(of[a]) & set(of[b]))
             if isinstance(of[a][s], (int, float)) and isinstance(of[b][s], (int, float))
             and math.isfinite(of[a][s]) and math.isfinite(of[b][s])]
    mean, half = mean_ci(diffs)
    return mean, half, len(diffs)


def verdict_line(study: Study, diffs: dict) -> str | None:
    """The pre-registered verdict (``Verdict.decide``) on the finished runs, or None without one."""
    v = study.verdict
    if v is None:
        return None
    return v.decide(*diffs[v.pair][v.metric])


def write_csv(path: Path, columns: list[str], rows) -> None:
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    w.writeheader()
    for row in rows:
        w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    write_atomic(path, buf.getvalue())


def _ci(cell: tuple[float, float]) -> str:
    mean, half = cell
    return "n/a" if not math.isfinite(mean) else f"{mean:.3f} ± {half:.3f}"


def results_markdown(study: Study, arms, table, metrics, levels, budget, diffs=None) -> str:
    lrs = {a: sorted({r.config.lr for r in study.runs if r.arm == a}) for a in arms}
    head = ["arm", "lr", "seeds", "start"] + [f"{m}" for m in metrics] + [f"accuracy L{lv}" for lv in levels]
    rows = [[a, ", ".join(f"{x:g}" for x in lrs[a]), int(table[a]["seeds"][0]), _ci(table[a]["start_accuracy"])]
            + [_ci(table[a][m]) for m in metrics] + [_ci(table[a].get(f"accuracy/L{lv}", (math.nan, 0)))
                                                     for lv in levels] for a in arms]
    diag = [k for k in DIAGNOSTICS if any(f"mean_{k}" in table[a] for a in arms)]
    drows = [[a] + [_ci(table[a][f"mean_{k}"]) if f"mean_{k}" in table[a] else "" for k in diag] for a in arms]
    level_diag = sorted({k for a in arms for k in table[a] if k.startswith("mean_groups_equal_frac/")})
    text = (f"# Study {study.report_dir}\n\nFinal held-out accuracy (greedy unless named), mean ± 95% CI across "
            f"seeds (Student t). Budget per run: {budget['steps']} steps x {budget['responses_per_step']} responses, "
            f"{budget['optimizer_steps']} optimizer steps, max {budget['max_new_tokens']} new tokens.\n\n"
            f"{markdown_table(head, rows)}\n")
    if study.headline != "accuracy":
        h, keys = study.headline, headline_keys(study, levels)
        hrows = [[a] + [_ci(table[a].get(k, (math.nan, 0))) for k in keys] for a in arms]
        if arms:  # the step-0 evaluation: the same student in every arm, sampled with each seed's stream
            hrows.insert(0, ["before RL (step 0)"] + [_ci(table[arms[0]].get(f"start_{k}", (math.nan, 0)))
                                                      for k in keys])
        text += (f"\nHeadline, {h} per level (mean ± 95% CI across seeds):\n\n"
                 f"{markdown_table(['arm', h] + [f'L{lv}' for lv in levels], hrows)}\n")
    if diffs:
        keys = headline_keys(study, levels)
        prow = [[f"{a} - {b}", str(max(d[k][2] for k in keys))]
                + [_ci(d[k][:2]) if d[k][2] else "n/a" for k in keys] for (a, b), d in diffs.items()]
        text += (f"\nPaired differences by seed (a - b on the same seed; mean ± 95% CI across seeds):\n\n"
                 f"{markdown_table(['a - b', 'seeds'] + keys, prow)}\n")
    if study.verdict is not None:
        text += f"\n**Verdict (pre-registered in the study file):** {verdict_line(study, diffs or {})}\n"
    text += (f"\nTraining diagnostics (per-step values averaged over each run, then mean ± 95% CI across seeds; "
             f"rlad/diagnostics.py defines them):\n\n{markdown_table(['arm'] + diag, drows)}\n")
    if level_diag:
        lrows = [[a] + [_ci(table[a][k]) if k in table[a] else "" for k in level_diag] for a in arms]
        text += (f"\nShare of groups with all-equal rewards, per level:\n\n"
                 f"{markdown_table(['arm'] + [k.split('/')[-1] for k in level_diag], lrows)}\n")
    return text


def plot_study(study: Study, arms, data, done, table, levels) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for arm in arms:
        by_step: dict[int, list[float]] = {}
        for r in done:
            if r.arm == arm:
                for s, a in data[r.name]["curve"]:
                    by_step.setdefault(s, []).append(a)
        steps = sorted(by_step)
        cis = [mean_ci(by_step[s]) for s in steps]
        mean = [c[0] for c in cis]
        ax.plot(steps, mean, marker="o", markersize=3, label=arm)
        ax.fill_between(steps, [m - c[1] for m, c in zip(mean, cis, strict=True)],
                        [m + c[1] for m, c in zip(mean, cis, strict=True)], alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel(f"held-out {study.headline}" + (" (greedy)" if study.headline == "accuracy" else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"held-out {study.headline}, mean ± 95% CI across seeds")
    fig.tight_layout()
    out.append(str(save_figure(fig, study.report_dir / "accuracy.png")))
    if levels:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        width = 0.8 / max(1, len(arms))
        for i, arm in enumerate(arms):
            cells = [table[arm].get(f"{study.headline}/L{lv}", (math.nan, 0.0)) for lv in levels]
            xs = [j + (i - (len(arms) - 1) / 2) * width for j in range(len(levels))]
            ax.bar(xs, [c[0] for c in cells], width, yerr=[c[1] for c in cells], capsize=3, label=arm)
        ax.set_xticks(range(len(levels)), [f"level {lv}" for lv in levels])
        ax.set_ylabel(f"final held-out {study.headline}")
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
        ax.set_title(f"final {study.headline} per level, mean ± 95% CI across seeds")
        fig.tight_layout()
        out.append(str(save_figure(fig, study.report_dir / "levels.png")))
    return out
