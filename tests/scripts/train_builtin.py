"""Train a small SFD student of the built-in teacher into OUT: ``python train_builtin.py OUT GRAD_ACCUM [BATCH]``, alone
or under ``accelerate launch --multi_gpu --num_processes N`` (the multi-process test runs it both ways)."""

import sys

import torch
from accelerate import PartialState

from distill_core.config import DistillConfig
from distill_core.sources import builtin_source
from distill_core.train.run import train_student

torch.set_num_threads(1)
out, accum, batch = sys.argv[1], int(sys.argv[2]), int((sys.argv[3:] or [8])[0])
# SFD's default teacher reuse (a pool drawn in ``plan``) and a cosine lr: every shared draw is exercised
cfg = DistillConfig(steps=4, iters=3, batch=batch, grad_accum=accum, checkpoint_every=2, out=out, seed=3)
run = train_student(cfg, builtin_source(), progress=False)
print(f"process {PartialState().process_index}: {run.path}", flush=True)
PartialState().destroy_process_group()  # a clean exit under the launcher
