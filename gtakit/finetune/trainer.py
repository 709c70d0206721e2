"""The uptraining loop (`gtakit finetune`): accelerate for devices, precision, accumulation and checkpoints."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from gtakit.errors import GtakitError
from gtakit.evaluate.windows import sequence_nll
from gtakit.families.folders import check_model_folder
from gtakit.io import DTYPES
from gtakit.io.output import follow_umask, terminate_as_interrupt
from gtakit.io.source import vocab_size

from .data import RowSampler, load_packed_data, resolve_files
from .export import output_folder
from .modes import (AttentionOutputs, apply_mode, attention_attribute, attention_matching, attention_modules,
                    count_parameters, cross_entropy, distillation_kl)
from .recipe import Recipe

STATE_FILE = "trainer_state.json"  # written last: a checkpoint without it is incomplete and ignored


@dataclass
class TrainerState:
    """Progress saved with every checkpoint (accelerate saves model, optimiser, RNG; this is the rest)."""

    step: int = 0
    tokens: int = 0
    history: list = field(default_factory=list)  # one record per optimiser step
    evals: list = field(default_factory=list)  # {"step", "tokens", "perplexity"}
    before_perplexity: float | None = None
    teacher_perplexity: float | None = None
    recovery_before: dict | None = None
    train_seconds: float = 0.0

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)


def latest_checkpoint(folder: Path) -> Path | None:
    done = sorted(p for p in folder.glob("step_*") if (p / STATE_FILE).exists()) if folder.is_dir() else []
    return done[-1] if done else None


def resolve_teacher(spec: str, model_path: str) -> str | None:
    """'source' -> what the converted folder was made from (None = the bundled SmolLM2 GGUF)."""
    if spec != "source":
        return spec
    from gtakit.evaluate import conversion_source

    try:
        return conversion_source(model_path)
    except GtakitError as err:
        raise GtakitError(f"teacher.model 'source': {err}") from None


def preflight(recipe: Recipe, resume: bool) -> None:
    """Everything that can fail without loading a model fails here, before any work."""
    if resume:
        _refuse_fixed_changes(recipe, recipe.checkpoint_dir)
    resolve_files(recipe.data.train, "data.train")
    resolve_files(recipe.data.eval, "data.eval")
    for path in recipe.recovery.text:
        if not Path(path).expanduser().is_file():
            raise GtakitError(f"recipe key 'recovery.text': {path} is not a file")
    model_path = Path(recipe.model.path).expanduser()
    if model_path.exists() and not (model_path / "config.json").exists():
        raise GtakitError(f"model.path {model_path} has no config.json; give a converted model folder")
    if not model_path.exists() and (recipe.model.path.startswith((".", "/", "~")) or recipe.model.path.count("/") > 1):
        raise GtakitError(f"model.path {model_path} does not exist; convert a model first (gtakit convert)")
    if not model_path.exists():  # a Hub id: fetch (or find in the cache) now, not after the data are tokenised
        from gtakit.io.source import resolve_hub

        resolve_hub(recipe.model.path)
    check_model_folder(model_path, "model.path")  # weights that match the config and are finite
    if uses_teacher(recipe):
        teacher = resolve_teacher(recipe.teacher.model, recipe.model.path)
        check_model_folder(teacher, "teacher.model")
        mine, theirs = vocab_size(model_path), vocab_size(teacher)
        if mine and theirs and mine != theirs:  # distillation compares logits token by token
            raise GtakitError(f"teacher.model {teacher} has a vocabulary of {theirs} tokens and model.path one of "
                              f"{mine}; distil from a teacher with the same tokenizer")
    output_folder(recipe).check()
    if recipe.log.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise GtakitError("log.tensorboard needs tensorboard: pip install tensorboard") from None
    ckpt = recipe.checkpoint_dir
    if resume and latest_checkpoint(ckpt) is None:
        raise GtakitError(f"--resume: no complete checkpoint in {ckpt}")
    if not resume and latest_checkpoint(ckpt) is not None and not recipe.output.force:
        raise GtakitError(f"{ckpt} holds checkpoints of an earlier run: pass --resume to continue it, or "
                          "output.force=true to start over")
    if ckpt.exists() and not ckpt.is_dir():
        raise GtakitError(f"checkpoint.dir {ckpt} is a file; give a folder")
    foreign = _foreign_entries(ckpt)
    if foreign:
        raise GtakitError(f"checkpoint.dir {ckpt} holds files gtakit did not write ({foreign[0].name}, ...); "
                          "give an empty or new folder")


# Recipe keys a checkpoint fixes: the optimiser and the schedule resume from it, so a new value would not be
# used, only recorded.
FIXED_ON_RESUME = ("lr", "min_lr_ratio", "schedule", "warmup_steps", "weight_decay", "betas")


def _refuse_fixed_changes(recipe: Recipe, ckpt: Path) -> None:
    import yaml

    saved = ckpt / "recipe.yaml"
    if not saved.is_file():
        return
    before = (yaml.safe_load(saved.read_text()) or {}).get("train", {})
    now = recipe.to_dict()["train"]
    changed = [key for key in FIXED_ON_RESUME if key in before and before[key] != now[key]]
    if changed:
        key = changed[0]
        raise GtakitError(f"--resume continues the checkpoint's optimiser and schedule, so train.{key} stays "
                          f"{before[key]} (the recipe now says {now[key]}); resume without changing it, or start "
                          "over with output.force=true")


# What a run writes into its checkpoint folder; starting over (output.force=true) removes only these.
RUN_ENTRIES = ("step_*", "recipe.yaml", "runs", "data-*.pt", "data-*.tmp")


def _run_entries(ckpt: Path) -> set[Path]:
    return {entry for pattern in RUN_ENTRIES for entry in ckpt.glob(pattern)} if ckpt.is_dir() else set()


def _foreign_entries(ckpt: Path) -> list[Path]:
    if not ckpt.is_dir():
        return []
    return sorted(set(ckpt.iterdir()) - _run_entries(ckpt))


def warmup_steps(recipe: Recipe, total_steps: int) -> int:
    t = recipe.train
    return t.warmup_steps if t.warmup_steps is not None else max(0, round(0.05 * total_steps))


def lr_factor(step: int, warmup: int, total: int, schedule: str, floor: float) -> float:
    """The learning rate of optimiser step `step + 1` (`step` steps taken) as a fraction of train.lr: a linear
    warm-up whose first step already trains (1/warmup, ..., 1 at step `warmup`), then cosine down to `floor`,
    linear down to 0 (reached one step after the last) or constant."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def _scheduler(recipe: Recipe, optimizer, total_steps: int):
    from functools import partial

    from torch.optim.lr_scheduler import LambdaLR

    t = recipe.train
    factor = partial(lr_factor, warmup=warmup_steps(recipe, total_steps), total=total_steps, schedule=t.schedule,
                     floor=t.min_lr_ratio if t.schedule == "cosine" else 0.0)
    return LambdaLR(optimizer, factor)


