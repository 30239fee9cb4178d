"""The trainer every method shares, on accelerate: one process on CPU, bf16 autocast on CUDA by
config, several GPUs with ``accelerate launch`` and no code change.

An iteration: ``method.plan`` (shared draws), then ``grad_accum`` micro-batches in lockstep; for each
loss the method yields (one per update: SFD yields one per student step) every micro-batch's loss
is back-propagated (divided by ``grad_accum``), non-finite gradient entries are zeroed and counted
(as in SFD's code), gradients are optionally clipped, and the optimizer steps. Adam or AdamW with
optional weight decay; the learning rate drops by 10x at ``lr_decay_at`` of the run, or follows a
cosine, after an optional linear warmup over the first ``lr_warmup`` iterations. Optional EMA of the
student's weights.

Every ``checkpoint_every`` iterations (and at the end, and on Ctrl-C) the full state is written
atomically: student, optimizer, scheduler, EMA, iteration, RNG states; ``resume`` continues exactly.
``metrics.jsonl`` gets a line per iteration (loss and gradient norm per student step index, lr,
time). A non-finite loss stops the run with ``TrainingDiverged``; the last checkpoint stays intact.
``status.json`` says whether the run is running, finished, interrupted or failed (``train.status``);
every ``sample_every`` iterations ``samples/iter_NNNNNN.png`` shows the teacher's reference, a
training-free solver and the student on the same noise (``train.previews``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch import nn

from distill_core.config import DistillConfig
from distill_core.denoisers.base import move_cond
from distill_core.methods.base import Method
from distill_core.train.callbacks import Callback
from distill_core.train.checkpoint import has_checkpoint, load_checkpoint, save_checkpoint
from distill_core.train.status import write_status

#: Config fields that may change between a run and its resumption.
RESUMABLE_CHANGES = {"out", "iters", "checkpoint_every", "sample_every", "eval_samples", "extra"}
#: Config fields added after checkpoints were first written, with the value that describes what a run
#: from before the field existed did (not the field's default today).
BEFORE_THE_KEY = {"teacher_one_step_above": None, "teacher_reuse": 1.0, "lr_warmup": 0}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the run stopped without overwriting the last checkpoint."""


@dataclass
class TrainResult:
    status: str  # "done" or "interrupted"
    iteration: int
    seconds: float  # training wall time, summed over resumed runs
    nonfinite_grads: int  # updates in which non-finite gradient entries were zeroed
    student: nn.Module  # the trained student (EMA weights when EMA is on), unwrapped, on CPU


