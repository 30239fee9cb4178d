"""Resuming a run: which settings may change between a run and its resumption, and checkpoints written by
earlier layouts of the training state read in the current one."""

from __future__ import annotations

from pathlib import Path

from distill_core.config import DistillConfig

#: Config fields that may change between a run and its resumption: bookkeeping, and what a run that
#: diverged needs (a lower lr, gradient clipping, another precision; each change is noted in the metrics).
RESUMABLE_CHANGES = {"out", "iters", "checkpoint_every", "sample_every", "eval_samples", "reference_steps",
                     "report_solvers", "extra", "teacher_cache", "shard_teacher"}
RECOVERY_CHANGES = {"lr", "clip_grad", "mixed_precision"}
#: Config fields added after checkpoints were first written, with the value that describes what a run
#: from before the field existed did (not the field's default today).
BEFORE_THE_KEY = {"teacher_one_step_above": float("inf"), "teacher_reuse": 1.0, "lr_warmup": 0}


def resume_changes(saved: dict, cfg: DistillConfig, where: Path) -> dict[str, tuple]:
    """The changes between a checkpoint's config ``saved`` and ``cfg`` that a resume allows and notes
    (``RECOVERY_CHANGES``: name -> (old, new)); a ``ValueError`` naming the others."""
    saved = {**BEFORE_THE_KEY, **saved}
    now = cfg.to_dict()
    changed = sorted(k for k, v in now.items() if k not in RESUMABLE_CHANGES and saved.get(k) != v)
    refused = [k for k in changed if k not in RECOVERY_CHANGES]
    if refused:
        raise ValueError(
            f"cannot resume {where}: the run was configured differently "
            f"({', '.join(f'{k}: {saved.get(k)!r} -> {now[k]!r}' for k in refused)}); resume with the run's own "
            f"config (--config {where.parent / 'config.yaml'}), changing only "
            f"{', '.join(sorted(RESUMABLE_CHANGES | RECOVERY_CHANGES))}"
        )
    return {k: (saved.get(k), now[k]) for k in changed}


def groups_layout(state: dict, info: dict, exported: str) -> tuple[dict, dict]:
    """A checkpoint of the one-network layout (``student``, ``optimizer``, ...) in the layout of groups."""
    if "nets" not in state:
        state = {
            "nets": {exported: state["student"]},
            "optimizers": {exported: state["optimizer"]},
            "schedulers": {exported: state["scheduler"]},
            "ema": {exported: state["ema"]} if "ema" in state else {},
            "method": state.get("method", {}),
            "rng": state["rng"],
        }
    if isinstance(info.get("lr_warmup"), int):
        info = {**info, "lr_warmup": {exported: info["lr_warmup"]}}
    info.setdefault("teacher_evaluations", 0)
    return state, info