def total_steps(recipe: Recipe, num_processes: int) -> int:
    t = recipe.train
    if t.max_steps is not None:
        return t.max_steps
    per_step = t.seq_len * t.micro_batch * t.grad_accum * num_processes
    return max(1, math.ceil(t.tokens / per_step))


@torch.no_grad()
def evaluate_perplexity(model, rows: torch.Tensor, batch: int, accelerator) -> float:
    """Perplexity of `rows` (each scored on its own, like `gtakit eval`), split over processes. Every process runs
    the same number of forward passes (FSDP needs that); padding rows have weight 0."""
    was_training = model.training
    model.eval()
    world, rank = accelerator.num_processes, accelerator.process_index
    per_process = math.ceil(len(rows) / world)
    indices = list(range(rank, len(rows), world))
    weights = [1.0] * len(indices) + [0.0] * (per_process - len(indices))
    indices += [0] * (per_process - len(indices))
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    for start in range(0, per_process, batch):
        ids = rows[indices[start : start + batch]].long().to(accelerator.device)
        weight = torch.tensor(weights[start : start + batch], dtype=torch.float64, device=accelerator.device)
        total[0] += (sequence_nll(model, ids) * weight).sum()
        total[1] += weight.sum() * (ids.shape[1] - 1)
    total = accelerator.reduce(total, reduction="sum")
    model.train(was_training)
    return math.exp(float(total[0] / total[1]))