class Trainer:
    def __init__(
        self,
        method: Method,
        cfg: DistillConfig,
        out: str | Path | None = None,
        callbacks: tuple[Callback, ...] | list[Callback] = (),
        accelerator: Accelerator | None = None,
    ):
        self.method, self.cfg = method, cfg
        self.out = Path(out or cfg.out)
        self.ckpt_dir = self.out / "checkpoints"
        self.callbacks = list(callbacks)
        self.acc = accelerator or new_accelerator(cfg.mixed_precision)
        self.iteration = 0
        self.seconds = 0.0
        self.nonfinite_grads = 0
        self._stop = False

        method.to(self.acc.device)
        student = method.student
        # on the training device: the EMA update reads the live weights every iteration
        self.ema = copy.deepcopy(student).requires_grad_(False).to(self.acc.device) if cfg.ema else None
        trainable = [p for p in student.parameters() if p.requires_grad]  # a LoRA student's base is frozen
        # config fields left at None take the method's own choice (SFD's: Adam, no decay, step schedule)
        adamw = (cfg.optimizer or getattr(method, "optimizer", "adam")) == "adamw"
        decay = cfg.weight_decay if cfg.weight_decay is not None else getattr(method, "weight_decay", 0.0)
        optimizer = (torch.optim.AdamW if adamw else torch.optim.Adam)(
            trainable, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=decay
        )
        schedule = cfg.lr_schedule or getattr(method, "lr_schedule", "step")
        # resolved once for the run: a resumed run keeps the warmup it started with (load_checkpoint), even
        # where a changed ``iters`` would cap the method's own warmup differently
        self.warmup = resolve_warmup(cfg.lr_warmup, getattr(method, "lr_warmup", 0), cfg.iters)
        # stepped once per iteration: lr for the next iteration
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda it: lr_factor(schedule, it, cfg.iters, cfg.lr_decay_at, self.warmup)
        )
        self.student, self.optimizer = self.acc.prepare(student, optimizer)
        method.student = self.student
        self.plan_gen = torch.Generator().manual_seed(cfg.seed)  # identical on every process
        self.data_gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 1 + self.acc.process_index)
        self.preview_inputs = None
        self.preview_rows: list[torch.Tensor] = []  # the grids' fixed rows: teacher reference, solver
        self.started = time.time()  # of this process's part of the run (status.json)

    # ----------------------------------------------------------------- control
    def request_stop(self) -> None:
        """Stop after the current iteration, checkpointing first (what Ctrl-C does)."""
        self._stop = True

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def unwrapped(self) -> nn.Module:
        return self.acc.unwrap_model(self.student)

    def export_student(self) -> nn.Module:
        """The student to save: EMA weights when EMA is on; unwrapped; a CPU copy in eval mode."""
        return copy.deepcopy(self.ema if self.ema is not None else self.unwrapped()).cpu().eval()

    # ----------------------------------------------------------------- state
    def state(self) -> dict:
        state = {
            "student": _saved_state(self.unwrapped()),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "plan": self.plan_gen.get_state(),
                "data": self.data_gen.get_state(),
            },
        }
        if torch.cuda.is_available():
            state["rng"]["cuda"] = torch.cuda.get_rng_state_all()
        if self.ema is not None:
            state["ema"] = _saved_state(self.ema)
        if hasattr(self.method, "state_dict"):  # a method's own progress (SFD: its teacher pools)
            state["method"] = self.method.state_dict()
        return state

    def save_checkpoint(self) -> None:
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            save_checkpoint(
                self.ckpt_dir,
                self.state(),
                {
                    "iteration": self.iteration,
                    "seconds": round(self.seconds, 3),
                    "nonfinite_grads": self.nonfinite_grads,
                    "lr_warmup": self.warmup,
                    "config": self.cfg.to_dict(),
                },
            )

    def load_checkpoint(self) -> None:
        state, info = load_checkpoint(self.ckpt_dir)
        saved = {**BEFORE_THE_KEY, **info["config"]}
        changed = sorted(
            k for k, v in self.cfg.to_dict().items() if k not in RESUMABLE_CHANGES and saved.get(k) != v
        )
        if changed:
            raise ValueError(
                f"cannot resume {self.ckpt_dir}: the run was configured differently "
                f"({', '.join(f'{k}: {saved.get(k)!r} -> {getattr(self.cfg, k)!r}' for k in changed)})"
            )
        student = self.unwrapped()
        getattr(student, "load_saved_state", student.load_state_dict)(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            getattr(self.ema, "load_saved_state", self.ema.load_state_dict)(state["ema"])
        if hasattr(self.method, "load_state_dict"):
            self.method.load_state_dict(state.get("method", {}))
        torch.set_rng_state(state["rng"]["torch"])
        self.plan_gen.set_state(state["rng"]["plan"])
        self.data_gen.set_state(state["rng"]["data"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(list(state["rng"]["cuda"]))
        self.iteration, self.seconds = info["iteration"], info["seconds"]
        self.nonfinite_grads = info["nonfinite_grads"]
        self.warmup = info.get("lr_warmup", self.warmup)  # older checkpoints lack it: resolved anew
        self._truncate_metrics()

    def _truncate_metrics(self) -> None:
        """Drop metric lines written after the checkpoint (by an interrupted run)."""
        path = self.out / "metrics.jsonl"
        if path.is_file():
            keep = [
                line for line in path.read_text().splitlines() if json.loads(line)["iter"] <= self.iteration
            ]
            path.write_text("".join(line + "\n" for line in keep))

    # ----------------------------------------------------------------- training
    def fit(self, resume: bool = False) -> TrainResult:
        """Train to ``cfg.iters`` iterations (continuing from the checkpoint when ``resume``), recording
        the run's state in ``status.json``. A second Ctrl-C (an abort) is recorded as interrupted."""
        self._write_status("running")
        try:
            result = self._fit(resume)
        except BaseException as e:
            cancels = (KeyboardInterrupt, *(t for cb in self.callbacks for t in cb.cancels))
            state = "interrupted" if isinstance(e, cancels) else "failed"
            self._write_status(state, error=f"{type(e).__name__}: {e}")
            raise
        self._write_status("finished" if result.status == "done" else "interrupted")
        return result

    def _write_status(self, state: str, **fields) -> None:
        if self.acc.is_main_process:
            write_status(
                self.out, state, iteration=self.iteration, iters=self.cfg.iters, started=self.started, **fields
            )

    def _fit(self, resume: bool) -> TrainResult:
        self.out.mkdir(parents=True, exist_ok=True)
        if resume and has_checkpoint(self.ckpt_dir):
            self.load_checkpoint()
        else:
            torch.manual_seed(self.cfg.seed)
            (self.out / "metrics.jsonl").unlink(missing_ok=True)
        status = "done"
        with self._sigint_stops():
            if self.acc.is_main_process:
                for cb in self.callbacks:
                    cb.on_start(self)
            while self.iteration < self.cfg.iters:
                if self._stop:
                    status = "interrupted"
                    break
                start = time.perf_counter()
                record = self._iteration()
                self.seconds += time.perf_counter() - start
                self.iteration += 1
                record.update(iter=self.iteration, time=round(self.seconds, 3))
                self._log(record)
                if self.cfg.checkpoint_every and self.iteration % self.cfg.checkpoint_every == 0:
                    self.save_checkpoint()
                if self.cfg.sample_every and self.iteration % self.cfg.sample_every == 0:
                    self._sample_grid()
                if self.acc.is_main_process:
                    try:
                        for cb in self.callbacks:
                            cb.on_iteration(self, record)
                    except BaseException:  # a cancel raised by a host (ComfyUI's interrupt): keep the work
                        every = self.cfg.checkpoint_every
                        if not (every and self.iteration % every == 0):
                            self.save_checkpoint()
                        raise
            if self.cfg.checkpoint_every == 0 or self.iteration % self.cfg.checkpoint_every:
                self.save_checkpoint()
            result = TrainResult(
                status, self.iteration, self.seconds, self.nonfinite_grads, self.export_student()
            )
            if self.acc.is_main_process:
                for cb in self.callbacks:
                    cb.on_end(self, result)
        return result

    def _iteration(self) -> dict:
        cfg, acc = self.cfg, self.acc
        accum = cfg.grad_accum
        plan = self.method.plan(self.plan_gen)
        streams = [self.method.losses(plan, cfg.batch // accum, self.data_gen) for _ in range(accum)]
        record = {"nfe": plan.get("nfe"), "lr": self.lr, "loss": {}, "grad_norm": {}, "nonfinite_grads": 0}
        params = [p for p in self.student.parameters() if p.requires_grad]
        while True:
            self.optimizer.zero_grad(set_to_none=True)
            total, index = 0.0, None
            for k, stream in enumerate(streams):
                sync = contextlib.nullcontext() if k == accum - 1 else acc.no_sync(self.student)
                with sync:
                    with acc.autocast():
                        step = next(stream, None)
                    if step is None:
                        break
                    value = step.loss.detach().float()
                    if not torch.isfinite(value):
                        raise TrainingDiverged(
                            f"the loss became {value.item()} at iteration {self.iteration + 1}, student step "
                            f"{step.index}; training stopped. The last good checkpoint in {self.ckpt_dir} is "
                            "intact: resume from it with a lower lr, gradient clipping (clip_grad) or "
                            "mixed_precision 'no'."
                        )
                    acc.backward(step.loss / accum)
                    total, index = total + value.item() / accum, step.index
            if index is None:
                break
            norm = grad_norm(params)
            if not torch.isfinite(norm) and _zero_nonfinite(params):  # the scan only when the norm says so
                record["nonfinite_grads"] += 1
                self.nonfinite_grads += 1
                norm = grad_norm(params)
            if cfg.clip_grad:
                norm = acc.clip_grad_norm_(params, cfg.clip_grad)
            self.optimizer.step()
            record["loss"][str(index)] = round(total, 6)
            record["grad_norm"][str(index)] = round(float(norm), 6)
        self.scheduler.step()
        if self.ema is not None:
            with torch.no_grad():
                for e, p in zip(self.ema.parameters(), self.unwrapped().parameters(), strict=True):
                    e.lerp_(p, 1 - cfg.ema)
        return record

    def _log(self, record: dict) -> None:
        if self.acc.is_main_process:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def _sample_grid(self) -> None:
        from distill_core.report import save_grid
        from distill_core.train.previews import fixed_rows

        if not self.acc.is_main_process:
            return
        if self.preview_inputs is None:
            gen = torch.Generator().manual_seed(self.cfg.seed + 777)
            source = self.method.source
            noise = torch.randn((16, *source.shape), generator=gen) * self.method.sigma_max
            self.preview_inputs = (
                noise.to(self.acc.device),
                move_cond(source.draw_cond(16, gen), self.acc.device),
            )
            self.preview_rows = fixed_rows(self.method, self.cfg, *self.preview_inputs)
        images = self.method.preview(*self.preview_inputs)
        save_grid([*self.preview_rows, images.cpu()], self.out / "samples" / f"iter_{self.iteration:06d}.png")

    @contextlib.contextmanager
    def _sigint_stops(self):
        """First Ctrl-C: finish the iteration, checkpoint, return. Second: abort at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.getsignal(signal.SIGINT)

        def handler(signum, frame):
            if self._stop:
                signal.signal(signal.SIGINT, previous)
                raise KeyboardInterrupt
            print(
                "\nCtrl-C: stopping after this iteration and saving a checkpoint (Ctrl-C again aborts)",
                flush=True,
            )
            self._stop = True

        signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


def new_accelerator(mixed_precision: str) -> Accelerator:
    """An Accelerator on CUDA when there is one. accelerate keeps one state per process whose mixed
    precision cannot change; a later run in the same process (a ComfyUI session, a benchmark, the
    tests) that asks for another precision resets that state first. The process group (accelerate's
    ``PartialState``) is kept, so runs under ``accelerate launch`` are unaffected."""
    state = AcceleratorState._shared_state
    if state.get("_mixed_precision", mixed_precision) != mixed_precision:
        AcceleratorState._reset_state()
    return Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available())


def resolve_warmup(configured: int | None, method_default: int, iters: int) -> int:
    """The warmup iterations: ``lr_warmup`` as configured, else the method's own, capped at a tenth of
    the run (a 4-iteration node run of SFD, whose own warmup is 10, would never reach its lr)."""
    return configured if configured is not None else min(method_default, iters // 10)


def lr_factor(schedule: str, it: int, iters: int, decay_at: float, warmup: int = 0) -> float:
    """The learning-rate multiplier of iteration ``it`` (from 0): "step" is 1, then 0.1 from ``decay_at``
    of the run; "cosine" is (1 + cos(pi it / iters)) / 2; "constant" is 1; times min(1, (it + 1) /
    ``warmup``) over the first ``warmup`` iterations."""
    ramp = min(1.0, (it + 1) / warmup) if warmup else 1.0
    if schedule == "step":
        return ramp * (1.0 if it < math.ceil(decay_at * iters) else 0.1)
    if schedule == "cosine":
        return ramp * 0.5 * (1 + math.cos(math.pi * min(it, iters) / iters))
    return ramp


def _saved_state(student: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable part of a student (all of it, unless it declares ``saved_state``: LoRA)."""
    return getattr(student, "saved_state", student.state_dict)()


def grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all gradients together (non-finite when any entry is)."""
    norms = [p.grad.norm() for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


def _zero_nonfinite(params: list[torch.Tensor]) -> bool:
    """Zero NaN / inf gradient entries in place; whether there were any."""
    found = False
    for p in params:
        if p.grad is not None:
            bad = ~torch.isfinite(p.grad)
            if bad.any():
                p.grad[bad] = 0
                found = True
    return found
