"""The trainer every method shares, on accelerate: one process on CPU, bf16 autocast on CUDA by
config, several processes (GPUs, or CPU processes over gloo) with ``accelerate launch --multi_gpu
--num_processes N`` and no code change.

A method trains one or more named groups of networks (``method.nets``; SFD: ``student``; a
distribution-matching method: ``generator`` and ``fake_score``). Each group has its own optimizer (Adam or
AdamW), learning-rate schedule (lr / 10 at ``lr_decay_at`` of the run, or a cosine, after an optional
linear warmup) and optional EMA of its weights, from the method's ``OptimSpec`` with the run's config
overriding where it is set; every group is accelerate-prepared, so DDP covers every trained network, and
its trainable parameters are kept in float32 whatever the frozen base's precision. With
``grad_checkpointing`` the trained networks recompute their activations in the backward pass.

An iteration: ``method.plan`` (shared draws, identical on every process), then ``grad_accum``
micro-batches per process in lockstep. ``batch`` is the global batch: N processes with ``grad_accum`` k
train N k micro-batches of batch / (N k) samples, micro-batch j drawing from its own generator
(``micro_generator``: the seed, the iteration and j), so they train what one process with N k
micro-batches trains. For each loss the method yields (each names its group) every micro-batch's loss is
back-propagated (divided by ``grad_accum``; DDP averages over the processes), non-finite gradient entries
are zeroed and counted (as in SFD's code), the group's gradients are optionally clipped, and the group's
optimizer steps. ``grad_accum`` 0 takes as few micro-batches as the memory plan fits.

Every ``checkpoint_every`` iterations (and at the end, and on Ctrl-C) the full state is written
atomically: every group's networks, optimizer, scheduler and EMA, the method's own state, its teacher
evaluations, the iteration and RNG states; ``resume`` continues exactly. ``metrics.jsonl`` gets a line
per iteration (loss and gradient norm per update, lr, time). A non-finite loss stops the run with
``TrainingDiverged``; the last checkpoint stays intact. ``status.json`` says whether the run is running,
finished, interrupted or failed, and a ``STOP`` file in the run folder stops it like Ctrl-C
(``train.status``); every ``sample_every`` iterations ``samples/iter_NNNNNN.png`` shows the teacher's
reference, a training-free solver and the student on the same noise (``train.previews``). Callbacks see
the run through a ``RunView``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import signal
import threading
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs, DistributedType
from torch import nn

from distill_core.atomic import write_text
from distill_core.config import DistillConfig, training_seed
from distill_core.denoisers.base import move_cond
from distill_core.memory_plan import MemoryPlan, check_fits, fitting_micro_batches, plan_run
from distill_core.methods.base import Method, MicroBatch, StepLoss
from distill_core.nets.surgery import enable_checkpointing
from distill_core.students import PartlySaved
from distill_core.train.callbacks import Callback, TrainResult
from distill_core.train.checkpoint import (
    CHECKPOINTS,
    checkpoint_info,
    has_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from distill_core.train.metrics import METRICS, read_metrics
from distill_core.train.optim import (
    ema_copy,
    grad_norm,
    keep_trainables_float32,
    lr_factor,
    make_optimizer,
    resolve_group,
    zero_nonfinite,
)
from distill_core.train.resume import groups_layout, resume_changes
from distill_core.train.runlock import run_lock
from distill_core.train.sharding import is_sharded, leave_shards_to_fsdp, refuse_with_shards, shard_teacher
from distill_core.train.status import STOP, write_status


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the run stopped without overwriting the last checkpoint."""


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
        self.ckpt_dir = self.out / CHECKPOINTS
        self.callbacks = list(callbacks)
        self.acc = accelerator or new_accelerator(cfg.mixed_precision, method.partial_updates)
        if self.acc.distributed_type == DistributedType.FSDP:
            raise ValueError("this trainer shards the teacher itself and keeps the trained networks whole: launch with "
                             "--multi_gpu (not accelerate's FSDP mode) and give --shard-teacher")
        self.iteration = 0
        self.seconds = 0.0
        self.nonfinite_grads = 0
        self._stop = False
        self.view = TrainerView(self)

        self.sharded = cfg.shard_teacher
        if self.sharded:  # before anything moves the whole teacher onto the device
            refuse_with_shards(cfg)
            shard_teacher(method.source.denoiser, self.acc.device)
        method.to(self.acc.device)
        specs = method.optim_groups()
        if set(specs) != set(method.nets):
            raise ValueError(f"method {method.name!r} declares networks {sorted(method.nets)} but optimizer "
                             f"groups {sorted(specs)}")
        self.groups = {name: resolve_group(specs[name], cfg, name == method.exported) for name in method.nets}
        # resolved once for the run: a resumed run keeps the warmup it started with (load_checkpoint), even
        # where a changed ``iters`` would cap the method's own warmup differently
        self.warmup = {name: g.warmup for name, g in self.groups.items()}
        self.ema: dict[str, nn.Module] = {}
        nets, optimizers = [], []
        for net in method.nets.values():
            keep_trainables_float32(net)
            net.to(self.acc.device)
        self.memory_plan = self._plan_memory()
        for name, net in method.nets.items():
            if cfg.grad_checkpointing:
                enable_checkpointing(net)
            g = self.groups[name]
            if g.ema is not None:  # on the training device: the EMA update reads the live weights every iteration
                self.ema[name] = ema_copy(net).to(self.acc.device)
            trainable = [p for p in net.parameters() if p.requires_grad]  # a LoRA student's base is frozen
            if self.sharded:
                leave_shards_to_fsdp(net, method.source.denoiser)
            nets.append(net)
            optimizers.append(make_optimizer(g, trainable, self.acc.device))
        prepared = self.acc.prepare(*nets, *optimizers)
        prepared = prepared if isinstance(prepared, (list, tuple)) else [prepared]
        names = list(method.nets)
        self.nets = dict(zip(names, prepared[: len(names)]))
        self.optimizers = dict(zip(names, prepared[len(names):]))
        method.nets.update(self.nets)
        # stepped once per iteration: lr for the next iteration
        self.schedulers = {
            name: torch.optim.lr_scheduler.LambdaLR(
                self.optimizers[name],
                lambda it, name=name: lr_factor(self.groups[name].schedule, it, cfg.iters, cfg.lr_decay_at,
                                                self.warmup[name]),
            )
            for name in names
        }
        self.params = {name: [p for p in net.parameters() if p.requires_grad] for name, net in self.nets.items()}
        # seeds above every evaluation set's (TRAINING_SEED_BASE): training never draws the evaluation noise
        self.plan_gen = torch.Generator().manual_seed(training_seed(cfg.seed))  # identical on every process
        self.preview_inputs: dict[int, tuple] = {}  # fixed noise and conditions of previews, by count
        self.preview_rows: list[torch.Tensor] = []  # the grids' fixed rows: teacher reference, solver
        self.started = time.time()  # of this process's part of the run (status.json)

    def _plan_memory(self) -> MemoryPlan:
        """The run's memory plan (``memory_plan``), and its micro-batches per iteration (``grad_accum``, resolved
        from the plan when 0); on CUDA, refused with a way to fit when the device's free memory is short of
        it."""
        cfg = self.cfg
        ema = {name for name, g in self.groups.items() if g.ema is not None}
        autocast = torch.bfloat16 if cfg.mixed_precision == "bf16" else None
        processes = self.acc.num_processes
        if cfg.batch % processes:
            raise ValueError(f"batch {cfg.batch} is the global batch of {processes} processes: make it a multiple of "
                             f"{processes}")
        batch = cfg.batch // processes  # this process's share
        plan = plan_run(self.method, batch // max(cfg.grad_accum, 1), ema, autocast, cfg.grad_checkpointing,
                        self.groups[self.method.exported].optimizer)
        cuda = self.acc.device.type == "cuda"
        available = torch.cuda.mem_get_info(self.acc.device)[0] + plan.resident if cuda else None
        self.grad_accum = cfg.grad_accum
        if cfg.grad_accum == 0:  # auto: as few micro-batches as fit (the config keeps 0: a resume decides anew)
            self.grad_accum = fitting_micro_batches(plan, available, batch) if cuda else 1
            plan = dataclasses.replace(plan, micro_batch=batch // self.grad_accum)
        if batch % self.grad_accum:
            raise ValueError(f"batch {cfg.batch} over {processes} processes leaves {batch} each, which "
                             f"{self.grad_accum} micro-batches do not divide: choose a batch that divides")
        if cuda:
            check_fits(plan, available, batch, self.grad_accum, cfg.grad_checkpointing, cfg.student == "lora",
                       self.method.source.stock_sampling, clips=len(self.method.source.shape) == 4)
        return plan

    # ----------------------------------------------------------------- control
    def request_stop(self) -> None:
        """Stop after the current iteration, checkpointing first (what Ctrl-C does)."""
        self._stop = True

    def _stopping(self) -> bool:
        """Whether to stop before the next iteration: Ctrl-C or a callback asked this process, or the run
        folder holds a stop request (``train.status.STOP``, removed when the run has ended). With several
        processes: whether any was asked, so that all stop after the same iteration."""
        asked = self._stop or (self.acc.is_main_process and (self.out / STOP).exists())
        if self.acc.num_processes > 1:
            asked = self.acc.reduce(torch.tensor([float(asked)], device=self.acc.device), "sum").item() > 0
        return asked

    @property
    def lr(self) -> float:
        return self.optimizers[self.method.exported].param_groups[0]["lr"]

    def unwrapped(self, group: str | None = None) -> nn.Module:
        return self.acc.unwrap_model(self.nets[group or self.method.exported])

    def export_student(self) -> nn.Module:
        """The network to save: the exported group's (its EMA weights when EMA is on); unwrapped; a copy in
        eval mode, on the CPU, each weight copied straight there (no second copy on the device, where the run's
        optimizer state still is); but a LoRA student's copy holds the teacher's own weights and buffers, where
        they are, beside a copy of its adapters: no second copy of the base (on a GPU, none beside the run's). A
        student on a sharded teacher (a LoRA student of ``shard_teacher``) is the trained network itself, in
        eval mode: its base stays sharded (the student file holds its adapters)."""
        name = self.method.exported
        net = self.ema[name] if name in self.ema else self.unwrapped(name)
        if is_sharded(net):
            return net.eval()
        teacher = self.method.source.denoiser
        shared = {id(t): t for t in (*teacher.parameters(), *teacher.buffers())}
        if any(id(t) in shared for t in (*net.parameters(), *net.buffers())):
            return copy.deepcopy(net, memo=shared).eval()  # moving it would move the teacher's weights with it
        on_cpu = {id(t): on_the_cpu(t) for t in (*net.parameters(), *net.buffers())}
        return copy.deepcopy(net, memo=on_cpu).eval()

    def teacher_evaluations(self) -> int:
        """The teacher's network evaluations of the whole run: every process's, summed, over every resume."""
        count = torch.tensor(self.method.teacher_evaluations, device=self.acc.device)
        return int(self.acc.reduce(count, reduction="sum").item())

    @torch.no_grad()
    def preview(self, count: int = 16) -> torch.Tensor:
        """``count`` images from the current student on fixed noise and conditions (the same every call)."""
        if count not in self.preview_inputs:
            gen = torch.Generator().manual_seed(self.cfg.seed + 777)
            source = self.method.source
            noise = torch.randn((count, *source.shape), generator=gen) * self.method.sigma_max
            self.preview_inputs[count] = (
                noise.to(self.acc.device), move_cond(source.draw_cond(count, gen), self.acc.device)
            )
        return self.method.preview(*self.preview_inputs[count])

    def step(self) -> dict:
        """One training iteration outside ``fit`` (what a benchmark times); returns its metrics record."""
        record = self._iteration()
        self.iteration += 1
        return record

    # ----------------------------------------------------------------- state
    def state(self) -> dict:
        state = {
            "nets": {name: _saved_state(self.unwrapped(name)) for name in self.nets},
            "optimizers": {name: o.state_dict() for name, o in self.optimizers.items()},
            "schedulers": {name: s.state_dict() for name, s in self.schedulers.items()},
            "ema": {name: _saved_state(e) for name, e in self.ema.items()},
            "method": self.method.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "plan": self.plan_gen.get_state(),
            },
        }
        if torch.cuda.is_available():
            state["rng"]["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def save_checkpoint(self) -> None:
        self.acc.wait_for_everyone()
        evaluations = self.teacher_evaluations()  # every process solves its own trajectories
        if self.acc.is_main_process:
            save_checkpoint(
                self.ckpt_dir,
                self.state(),
                {
                    "iteration": self.iteration,
                    "seconds": round(self.seconds, 3),
                    "nonfinite_grads": self.nonfinite_grads,
                    "teacher_evaluations": evaluations,
                    "lr_warmup": self.warmup,
                    "config": self.cfg.to_dict(),
                },
            )

    def load_checkpoint(self) -> None:
        state, info = load_checkpoint(self.ckpt_dir)
        state, info = groups_layout(state, info, self.method.exported)
        recovery = resume_changes(info["config"], self.cfg, self.ckpt_dir)
        for name in self.nets:
            _load_saved_state(self.unwrapped(name), state["nets"][name])
            self.optimizers[name].load_state_dict(state["optimizers"][name])
            self.schedulers[name].load_state_dict(state["schedulers"][name])
        for name, ema in self.ema.items():
            _load_saved_state(ema, state["ema"][name])
        self.method.load_state_dict(state.get("method", {}))
        torch.set_rng_state(state["rng"]["torch"])
        self.plan_gen.set_state(state["rng"]["plan"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(list(state["rng"]["cuda"]))
        self.iteration, self.seconds = info["iteration"], info["seconds"]
        self.nonfinite_grads = info["nonfinite_grads"]
        # the run's teacher work so far is the main process's to count from now on
        self.method.teacher_evaluations = info["teacher_evaluations"] if self.acc.is_main_process else 0
        self.warmup.update(info.get("lr_warmup", {}))  # older checkpoints lack it: resolved anew
        if "lr" in recovery:  # the groups that train at the run's lr continue at the new one
            for name, spec in self.method.optim_groups().items():
                if spec.lr is None:
                    self.schedulers[name].base_lrs = [self.cfg.lr for _ in self.schedulers[name].base_lrs]
                    for pg in self.optimizers[name].param_groups:
                        pg["initial_lr"] = self.cfg.lr
                        pg["lr"] = self.cfg.lr * self.schedulers[name].lr_lambdas[0](self.iteration)
        self._truncate_metrics()
        if recovery:
            note = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in recovery.items())
            self._log({"iter": self.iteration, "time": round(self.seconds, 3), "note": f"resumed with {note}"})

    def _truncate_metrics(self) -> None:
        """Keep the metric records up to the checkpoint's iteration (an interrupted run may have written
        more, and a kill may have cut its last line short)."""
        path = self.out / METRICS
        if path.is_file() and self.acc.is_main_process:
            keep = [r for r in read_metrics(path).records if r["iter"] <= self.iteration]
            write_text(path, "".join(json.dumps(r) + "\n" for r in keep))

    # ----------------------------------------------------------------- training
    def fit(self, resume: bool = False) -> TrainResult:
        """Train to ``cfg.iters`` iterations (continuing from the checkpoint when ``resume``; refused when
        there is none), holding the run folder's lock and recording the run's state in ``status.json``.
        A second Ctrl-C (an abort) is recorded as interrupted."""
        with run_lock(self.out), self._stop_requests_answered():
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

    @contextlib.contextmanager
    def _stop_requests_answered(self):
        """Remove the run folder's stop request (``STOP``) before the run (one an earlier process left
        unanswered) and after it, once ``status.json`` says how it ended: until then a reader sees the run
        as stopping."""
        if self.acc.is_main_process:
            (self.out / STOP).unlink(missing_ok=True)
        try:
            yield
        finally:
            if self.acc.is_main_process:
                (self.out / STOP).unlink(missing_ok=True)

    def _write_status(self, state: str, **fields) -> None:
        if self.acc.is_main_process:
            write_status(
                self.out, state, iteration=self.iteration, iters=self.cfg.iters, started=self.started, **fields
            )

    def _fit(self, resume: bool) -> TrainResult:
        self.out.mkdir(parents=True, exist_ok=True)
        if resume:
            self.load_checkpoint()
        else:
            torch.manual_seed(self.cfg.seed)
            (self.out / METRICS).unlink(missing_ok=True)
        status = "done"
        with self._sigint_stops(), self._polled():
            if self.acc.is_main_process:
                for cb in self.callbacks:
                    cb.on_start(self.view)
            while self.iteration < self.cfg.iters:
                if self._stopping():
                    status = "interrupted"
                    break
                start = time.perf_counter()
                record = self._cancellable_iteration()
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
                            cb.on_iteration(self.view, record)
                    except BaseException:  # a cancel raised by a host (ComfyUI's interrupt): keep the work
                        every = self.cfg.checkpoint_every
                        if not (every and self.iteration % every == 0):
                            self.save_checkpoint()
                        raise
            if self.cfg.checkpoint_every == 0 or self.iteration % self.cfg.checkpoint_every:
                self.save_checkpoint()
            result = TrainResult(status, self.iteration, self.seconds, self.nonfinite_grads,
                                 self.teacher_evaluations(), self.export_student())
            if self.acc.is_main_process:
                for cb in self.callbacks:
                    cb.on_end(self.view, result)
        return result

    @contextlib.contextmanager
    def _polled(self):
        """Every forward pass of the teacher and of the trained networks first asks the callbacks'
        ``poll`` (a host's cancel check), so a cancel is answered within one network evaluation."""
        polls = [cb.poll for cb in self.callbacks if type(cb).poll is not Callback.poll]
        if not polls or not self.acc.is_main_process:
            yield
            return

        def poll(module, args):
            for p in polls:
                p()

        modules = [self.method.source.denoiser, *self.nets.values()]
        handles = [m.register_forward_pre_hook(poll) for m in modules if isinstance(m, nn.Module)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _cancellable_iteration(self) -> dict:
        """An iteration that a cancel (a callback's poll raising one of its ``cancels``, or Ctrl-C twice) may
        stop part way. When no optimizer has stepped yet (the teacher's solve, the long part), the draws and
        the method's state are put back as they were and a checkpoint is written: a resume repeats the
        iteration exactly. Otherwise the last checkpoint stands."""
        before = (torch.get_rng_state(), self.plan_gen.get_state(),
                  copy.deepcopy(self.method.state_dict()), self.method.teacher_evaluations)
        self._stepped = False
        cancels = (KeyboardInterrupt, *(t for cb in self.callbacks for t in cb.cancels))
        try:
            return self._iteration()
        except cancels:
            if not self._stepped:
                torch.set_rng_state(before[0])
                self.plan_gen.set_state(before[1])
                self.method.load_state_dict(before[2])
                self.method.teacher_evaluations = before[3]
                self.save_checkpoint()
            raise

    def micro_batches(self, iteration: int) -> list[tuple[MicroBatch, torch.Generator]]:
        """The micro-batches this process trains at ``iteration`` and their generators: ``grad_accum`` of the
        ``num_processes`` x ``grad_accum`` in the global batch."""
        accum, acc = self.grad_accum, self.acc
        count = acc.num_processes * accum
        return [(MicroBatch(index, count, self.cfg.batch // count, k), micro_generator(self.cfg.seed, iteration, index))
                for k, index in enumerate(range(acc.process_index * accum, (acc.process_index + 1) * accum))]

    def precompute(self) -> None:
        """Solve the teacher targets of the whole run into ``teacher_cache`` without training
        (``Method.precompute``), drawing plans and micro-batches as the run will, from a fresh plan stream."""
        if self.cfg.teacher_cache is None:
            raise ValueError("precompute writes the run's teacher targets into a folder: give --teacher-cache DIR")
        plan_gen = torch.Generator().manual_seed(training_seed(self.cfg.seed))

        def draws():
            for iteration in range(self.cfg.iters):
                plan = self.method.plan(plan_gen)
                for micro, generator in self.micro_batches(iteration):
                    yield plan, micro, generator

        with torch.no_grad(), self.acc.autocast():
            self.method.precompute(draws())

    def _iteration(self) -> dict:
        cfg, acc = self.cfg, self.acc
        accum = self.grad_accum
        plan = self.method.plan(self.plan_gen)
        streams = [self.method.losses(plan, micro, gen) for micro, gen in self.micro_batches(self.iteration)]
        record = {"nfe": plan.get("nfe"), "lr": self.lr, "loss": {}, "grad_norm": {}, "nonfinite_grads": 0}
        exported = self.method.exported
        while True:
            total, step = 0.0, None
            for k, stream in enumerate(streams):
                with acc.autocast():
                    loss = next(stream, None)
                if loss is None:
                    if k:
                        raise RuntimeError(f"method {self.method.name!r}: micro-batch {k} yielded fewer losses")
                    break
                if k == 0:
                    step = loss
                    self.optimizers[step.group].zero_grad(set_to_none=True)
                elif loss.group != step.group:
                    raise RuntimeError(f"method {self.method.name!r}: micro-batches of one iteration yielded "
                                       f"groups {step.group!r} and {loss.group!r} for the same update")
                value = loss.loss.detach().float()
                if not torch.isfinite(value):
                    raise TrainingDiverged(self._diverged(value.item(), loss))
                sync = contextlib.nullcontext() if k == accum - 1 else acc.no_sync(self.nets[loss.group])
                with sync:
                    acc.backward(loss.loss / accum)
                total += value.item() / accum
            if step is None:
                break
            if acc.num_processes > 1:  # the metrics record the loss of the whole global batch
                total = acc.reduce(torch.tensor(total, device=acc.device), reduction="mean").item()
            params = self.params[step.group]
            norm = grad_norm(params)
            if not torch.isfinite(norm) and zero_nonfinite(params):  # the scan only when the norm says so
                record["nonfinite_grads"] += 1
                self.nonfinite_grads += 1
                norm = grad_norm(params)
            if cfg.clip_grad:
                norm = acc.clip_grad_norm_(params, cfg.clip_grad)
            self.optimizers[step.group].step()
            self._stepped = True
            key = str(step.index) if step.group == exported else f"{step.group}:{step.index}"
            record["loss"][key] = round(total, 6)
            record["grad_norm"][key] = round(float(norm), 6)
        for scheduler in self.schedulers.values():
            scheduler.step()
        with torch.no_grad():
            for name, ema in self.ema.items():
                decay = self.groups[name].ema
                for e, p in zip(ema.parameters(), self.unwrapped(name).parameters(), strict=True):
                    if p.requires_grad:  # a frozen weight is the live one itself (``ema_copy``)
                        e.lerp_(p, 1 - decay)
        return record

    def _diverged(self, value: float, loss: StepLoss) -> str:
        """What to tell the user when the loss is no longer finite: what is kept and what to run."""
        where = f"the loss became {value} at iteration {self.iteration + 1}, {loss.group} update {loss.index}"
        if not has_checkpoint(self.ckpt_dir):
            return (f"{where}; training stopped before any checkpoint was written. Start the run again with a "
                    "lower lr or gradient clipping (--lr, --clip-grad)")
        config = self.out / "config.yaml"
        kept = checkpoint_info(self.ckpt_dir)["iteration"]
        return (f"{where}; training stopped. The last good checkpoint (iteration {kept}) in {self.ckpt_dir} is "
                "intact: continue from it with a lower lr or gradient clipping, e.g. python -m distill_core "
                f"distill --resume --config {config} --lr {self.cfg.lr / 4:g} --clip-grad 1")

    def _log(self, record: dict) -> None:
        if self.acc.is_main_process:
            with open(self.out / METRICS, "a") as f:
                f.write(json.dumps(record) + "\n")

    def _sample_grid(self) -> None:
        from distill_core.report import save_grid
        from distill_core.train.previews import fixed_rows

        if not (self.acc.is_main_process or self.sharded):  # a sharded teacher runs on every process together
            return
        images = self.preview(16)
        if not self.preview_rows:
            self.preview_rows = fixed_rows(self.method, self.cfg, *self.preview_inputs[16])
        if self.acc.is_main_process:
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


class TrainerView:
    """A trainer as its callbacks see it (``callbacks.RunView``)."""

    def __init__(self, trainer: Trainer):
        self._trainer = trainer

    @property
    def iteration(self) -> int:
        return self._trainer.iteration

    @property
    def total(self) -> int:
        return self._trainer.cfg.iters

    @property
    def out(self) -> Path:
        return self._trainer.out

    @property
    def memory_plan(self) -> MemoryPlan:
        return self._trainer.memory_plan

    def preview(self, count: int = 4) -> torch.Tensor:
        return self._trainer.preview(count)

    def request_stop(self) -> None:
        self._trainer.request_stop()


def micro_generator(seed: int, iteration: int, index: int) -> torch.Generator:
    """The generator of micro-batch ``index`` of the global batch at ``iteration`` (from 0): its draws depend
    on nothing else, so the process that trains it, the number of processes and a resume change nothing."""
    return torch.Generator().manual_seed(training_seed((seed * 1_000_003 + iteration) * 8_191 + index + 1))


def new_accelerator(mixed_precision: str, partial_updates: bool = False) -> Accelerator:
    """An Accelerator on CUDA when there is one. accelerate keeps one state per process whose mixed
    precision cannot change; a later run in the same process (a ComfyUI session, a benchmark, the
    tests) that asks for another precision resets that state first. The process group (accelerate's
    ``PartialState``) is kept, so runs under ``accelerate launch`` are unaffected. ``partial_updates``:
    the method's updates may leave trained weights unused (``Method.partial_updates``), which DDP must
    be told."""
    state = AcceleratorState._shared_state
    if state.get("_mixed_precision", mixed_precision) != mixed_precision:
        AcceleratorState._reset_state()
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if partial_updates else []
    return Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available(), kwargs_handlers=handlers)


def on_the_cpu(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of ``tensor`` made on the CPU (a parameter's copy is a parameter)."""
    copied = tensor.detach().to("cpu", copy=True)
    return nn.Parameter(copied, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else copied


def _saved_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint holds of a network: a ``PartlySaved`` network says (a LoRA student: its adapters);
    any other network: its whole state."""
    return net.saved_state() if isinstance(net, PartlySaved) else net.state_dict()


def _load_saved_state(net: nn.Module, state: dict[str, torch.Tensor]) -> None:
    if isinstance(net, PartlySaved):
        net.load_saved_state(state)
    else:
        net.load_state_dict(state)