@torch.no_grad()
def teacher_perplexity(teacher, rows: torch.Tensor, batch: int, device) -> float:
    nll, count = 0.0, 0
    for start in range(0, len(rows), batch):
        ids = rows[start : start + batch].long().to(device)
        nll += float(sequence_nll(teacher, ids).sum())
        count += ids.shape[0] * (ids.shape[1] - 1)
    return math.exp(nll / count)


def finetune(
    recipe: Recipe,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    callback: Callable[[int, dict], None] | None = None,
) -> dict:
    """Uptrain `recipe.model.path` and write `recipe.output.dir`; returns the report written to conversion.json
    plus `history` (one record per optimiser step) on the main process, {} on the others.

    `callback(step, record)` runs after every optimiser step (and its checkpoint); raising from it stops the run
    there, which is how tests simulate an interruption. A run that fails or is stopped (Ctrl-C, SIGTERM) before
    its first checkpoint removes the checkpoint folder it created; later ones stay for --resume."""
    started = time.time()
    preflight(recipe, resume)
    ckpt = recipe.checkpoint_dir
    created = not ckpt.exists()
    try:
        with terminate_as_interrupt():
            return _finetune(recipe, resume, progress, log, callback, started)
    except BaseException as err:
        if created and latest_checkpoint(ckpt) is None:
            shutil.rmtree(ckpt, ignore_errors=True)
        elif isinstance(err, KeyboardInterrupt) and latest_checkpoint(ckpt) is not None:
            note = f"the checkpoints in {ckpt} were kept: continue with --resume"
            raise type(err)(f"{err}; {note}" if str(err) else note) from None
        raise


@dataclass
class Run:
    """What one uptraining run holds between its phases (setup, start or resume, train, save)."""

    recipe: Recipe
    accelerator: Any
    say: Callable[[str], None]
    tokenizer: Any
    data: Any
    model: Any
    teacher: Any
    teacher_device: torch.device | None
    matched_attention: tuple[list, list] | None  # (student's, teacher's) attention modules for loss.attention_weight
    scorer: Any
    optimizer: Any
    scheduler: Any
    steps: int
    state: TrainerState


def _finetune(recipe: Recipe, resume: bool, progress: bool, log, callback, started: float) -> dict:
    run = _setup(recipe, resume, log)
    _start_or_resume(run, resume)
    _train(run, progress, callback)
    return _save(run, started)


