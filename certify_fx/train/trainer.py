"""The recipe-driven GloRo trainer: one process, or many under ``torchrun`` (DDP).

Per step: the model's logits and the differentiable margin matrix ``K`` (power iteration with
persisted iterates) feed the recipe's loss. Per epoch: the proven bound certifies the test set;
metrics go to ``log.jsonl``, ``summary.csv`` (and TensorBoard) and the console; the checkpoint is
rewritten atomically. Batches are a pure function of ``(seed, epoch, step)`` (see
:mod:`.sampling`) and a checkpoint holds every process's random state, so a run resumed from any
step, including a checkpoint written on Ctrl-C or SIGTERM mid-epoch, repeats the uninterrupted
run exactly.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml
from rich.console import Console
from rich.table import Table
from timm.optim import create_optimizer_v2
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from ..bounds import bound as bound_model
from ..certificates import evaluate_certified
from ..errors import RecipeError, UnsupportedNodeError
from ..files import atomic_write_text
from ..losses import MARGIN_FREE_LOSSES, GloRo, create_loss, distillation, needs_features
from ..model_record import build_model, build_teacher
from ..progress import ProgressLike, progress_display
from ..recipe import Recipe, build_extra, build_split, recipe_dataset_info, recipe_from_dict
from ..schedules import eps_schedule, linear_ramp, lr_scheduler
from .checkpoint import load_checkpoint, save_checkpoint
from .distributed import DistributedContext, all_gather_objects, all_reduce_sum, shard
from .interrupt import StopRequest, TrainingInterrupted, leave_stops_to_the_trainer
from .run_dir import CHECKPOINT_NAME, LOG_NAME, RunDir, TensorBoardScalars
from .sampling import EpochBatches, MixedSampler, ResumableSampler, SeededSamples

__all__ = ["CHECKPOINT_NAME", "LOG_NAME", "Trainer", "TrainingInterrupted", "train"]


class LogitsAndMargin(nn.Module):
    """What DDP wraps: one forward gives the logits and the differentiable margin matrix, so the
    gradients of both reach the same (synchronised) parameters. Without ``gloro`` (a loss that
    ignores the margin, e.g. plain cross-entropy) the margin is ``None``. With ``features`` (a loss
    that trains on the classifier's input, CRC-Lip) the third output is that input, else ``None``."""

    def __init__(self, model: nn.Module, gloro: GloRo | None, autocast: bool, features: bool = False) -> None:
        super().__init__()
        self.model, self.gloro, self.autocast, self.features = model, gloro, autocast, features

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        amp = torch.autocast(x.device.type, dtype=torch.bfloat16) if self.autocast else nullcontext()
        features = None
        with amp:
            if self.features:
                features = self.model.forward_features(x)
                logits = self.model.forward_head(features)
            else:
                logits = self.model(x)
        features = features.float() if features is not None else None
        if self.gloro is None:
            return logits.float(), None, features
        with torch.autocast(x.device.type, enabled=False):
            margin = self.gloro.margin()  # the bound always in fp32
        return logits.float(), margin, features


# Keys that may change on resume without changing the result of the run.
_RESUMABLE_CHANGES = {"output_dir", "checkpoint_every", "checkpoint_every_steps", "device", "data.root",
                      "data.num_workers", "data.eval_batch_size", "bound.eval_every"}


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b, key = old.get(k), new.get(k), f"{prefix}{k}"
        if isinstance(a, dict) and isinstance(b, dict) and k not in ("kwargs", "options", "synthetic"):
            keys += _changed_keys(a, b, key + ".")
        elif a != b:
            keys.append(key)
    return keys


def _seed_epoch(seed: int, epoch: int, rank: int) -> None:
    torch.manual_seed(seed * 1_000_003 + epoch * 7919 + rank)


class Trainer:
    """Train ``recipe``; ``resume`` continues from a checkpoint written by an earlier run.

    Args:
        recipe: the run's settings.
        resume: a checkpoint to continue from, as a path or as read by :func:`load_checkpoint`
            (its weights, optimiser, power-iteration iterates, random state, metrics history and,
            for a checkpoint written mid-epoch, its position in the epoch are restored).
        console: where the live display goes (rank 0 only); ``None`` for a default console.
        trust_source: allow a recipe whose ``model.name`` is Python code to import it.
        overwrite: replace the results of an earlier run in the output folder (only its own files)
            instead of refusing to start.
        output_dir: where the run writes. Default: a resumed run continues in its checkpoint's
            folder (wherever that was moved), a new run uses ``recipe.output_dir``.
    """

    def __init__(self, recipe: Recipe, resume: str | Path | dict[str, Any] | None = None,
                 console: Console | None = None, trust_source: bool = False, overwrite: bool = False,
                 output_dir: str | Path | None = None) -> None:
        self.recipe = recipe
        self.ctx = DistributedContext.from_env(recipe.device)
        self.console = console or Console(stderr=False)
        state = load_checkpoint(resume, map_location="cpu") if isinstance(resume, (str, Path)) else resume
        here = Path(resume).parent if isinstance(resume, (str, Path)) else None
        self.run = RunDir(Path(output_dir if output_dir is not None else here or recipe.output_dir))
        recipe.output_dir = str(self.run.path)  # what recipe.yaml and the checkpoints record
        resuming_here = state is not None and (here is None or here.resolve() == self.run.path.resolve())
        if self.ctx.is_main:  # before anything slow: a refused folder fails at once
            self.run.claim(overwrite=overwrite, resuming_here=resuming_here)
        device = self.ctx.device
        torch.manual_seed(recipe.seed)  # identical initial weights on every process
        self.info = recipe_dataset_info(recipe)
        # Source weights are read at the start of a run only; a resumed run restores its own.
        self.model = build_model(recipe, source_weights=state is None, trust_source=trust_source).to(device)
        if state is not None and "distill" not in state["recipe"]:
            recipe.distill.teacher = "none"  # a run begun before distillation existed continues without it
        # the teacher's weights travel in the checkpoint: resuming needs only the run's own files
        self.teacher = build_teacher(recipe, trust_source, state.get("teacher") if state is not None else None)
        if self.teacher is not None:
            self.teacher.to(device)
        self.gloro = (GloRo(self.model, recipe.eps.eps, self.info.input_shape, recipe.bound.power_steps)
                      if recipe.loss.name not in MARGIN_FREE_LOSSES else None)
        self.head_loss = needs_features(recipe.loss.name)
        if self.head_loss and not callable(getattr(self.model, "forward_features", None)):
            raise RecipeError(f"loss {recipe.loss.name} trains on the classifier's input: the model needs timm's "
                              "forward_features / forward_head / get_classifier (e.g. lipconvnet_5 with head: mlp)")
        self.net = LogitsAndMargin(self.model, self.gloro, autocast=recipe.amp and device.type == "cuda",
                                   features=self.head_loss)
        self.loss_fn = create_loss(recipe.loss.name)

        self.test_set = build_split(recipe, "test")
        world = self.ctx.world_size
        if recipe.data.batch_size % world:
            raise RecipeError(f"data.batch_size {recipe.data.batch_size} is not divisible by {world} processes")
        self.train_set, self.sampler = self._training_data(build_split(recipe, "train"), build_extra(recipe), world)
        self.loader = DataLoader(SeededSamples(self.train_set, recipe.seed), batch_size=recipe.data.batch_size // world,
                                 sampler=self.sampler, drop_last=True, num_workers=recipe.data.num_workers,
                                 pin_memory=device.type == "cuda", worker_init_fn=leave_stops_to_the_trainer)
        self.steps_per_epoch = len(self.loader)
        if self.steps_per_epoch == 0:
            raise RecipeError(f"data.batch_size {recipe.data.batch_size} exceeds the {len(self.train_set)} "
                              "training examples")

        o = recipe.optim
        try:
            self.optimizer = create_optimizer_v2(self.model, opt=o.opt, lr=o.lr, weight_decay=o.weight_decay)
        except (ValueError, KeyError, AssertionError) as exc:
            raise RecipeError(f"recipe key 'optim.opt': cannot create optimizer {o.opt!r} with timm.optim ({exc})") from None
        self.scheduler = lr_scheduler(o.schedule, self.optimizer, recipe.epochs * self.steps_per_epoch,
                                      warmup_steps=round(o.warmup_epochs * self.steps_per_epoch),
                                      warmup_lr=o.warmup_lr, min_lr=o.min_lr, decay_rate=o.decay_rate,
                                      milestone_steps=[round(e * self.steps_per_epoch) for e in o.decay_milestones])
        self.ddp = (DistributedDataParallel(self.net, device_ids=[device.index] if device.type == "cuda" else None)
                    if self.ctx.distributed else self.net)

        self.epoch, self.step, self.history = 0, 0, []
        self._partial: dict[str, Any] | None = None  # this process's progress through an unfinished epoch
        self.resumed_changes: list[str] = []  # recipe keys that differ from the checkpoint's
        self.stop = StopRequest(self.ctx)
        if state is not None:
            self._restore(state)
        self.scheduler.step_update(self.step)

    # -- state ------------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        """Every epoch of the recipe has been trained."""
        return self.epoch >= self.recipe.epochs

    def state_dict(self, partial: dict[str, Any] | None = None) -> dict[str, Any]:
        """The run's state; ``partial`` is this process's progress through an unfinished epoch.

        Collective under ``torchrun``: every process contributes its random state (and progress).
        """
        rng = {"cpu": torch.get_rng_state()}
        if self.ctx.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.ctx.device)
        processes = all_gather_objects({"rng": rng, "partial": partial}, self.ctx)
        return {
            "recipe": self.recipe.to_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "steps_per_epoch": self.steps_per_epoch,
            "model": self.model.state_dict(),
            "bound": self.gloro.compiler.state_dict() if self.gloro is not None else {},
            "optimizer": self.optimizer.state_dict(),
            "history": self.history,
            "processes": processes,
            **({"teacher": self.teacher.state_dict()} if self.teacher is not None else {}),
        }

    def _restore(self, state: dict[str, Any]) -> None:
        self.resumed_changes = _changed_keys(state["recipe"], self.recipe.to_dict())
        self.model.load_state_dict(state["model"])
        if self.gloro is not None:
            self.gloro.compiler.load_state_dict(state["bound"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.step, self.history = int(state["epoch"]), int(state["step"]), list(state["history"])
        written = int(state.get("steps_per_epoch", self.step // max(self.epoch, 1)))
        if written != self.steps_per_epoch or not 0 <= self.step - self.epoch * self.steps_per_epoch < written:
            raise RecipeError(f"the checkpoint was written with {written} steps per epoch, this recipe makes "
                              f"{self.steps_per_epoch}: resume with the same data, batch size and processes")
        processes = state.get("processes") or []
        if len(processes) == self.ctx.world_size:
            mine = processes[self.ctx.rank]
            self._partial = mine["partial"]
            if self._partial is not None:  # mid-epoch: continue with the random state it had
                self._partial["rng"] = mine["rng"]
        elif processes and any(p["partial"] for p in processes):
            raise RecipeError(f"the checkpoint was written mid-epoch by {len(processes)} process(es); "
                              f"resume it with the same number (not {self.ctx.world_size})")

    def _set_rng(self, rng: dict[str, torch.Tensor]) -> None:
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and self.ctx.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.ctx.device)

    def save(self, partial: dict[str, Any] | None = None) -> Path:
        """Write the checkpoint (atomically; collective under ``torchrun``); returns its path."""
        state = self.state_dict(partial)
        if self.ctx.is_main:
            save_checkpoint(self.run.checkpoint, state)
        return self.run.checkpoint

    # -- training ---------------------------------------------------------------------------
    def _training_data(self, real: Dataset, extra: Dataset | None, world: int) -> tuple[Dataset, ResumableSampler]:
        """The training set and its sampler: shuffled, sharded, resumable; with extra data, a
        concatenation whose sampler mixes the extra images into each batch at ``data.extra.ratio``
        (the real images decide the epoch's length)."""
        r = self.recipe
        if extra is None:
            return real, ResumableSampler(real, num_replicas=world, rank=self.ctx.rank, shuffle=True, seed=r.seed,
                                          drop_last=True)
        per_process = r.data.batch_size // world
        extra_per_batch = min(max(round(per_process * r.data.extra.ratio), 1), per_process - 1)
        return ConcatDataset([real, extra]), MixedSampler(len(real), len(extra), per_process, extra_per_batch,
                                                           num_replicas=world, rank=self.ctx.rank, shuffle=True,
                                                           seed=r.seed)

    def _train_size(self) -> str:
        if isinstance(self.sampler, MixedSampler):
            return (f"{self.sampler.real_size} + {self.sampler.extra_size} extra, "
                    f"{self.sampler.extra_per_batch}/{self.sampler.batch_size} per batch")
        return str(len(self.train_set))

    def _loss_options(self, progress: float) -> dict[str, Any]:
        lc = self.recipe.loss
        options = dict(lc.options)
        if lc.lam_start is not None:
            options["lam"] = linear_ramp(lc.lam_start, float(options.get("lam", 1.0)), progress,
                                         lc.lam_epochs if lc.lam_epochs is not None else self.recipe.epochs / 2)
        return options

    def train_epoch(self, progress: ProgressLike | None = None) -> dict[str, float]:
        """Train the rest of the current epoch (all of it, unless resumed mid-epoch).

        Raises:
            TrainingInterrupted: on SIGINT/SIGTERM, after checkpointing the step just finished.
        """
        r, epoch = self.recipe, self.epoch
        partial, self._partial = self._partial or {}, None
        done = int(partial.get("batches", 0))
        _seed_epoch(r.seed, epoch, self.ctx.rank)
        self.sampler.set_epoch(epoch)
        self.sampler.start_at(done * self.loader.batch_size)
        batches = EpochBatches(self.loader)  # draws the loader's base seed: before the random state is restored
        if "rng" in partial:
            self._set_rng(partial["rng"])
        self.net.train()
        task = (progress.add_task(f"epoch {epoch + 1}/{r.epochs}", total=self.steps_per_epoch, completed=done,
                                  info="") if progress else None)
        sums = {k: float(partial.get(k, 0.0)) for k in ("loss_sum", "correct", "count")}
        eps_t, k_max = float(partial.get("eps_t", math.nan)), float(partial.get("k_max", math.nan))
        with batches:
            i = done - 1
            for i, (x, y) in enumerate(self._until_stopped(batches), start=done):
                x, y = x.to(self.ctx.device, non_blocking=True), y.to(self.ctx.device, non_blocking=True)
                t = epoch + i / self.steps_per_epoch
                eps_t = eps_schedule(r.eps.schedule, r.eps.eps, t, r.epochs, r.eps.start, r.eps.train_multiplier,
                                     r.eps.ramp_fraction)
                logits, margin, features = self.ddp(x)
                context = {"features": features, "head": self.model.get_classifier()} if self.head_loss else {}
                loss = self.loss_fn(logits, y, margin, eps_t, **context, **self._loss_options(t))
                if self.teacher is not None:
                    loss = loss + r.distill.weight * distillation(logits, self._teacher_logits(x),
                                                                  r.distill.temperature)
                loss_value = loss.item()  # the one host sync for the loss per step
                if not math.isfinite(loss_value):
                    raise FloatingPointError(f"loss became {loss_value} at epoch {epoch + 1}, step {i + 1}; "
                                             "lower optim.lr or eps.eps")
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if r.optim.grad_clip:
                    nn.utils.clip_grad_norm_(self.model.parameters(), r.optim.grad_clip)
                self.optimizer.step()
                self.step += 1
                self.scheduler.step_update(self.step)
                sums["loss_sum"] += loss_value * len(y)
                sums["correct"] += (logits.argmax(1) == y).sum().item()
                sums["count"] += len(y)
                if margin is not None:
                    k_max = margin.detach().max().item()
                if task is not None:
                    info = (f"loss {sums['loss_sum'] / sums['count']:.4f}  acc {sums['correct'] / sums['count']:.3f}  "
                            f"eps {eps_t:.3f}")
                    progress.update(task, advance=1, info=info + (f"  K~{k_max:.2f}" if margin is not None else ""))
                stopping = self.stop.requested()
                periodic = r.checkpoint_every_steps and self.step % r.checkpoint_every_steps == 0
                if (stopping or periodic) and i + 1 < self.steps_per_epoch:
                    path = self.save({"batches": i + 1, **sums, "eps_t": eps_t, "k_max": k_max})
                    if stopping:
                        raise self.stop.interruption(path, self.step)
        if i + 1 < self.steps_per_epoch:  # the workers were stopped by the signal that stops training
            raise self.stop.interruption(self.save({"batches": i + 1, **sums, "eps_t": eps_t, "k_max": k_max}),
                                         self.step)
        if task is not None:
            progress.remove_task(task)
        if r.bound.converge_steps and self.gloro is not None:
            converge = progress.add_task("converge K", total=None, info="") if progress else None
            with torch.no_grad():  # GloRo App. B: iterates converge once per epoch
                k_max = self.gloro.compiler.estimate(steps=r.bound.converge_steps, tol=1e-6).max().item()
            if converge is not None:
                progress.remove_task(converge)
        loss_sum, correct, count = all_reduce_sum([sums["loss_sum"], sums["correct"], sums["count"]], self.ctx)
        return {"loss": loss_sum / count, "train_accuracy": correct / count, "eps_train": eps_t,
                "K_estimate": k_max, "lr": self.optimizer.param_groups[0]["lr"]}

    @torch.no_grad()
    def _teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        autocast = self.recipe.amp and x.device.type == "cuda"
        with torch.autocast(x.device.type, dtype=torch.bfloat16) if autocast else nullcontext():
            return self.teacher(x).float()

    def _until_stopped(self, batches: Iterator) -> Iterator:
        """``batches``, ending early when a stop signal has also ended the data-loader workers
        (SIGTERM sent to the whole process group, as a batch scheduler does). A worker that dies
        shows as a RuntimeError, or, when it dies while sending a batch, as a reset connection or
        an end of file on its queue."""
        try:
            yield from batches
        except (RuntimeError, ConnectionError, EOFError):
            if self.stop.signal_name is None or self.ctx.distributed:
                raise

    def evaluate(self, progress: ProgressLike | None = None) -> dict[str, Any]:
        self.net.eval()
        uncertifiable = None
        if self.gloro is not None:
            bound = self.gloro.lipschitz_bound(progress=progress)
        else:  # a plain model: certify it if the compiler can bound it, else report clean accuracy
            try:
                bound = bound_model(self.model, self.info.input_shape, estimate_steps=0, progress=progress)
            except UnsupportedNodeError as exc:
                bound, uncertifiable = None, str(exc)
        test = DataLoader(shard(self.test_set, self.ctx), batch_size=self.recipe.data.eval_batch_size)
        result = evaluate_certified(self.model, test, self.recipe.eval_eps, "lipschitz" if bound is not None else None,
                                    bound, device=self.ctx.device, progress=progress,
                                    reduce=lambda counts: all_reduce_sum(counts, self.ctx))
        metrics = {"clean_accuracy": result.clean_accuracy, "vra": {str(e): v for e, v in result.vra.items()},
                   "K": bound.margin.max().item() if bound is not None else math.inf,
                   "sound": bound is not None and bound.sound}
        if uncertifiable:
            metrics["not_certifiable"] = uncertifiable
        return metrics

    def fit(self) -> list[dict[str, Any]]:
        """Train the remaining epochs; returns the metrics history (one dict per epoch).

        Raises:
            TrainingInterrupted: on SIGINT/SIGTERM, once the checkpoint to resume from is written.
        """
        r, main = self.recipe, self.ctx.is_main
        tensorboard = TensorBoardScalars(self.run) if main else None
        if main:
            atomic_write_text(yaml.safe_dump(r.to_dict(), sort_keys=False), self.run.recipe)
            if self.history:  # a run resumed into a new folder brings its earlier epochs
                self.run.write_logs(self.history)
            self._print_header()
        try:
            with self.stop, progress_display(self.console, enabled=main) as progress:
                while self.epoch < r.epochs:
                    start = time.perf_counter()
                    metrics = {"epoch": self.epoch + 1, **self.train_epoch(progress)}
                    self.epoch += 1
                    if self.epoch % r.bound.eval_every == 0 or self.epoch == r.epochs:
                        metrics.update(self.evaluate(progress))
                    metrics["seconds"] = time.perf_counter() - start
                    self.history.append(metrics)
                    stopping = self.stop.requested()
                    if stopping or self.epoch % r.checkpoint_every == 0 or self.epoch == r.epochs:
                        self.save()
                    if main:
                        self.run.write_logs(self.history)
                        tensorboard.add_epoch(metrics)
                        self._print_epoch(metrics)
                    if stopping and self.epoch < r.epochs:
                        raise self.stop.interruption(self.run.checkpoint, self.step)
        finally:
            if tensorboard is not None:
                tensorboard.close()
        self.ctx.barrier()
        return self.history

    # -- output -----------------------------------------------------------------------------
    def _print_header(self) -> None:
        r = self.recipe
        params = sum(p.numel() for p in self.model.parameters())
        self.console.print(
            f"[bold]certify-fx train[/]: {r.model.name} ({params / 1e6:.2f}M parameters) on {r.data.name} "
            f"({self._train_size()} train / {len(self.test_set)} test), loss {r.loss.name}, eps {r.eps.eps:.4f}, "
            f"{r.epochs} epochs x {self.steps_per_epoch} steps, {self.ctx.world_size} process(es) on "
            f"{self.ctx.device.type} -> {self.run.path}", soft_wrap=True)
        if self.step:
            within = self.step - self.epoch * self.steps_per_epoch
            where = f"epoch {self.epoch}" + (f" and {within} steps of epoch {self.epoch + 1}" if within else "")
            self.console.print(f"resumed after {where} (step {self.step})")
        changed = [k for k in self.resumed_changes if k not in _RESUMABLE_CHANGES]
        if changed:
            self.console.print(f"[yellow]warning[/]: the recipe differs from the checkpoint's in {', '.join(changed)}; "
                               "the run will not match an uninterrupted one")

    def _print_epoch(self, m: dict[str, Any]) -> None:
        vra = "  ".join(f"VRA@{float(e):.3f} {v:.3f}" for e, v in m.get("vra", {}).items())
        clean = f"  clean {m['clean_accuracy']:.3f}  {vra}  K {m['K']:.3f}" if "clean_accuracy" in m else ""
        self.console.print(f"epoch {m['epoch']:>3}/{self.recipe.epochs}  loss {m['loss']:.4f}  "
                           f"train acc {m['train_accuracy']:.3f}{clean}  eps_train {m['eps_train']:.3f}  "
                           f"lr {m['lr']:.2e}  {m['seconds']:.1f}s", soft_wrap=True)

    def close(self) -> None:
        self.ctx.close()


def history_table(history: list[dict[str, Any]], title: str = "training") -> Table:
    """A rich table of per-epoch metrics."""
    table = Table(title=title)
    eps = sorted({e for m in history for e in m.get("vra", {})}, key=float)
    for col in ["epoch", "loss", "train acc", "clean acc", *(f"VRA@{float(e):.3f}" for e in eps), "K", "s"]:
        table.add_column(col, justify="right")
    for m in history:
        vra = [f"{m['vra'][e]:.3f}" if e in m.get("vra", {}) else "" for e in eps]
        clean = f"{m['clean_accuracy']:.3f}" if "clean_accuracy" in m else ""
        k = f"{m['K']:.3f}" if "K" in m else ""
        table.add_row(str(m["epoch"]), f"{m['loss']:.4f}", f"{m['train_accuracy']:.3f}", clean, *vra, k,
                      f"{m['seconds']:.1f}")
    return table


def train(recipe: Recipe | dict, resume: str | Path | None = None, console: Console | None = None,
          trust_source: bool = False, overwrite: bool = False) -> list[dict]:
    """Train a recipe (a :class:`Recipe` or plain dict) and return the metrics history.

    A folder that already holds a run is refused unless ``overwrite``; ``resume`` continues a run
    in its checkpoint's folder (see :class:`Trainer`).
    """
    recipe = recipe if isinstance(recipe, Recipe) else recipe_from_dict(recipe)
    trainer = Trainer(recipe, resume, console, trust_source=trust_source, overwrite=overwrite)
    try:
        return trainer.fit()
    finally:
        trainer.close()
