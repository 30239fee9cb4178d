"""**Phased score distill**: a lighter student of the built-in teacher that matches the teacher's score
phase by phase and samples on its own phase-aware schedule (``distill_core.methods.phased``).

The node only declares the method's choices and hands them to the engine's ``phased`` method through
the same training path as Distill to N steps (``distill.train_to_file``): progress and previews on
the node, Cancel then ``resume``, the run under output/distill_runs/<save_name>.
"""

from __future__ import annotations

from distill_core.config import PARTITIONS, PHASE_INPUTS, PHASE_WEIGHTS, DistillConfig

from . import host
from .distill import STUDENT, run_inputs, train_to_file
from .handles import TeacherHandle
from .spec import In, Out, node, seed

PHASES = ("4", "8", "16", "32")
_DEFAULTS = DistillConfig(method="phased")


@node("DistillPhasedScoreDistill", "Phased score distill", "train",
      "Phased score distillation: a lighter student (a fraction of the teacher's width) learns the guided "
      "teacher's score in each of K phases of the noise range, then samples in S steps on the phase boundaries "
      "with DPM-Solver++(2M). Built-in teacher only. Saves the student (its architecture, phases and schedule in "
      "the file) under diffusion_models/ and a resumable run under output/distill_runs/<save_name>.",
      inputs=[
          In("teacher", "DISTILL_TEACHER", "the teacher: Built-in teacher (ComfyUI models keep their own "
             "architecture and are refused here)"),
          In("phases", PHASES, "K: how many phases the noise range is split into (each gets its share of the "
             "loss)", str(_DEFAULTS.phases)),
          In("partition", PARTITIONS, "uniform: equal phases in log sigma; adaptive: more, shorter phases where "
             "the teacher's prediction changes fastest (measured on probe trajectories first)",
             _DEFAULTS.partition),
          In("phase_weights", PHASE_WEIGHTS, "each phase's share of the loss: dt, its length in log sigma; "
             "variance, the teacher-score variance inside it", _DEFAULTS.phase_weights),
          In("student_width", "FLOAT", "channels of the student relative to the teacher (0.5: about a quarter of "
             "its FLOPs per step)", _DEFAULTS.student_width, options={"min": 0.25, "max": 1.0, "step": 0.25}),
          In("steps", "INT", "S: sampling steps of the student (one evaluation each), on the phase-aware "
             "schedule", 8, options={"min": 1, "max": 64}),
          In("iterations", "INT", "training iterations (one batch of noised inputs each)", 800,
             options={"min": 1, "max": 100000}),
          In("learning_rate", "FLOAT", "AdamW learning rate, decayed to 0 along a cosine (1e-3: the README's "
             "measured run)", 1e-3, options={"min": 1e-6, "max": 1e-2, "step": 1e-5, "round": False}),
          In("batch", "INT", "inputs per iteration, spread evenly over the phases", 64,
             options={"min": 1, "max": 512}),
          seed("seed of the data draws and the probe"),
          In("targets", PHASE_INPUTS, "where the student's inputs come from: data, forward-noised digits of the "
             "built-in data set; trajectories, states of teacher solves (data-free; 256 solves first, about a "
             "minute on 2 CPU cores)", _DEFAULTS.phase_inputs),
          In("smoothing", "FLOAT", "teacher-target smoothing: EMA decay over a pool of fixed inputs (0: off, "
             "fresh teacher targets every iteration)", _DEFAULTS.target_ema,
             options={"min": 0.0, "max": 0.99, "step": 0.01}),
          *run_inputs("phased_8step", preview_every=50, checkpoint_every=100),
      ],
      outputs=[STUDENT, Out("IMAGE", "loss_curve", "log loss against iteration")])
class PhasedScoreDistill:
    def run(self, teacher: TeacherHandle, phases: str, partition: str, phase_weights: str, student_width: float,
            steps: int, iterations: int, learning_rate: float, batch: int, seed: int, targets: str,
            smoothing: float, save_name: str, resume: bool, preview_every: int, checkpoint_every: int,
            unique_id=None):
        if teacher.model is not None:
            raise ValueError("Phased score distill makes a lighter copy of the built-in teacher's network; a "
                             "ComfyUI MODEL keeps its own architecture. Connect the Built-in teacher, or distil "
                             "this model with Distill to N steps")
        cfg = DistillConfig(
            teacher=teacher.name, method="phased", steps=steps, phases=int(phases), partition=partition,
            phase_weights=phase_weights, phase_inputs=targets, target_ema=smoothing, student_width=student_width,
            sigma_min=teacher.sigma_min, guidance=teacher.guidance, guidance_mode="distilled", student="full",
            lr=learning_rate, iters=iterations, batch=batch, seed=seed, checkpoint_every=checkpoint_every,
        )
        handle, curve = train_to_file(teacher, cfg, host.FOLDERS["full"], save_name, resume, preview_every,
                                      unique_id)
        return {"ui": {"text": [f"saved {handle.path}"]}, "result": (handle, curve)}