def _setup(recipe: Recipe, resume: bool, log) -> Run:
    """The accelerator, the checkpoint folder, data, student, teacher, recovery scorer, optimiser and schedule."""
    from accelerate.utils import set_seed
    from transformers import AutoTokenizer

    accelerator = _accelerator(recipe)
    say = (log or (lambda message: None)) if accelerator.is_main_process else (lambda message: None)
    _prepare_checkpoint_dir(recipe, accelerator, resume, say)
    set_seed(recipe.train.seed)
    t = recipe.train
    tokenizer = AutoTokenizer.from_pretrained(recipe.model.path)
    cache_dir = Path(recipe.data.cache_dir).expanduser() if recipe.data.cache_dir else recipe.checkpoint_dir
    teacher, teacher_device = _teacher(recipe, accelerator)
    data = load_packed_data(recipe.data, tokenizer, t.seq_len, cache_dir, accelerator,
                            _sample_writer(recipe, teacher, teacher_device, tokenizer, say),
                            samples_key=f"{resolve_teacher(recipe.teacher.model, recipe.model.path)}:{t.seed}")
    if recipe.loss.kind == "ce":  # the teacher only wrote samples: free its memory before training
        teacher = teacher_device = None
    say(f"accelerate: {accelerator.distributed_type.value} over {accelerator.num_processes} process(es) on "
        f"{accelerator.device.type}")
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and accelerator.distributed_type.value != "FSDP":
        say("warning: an FSDP config was launched but accelerate runs FSDP only on GPUs; this run is plain data "
            "parallel (every process holds the whole model)")
    say(f"data: {len(data.train)} training and {len(data.eval)} evaluation sequences of {t.seq_len} tokens")
    model = _student(recipe, say)
    matched_attention = _matched_attention(recipe, model, teacher)
    scorer = _recovery_scorer(recipe, tokenizer, data, teacher, accelerator)
    recovery_before = None
    if scorer is not None and not resume:
        recovery_before = scorer.score(model)
        say(f"before uptraining, against {scorer.source_name}: KL {recovery_before['kl']:.4f} nats/token, top-1 "
            f"{recovery_before['top1_agreement']:.1%}")
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay
    )
    steps = total_steps(recipe, accelerator.num_processes)
    if warmup_steps(recipe, steps) > steps:
        say(f"warning: train.warmup_steps {warmup_steps(recipe, steps)} is longer than the run's {steps} steps; the "
            "learning rate never reaches train.lr")
    # The scheduler is not passed to prepare(): accelerate would step it once per process; here it steps once
    # per optimiser step. It and the trainer state are checkpointed as JSON, not as accelerate custom objects:
    # accelerate unpickles those (weights_only=False), so a tampered checkpoint could run code on --resume.
    scheduler = _scheduler(recipe, optimizer, steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    if recipe.log.tensorboard:
        accelerator.init_trackers("gtakit-finetune", config=_flat(recipe.to_dict()))
    return Run(recipe, accelerator, say, tokenizer, data, model, teacher, teacher_device, matched_attention, scorer,
               optimizer, scheduler, steps, TrainerState(recovery_before=recovery_before))


def _matched_attention(recipe: Recipe, model, teacher) -> tuple[list, list] | None:
    """The student's and the teacher's attention modules, layer for layer, when loss.attention_weight needs them;
    refused before any training when the two do not pair up."""
    if not recipe.loss.attention_weight:
        return None
    attribute = attention_attribute(model)
    student, theirs = attention_modules(model, attribute), attention_modules(teacher, attribute)
    if not student or len(student) != len(theirs):
        raise GtakitError(f"loss.attention_weight: the model has {len(student)} '{attribute}' attention modules and "
                          f"the teacher {len(theirs)}; match them with a teacher of the same family and layers, or "
                          "set loss.attention_weight 0")
    return student, theirs


def _accelerator(recipe: Recipe):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    t, ckpt_dir = recipe.train, recipe.checkpoint_dir
    log_dir = Path(recipe.log.dir).expanduser() if recipe.log.dir else ckpt_dir / "runs"
    accelerator = Accelerator(
        mixed_precision=t.precision,
        gradient_accumulation_steps=t.grad_accum,
        log_with="tensorboard" if recipe.log.tensorboard else None,
        project_config=ProjectConfiguration(project_dir=str(ckpt_dir), logging_dir=str(log_dir)),
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        # e.g. `accelerate launch --multi_gpu` on a machine without GPUs: every process would train alone and
        # write the same files
        raise GtakitError(f"launched as {launched} processes but accelerate set up {accelerator.num_processes}; on "
                          "a CPU-only machine launch with ACCELERATE_USE_CPU=true")
    return accelerator


def _prepare_checkpoint_dir(recipe: Recipe, accelerator, resume: bool, say: Callable[[str], None]) -> None:
    ckpt_dir = recipe.checkpoint_dir
    if accelerator.is_main_process:
        if not resume:  # start over: only what an earlier run wrote (preflight refused anything else)
            for entry in _run_entries(ckpt_dir):
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        _check_resumed_recipe(recipe, ckpt_dir, resume, say)
    accelerator.wait_for_everyone()


def _student(recipe: Recipe, say: Callable[[str], None]):
    """The converted model to train, in training mode with the recipe's parameters trainable."""
    from transformers import AutoModelForCausalLM

    import gtakit  # noqa: F401 - registers the gtakit architectures

    model = AutoModelForCausalLM.from_pretrained(recipe.model.path, dtype=DTYPES[recipe.model.dtype])
    if getattr(model.config, "model_type", "") != "gtakit":
        raise GtakitError(f"{recipe.model.path} is not a gtakit model ({model.config.model_type}); convert it first")
    if recipe.train.gradient_checkpointing:
        enable_checkpointing(model)
    model.config.use_cache = False
    model = apply_mode(model, recipe.train.mode, recipe.lora)
    model.train()
    trainable, everything = count_parameters(model)
    say(f"mode {recipe.train.mode}: {trainable:,} of {everything:,} parameters train ({trainable / everything:.1%})")
    return model


def uses_teacher(recipe: Recipe) -> bool:
    """Distillation reads the teacher's logits; data.teacher_samples has it write training text."""
    return recipe.loss.kind != "ce" or bool(recipe.data.teacher_samples)


def _teacher(recipe: Recipe, accelerator) -> tuple[Any, torch.device | None]:
    """The teacher, frozen on its device (None when the recipe does not use one)."""
    if not uses_teacher(recipe):
        return None, None
    from gtakit.evaluate import load_model

    spec = resolve_teacher(recipe.teacher.model, recipe.model.path)
    teacher = load_model(spec if spec is not None else str(_bundled()), dtype=DTYPES[recipe.teacher.dtype])[0]
    device = accelerator.device if recipe.teacher.device == "auto" else torch.device(recipe.teacher.device)
    teacher.to(device).eval().requires_grad_(False)
    return teacher, device


def _start_or_resume(run: Run, resume: bool) -> None:
    """Resume from the latest checkpoint, or measure the starting perplexity (and the teacher's)."""
    recipe, accelerator, state = run.recipe, run.accelerator, run.state
    if resume:
        last = latest_checkpoint(recipe.checkpoint_dir)
        _refuse_pickled_objects(last)
        accelerator.load_state(str(last))  # model, optimiser, RNG: tensors only (weights_only=True)
        _load_progress(last, state, run.scheduler)
        run.say(f"resumed from {last} at step {state.step} ({state.tokens:,} tokens)")
        return
    state.before_perplexity = evaluate_perplexity(run.model, run.data.eval, recipe.eval.batch, accelerator)
    state.evals.append({"step": 0, "tokens": 0, "perplexity": state.before_perplexity})
    if run.teacher is not None and accelerator.is_main_process:
        state.teacher_perplexity = teacher_perplexity(run.teacher, run.data.eval, recipe.eval.batch, run.teacher_device)
    run.say(f"perplexity before uptraining: {state.before_perplexity:.3f}"
            + (f" (teacher {state.teacher_perplexity:.3f})" if state.teacher_perplexity else ""))


def _train(run: Run, progress: bool, callback) -> None:
    """Optimiser steps until the recipe's tokens are spent: log, evaluate and checkpoint as the recipe says."""
    recipe, accelerator, state, t = run.recipe, run.accelerator, run.state, run.recipe.train
    sampler = RowSampler(len(run.data.train), t.seed)
    tokens_per_step = t.seq_len * t.micro_batch * t.grad_accum * accelerator.num_processes
    bar = tqdm(total=run.steps, initial=state.step, desc="uptraining",
               disable=not (progress and accelerator.is_main_process))
    window_start, window_tokens = time.time(), 0
    while state.step < run.steps:
        step_start = time.time()
        record = _train_step(run, sampler)
        state.step += 1
        state.tokens += tokens_per_step
        state.train_seconds += time.time() - step_start
        window_tokens += tokens_per_step
        record = {"step": state.step, "tokens": state.tokens, **record}
        state.history.append(record)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
        last_step = state.step == run.steps
        if recipe.log.every and (state.step % recipe.log.every == 0 or last_step):
            rate = window_tokens / max(time.time() - window_start, 1e-9)
            record["tokens_per_s"] = rate
            parts = f" (attention {record['attention']:.4f})" if "attention" in record else ""
            run.say(f"step {state.step}/{run.steps} tokens {state.tokens:,} loss {record['loss']:.4f}{parts} "
                    f"lr {record['lr']:.2e} {rate:,.0f} tok/s")
            window_start, window_tokens = time.time(), 0
        if recipe.eval.every and state.step % recipe.eval.every == 0 and not last_step:
            ppl = evaluate_perplexity(run.model, run.data.eval, recipe.eval.batch, accelerator)
            state.evals.append({"step": state.step, "tokens": state.tokens, "perplexity": ppl})
            record["eval_perplexity"] = ppl
            run.say(f"step {state.step}: eval perplexity {ppl:.3f}")
        if recipe.log.tensorboard:
            accelerator.log({k: v for k, v in record.items() if k not in ("step",)}, step=state.step)
        if (recipe.checkpoint.every and state.step % recipe.checkpoint.every == 0) or last_step:
            _save_checkpoint(accelerator, recipe.checkpoint_dir, state, run.scheduler, recipe.checkpoint.keep)
        if callback is not None:
            callback(state.step, record)
    bar.close()


def _train_step(run: Run, sampler: RowSampler) -> dict:
    """One optimiser step over grad_accum micro-batches; the losses averaged over them and over processes, and
    the learning rate the step trained at."""
    t, accelerator, model = run.recipe.train, run.accelerator, run.model
    sums = torch.zeros(4, device=accelerator.device)  # loss, ce, kd, attention matching
    lr = run.scheduler.get_last_lr()[0]
    for micro in range(t.grad_accum):
        rows = sampler.micro_batch_rows(run.state.step, micro, t.grad_accum, t.micro_batch,
                                        accelerator.process_index, accelerator.num_processes)
        ids = run.data.train[rows].long().to(accelerator.device)
        with accelerator.accumulate(model):
            loss, ce, kd, attn = _loss(model, run.teacher, run.teacher_device, ids, run.recipe, run.matched_attention)
            accelerator.backward(loss)
            if accelerator.sync_gradients and t.grad_clip is not None:
                accelerator.clip_grad_norm_(model.parameters(), t.grad_clip)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
        sums += torch.stack([loss.detach(), ce.detach(), kd.detach(), attn.detach()]).float() / t.grad_accum
    if not accelerator.optimizer_step_was_skipped:
        run.scheduler.step()
    sums = accelerator.reduce(sums, reduction="mean")
    record = {"loss": float(sums[0]), "ce": float(sums[1]), "kd": float(sums[2]), "lr": lr}
    if run.recipe.loss.attention_weight:
        record["attention"] = float(sums[3])
    return record


def _save(run: Run, started: float) -> dict:
    """The final perplexity, then the uptrained folder (and its report) on the main process."""
    from .export import export_model

    recipe, accelerator, state = run.recipe, run.accelerator, run.state
    after = evaluate_perplexity(run.model, run.data.eval, recipe.eval.batch, accelerator)
    if not state.evals or state.evals[-1]["step"] != state.step:
        state.evals.append({"step": state.step, "tokens": state.tokens, "perplexity": after})
    run.say(f"perplexity: {state.before_perplexity:.3f} before -> {after:.3f} after {state.tokens:,} tokens")
    if recipe.log.tensorboard:
        accelerator.end_training()
    report = export_model(accelerator, run.model, recipe, run.tokenizer, state, after, run.data, started, run.say,
                          run.scorer)
    run.teacher = None
    accelerator.free_memory()
    # The per-step records stay out of conversion.json (long runs have many); callers get them here.
    return dict(report, history=state.history) if report else {}


def _sample_writer(recipe: Recipe, teacher, device, tokenizer, say: Callable[[str], None]):
    """What writes data.teacher_samples when the packed data are built (None when the recipe asks for none)."""
    d = recipe.data
    if not d.teacher_samples:
        return None
    from .samples import teacher_samples

    def write() -> list[torch.Tensor]:
        say(f"the teacher writes {d.teacher_samples:,} tokens of samples ({d.sample_length} tokens each at most)")
        return teacher_samples(teacher, device, tokenizer, d.teacher_samples, d.sample_length, d.sample_batch,
                               recipe.train.seed, progress=lambda n: say(f"teacher samples: {n:,} tokens"))
    return write


def _recovery_scorer(recipe: Recipe, tokenizer, data, teacher, accelerator):
    """The distance-to-source scorer on the main process (None elsewhere, or with recovery.against null)."""
    if recipe.recovery.against is None or not accelerator.is_main_process:
        return None
    from .recovery import RecoveryScorer

    spec = resolve_teacher(recipe.recovery.against, recipe.model.path)
    same_as_teacher = teacher is not None and spec == resolve_teacher(recipe.teacher.model, recipe.model.path)
    return RecoveryScorer(recipe, tokenizer, data.eval, spec, source=teacher if same_as_teacher else None)


def enable_checkpointing(model) -> None:
    """Activation (gradient) checkpointing under the name the installed transformers uses: 5.24 renamed
    `gradient_checkpointing_enable` to `activation_checkpointing_enable` and warns on the old one."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _check_resumed_recipe(recipe: Recipe, ckpt_dir: Path, resume: bool, say: Callable[[str], None]) -> None:
    """Keep the run's recipe beside its checkpoints; a resumed run that changes what is trained says so."""
    import yaml

    saved = ckpt_dir / "recipe.yaml"
    current = recipe.to_dict()
    if resume and saved.exists():
        before = yaml.safe_load(saved.read_text())
        changed = [f"{section}.{key}" for section in ("model", "teacher", "data", "train", "loss", "lora")
                   for key in current[section] if before.get(section, {}).get(key) != current[section][key]]
        if changed:
            say(f"warning: resuming with a recipe that differs from the checkpoint's in {', '.join(changed)}; "
                "the continued run is not the one that was interrupted")
    saved.write_text(recipe.to_yaml())


def _bundled() -> Path:
    from gtakit.io.source import bundled_smollm2

    return bundled_smollm2()


def _loss(model, teacher, teacher_device, ids: torch.Tensor, recipe: Recipe, matched_attention=None):
    """The step's loss and its parts: (loss, ce, kd, attention matching)."""
    kind, weight = recipe.loss.kind, recipe.loss.attention_weight
    student_modules, teacher_modules = matched_attention or ([], [])
    with AttentionOutputs(student_modules) as student_attn:
        logits = model(input_ids=ids, use_cache=False).logits
    zero = logits.new_zeros((), dtype=torch.float32)
    ce = cross_entropy(logits, ids) if kind in ("ce", "mix") else zero
    kd = attn = zero
    if kind in ("distill", "mix"):
        with torch.no_grad(), AttentionOutputs(teacher_modules) as teacher_attn:
            teacher_logits = teacher(input_ids=ids.to(teacher_device), use_cache=False).logits
        kd = distillation_kl(logits, teacher_logits.to(logits.device), recipe.loss.temperature)
        if weight:
            attn = attention_matching(student_attn.outputs, teacher_attn.outputs)
    if kind == "ce":
        loss = ce
    elif kind == "distill":
        loss = kd
    else:
        w = recipe.loss.distill_weight
        loss = (1.0 - w) * ce + w * kd
    return loss + weight * attn, ce, kd, attn


def _refuse_pickled_objects(checkpoint: Path) -> None:
    """accelerate unpickles `custom_checkpoint_*.pkl` with weights_only=False; gtakit never writes them."""
    custom = sorted(checkpoint.glob("custom_checkpoint_*"))
    if custom:
        raise GtakitError(f"{custom[0]} is not a file gtakit writes and would be unpickled (code could run); "
                          "remove it if you trust it, or start over with output.force=true")


def _load_progress(checkpoint: Path, state: TrainerState, scheduler) -> None:
    saved = json.loads((checkpoint / STATE_FILE).read_text())
    if "trainer" not in saved or "scheduler" not in saved:
        raise GtakitError(f"{checkpoint} was written by an older gtakit and cannot be resumed safely; start over "
                          "with output.force=true")
    state.load_state_dict(saved["trainer"])
    scheduler.load_state_dict(saved["scheduler"])


def _save_checkpoint(accelerator, folder: Path, state: TrainerState, scheduler, keep: int) -> None:
    target = folder / f"step_{state.step:08d}"
    accelerator.save_state(str(target))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        progress = {"trainer": state.state_dict(), "scheduler": scheduler.state_dict()}
        (target / STATE_FILE).write_text(json.dumps(progress))
        follow_umask(target)  # accelerate's safetensors files are 0600
        done = sorted(p for p in folder.glob("step_*") if (p / STATE_FILE).exists())
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _flat(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat
