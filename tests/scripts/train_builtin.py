"""Train a small SFD student of the built-in teacher into OUT: ``python train_builtin.py OUT GRAD_ACCUM [BATCH]
[lora] [shard] [samples] [stop]``, alone or under ``accelerate launch --multi_gpu --num_processes N`` (the
multi-process tests run it both ways). ``lora``: a LoRA student; ``shard``: the teacher sharded over the processes
(``shard_teacher``); ``samples``: a sample grid at iteration 2; ``stop``: the main process writes the run's stop
request after iteration 1."""

import sys

import torch
from accelerate import PartialState

from distill_core.config import DistillConfig
from distill_core.sources import builtin_source
from distill_core.train.callbacks import Callback
from distill_core.train.run import train_student
from distill_core.train.sharding import local_weight_count
from distill_core.train.status import request_stop


class StopRequestAfterOne(Callback):  # callbacks run on the main process only
    def on_iteration(self, run, record):
        if run.iteration == 1:
            request_stop(out)


torch.set_num_threads(1)
out, accum, batch = sys.argv[1], int(sys.argv[2]), int((sys.argv[3:] or [8])[0])
flags = set(sys.argv[4:])
# SFD's default teacher reuse (a pool drawn in ``plan``) and a cosine lr: every shared draw is exercised
cfg = DistillConfig(steps=4, iters=3, batch=batch, grad_accum=accum, checkpoint_every=2, out=out, seed=0,
                    student="lora" if "lora" in flags else "full", shard_teacher="shard" in flags,
                    sample_every=2 if "samples" in flags else 0)
source = builtin_source()
run = train_student(cfg, source, progress=False, callbacks=[StopRequestAfterOne()] if "stop" in flags else [])
if run is None:
    print(f"process {PartialState().process_index}: stopped", flush=True)
    PartialState().destroy_process_group()
    sys.exit(0)
print(f"process {PartialState().process_index}: {run.path}; teacher weights held {local_weight_count(source.denoiser)} "
      f"of {sum(p.numel() for p in builtin_source().denoiser.parameters())}; memory plan frozen "
      f"{run.memory_plan.frozen}", flush=True)
PartialState().destroy_process_group()  # a clean exit under the launcher
