"""The methods benchmark (``bench/methods.py``): improved precision and recall on features whose answer is
known, the teacher-target set read back from its cache, peak memory, and one small end-to-end run."""

import json
import mmap

import pytest
import torch
from conftest import bench_script

from distill_core.builtin import load_builtin_teacher
from distill_core.eval import benchmark
from distill_core.eval.coverage import knn_radii, precision_recall
from distill_core.eval.memory import with_peak_memory
from distill_core.options import sweep
from distill_core.teacher import CFGTeacher

ROW_KEYS = {"method", "nfe", "network_evals", "psnr_db", "fd", "fd_teacher", "precision", "recall", "class_acc",
            "images_per_s", "train_seconds", "iters", "batch", "teacher_evaluations", "trained_params",
            "peak_memory_mb"}


def gaussian(n: int, dim: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def test_knn_radii_are_the_distance_to_the_kth_other_point():
    points = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    assert knn_radii(points, k=1).tolist() == [1.0, 1.0, 2.0, 4.0]
    assert knn_radii(points, k=3).tolist() == [7.0, 6.0, 4.0, 7.0]
    with pytest.raises(ValueError, match="k = 4"):
        knn_radii(points, k=4)


def test_identical_sets_have_full_precision_and_recall():
    feats = gaussian(300)
    assert precision_recall(feats, feats.clone()) == (1.0, 1.0)


def test_far_disjoint_sets_have_no_precision_and_no_recall():
    assert precision_recall(gaussian(300, seed=1) + 100.0, gaussian(300)) == (0.0, 0.0)


def test_a_collapsed_generator_keeps_precision_and_loses_recall():
    reference = gaussian(300)
    collapsed = reference[0] + 1e-3 * gaussian(300, seed=2)  # every sample near one reference point
    precision, recall = precision_recall(collapsed, reference)
    assert precision == 1.0
    assert recall <= 2 / 300  # the point it collapsed onto (and at most a neighbour inside the tiny balls)
    # an independent draw of the same distribution scores high on both
    fresh_p, fresh_r = precision_recall(gaussian(300, seed=3), reference)
    assert fresh_p > 0.5 and fresh_r > 0.5


def test_teacher_target_is_solved_once_then_read_from_the_cache(tmp_path, monkeypatch):
    teacher = CFGTeacher(load_builtin_teacher(), 2.0, torch.tensor([10]))
    evaluation = benchmark.eval_set(teacher, 6, seed=1, steps=3)
    first = benchmark.teacher_target(teacher, 6, seed=2, steps=3, cache_dir=tmp_path)
    (cached,) = tmp_path.iterdir()
    assert cached.name.endswith("-w2-n6-s2-heun3.safetensors") and first.shape == (6, 128)

    def no_solve(*args, **kwargs):
        raise AssertionError("the cached target was solved again")

    monkeypatch.setattr(benchmark, "reference_solve", no_solve)
    assert torch.equal(benchmark.teacher_target(teacher, 6, seed=2, steps=3, cache_dir=tmp_path), first)
    # the target's noise is not the evaluation set's (seed 1)
    target = benchmark.eval_set(teacher, 6, seed=2, steps=3, cache_dir=tmp_path)
    assert torch.equal(benchmark.features(target.reference.clamp(-1, 1)), first)
    assert not torch.equal(target.noise, evaluation.noise)


def test_peak_memory_sees_a_large_allocation():
    device = "cuda" if torch.cuda.is_available() else "cpu"  # where the peak is measured

    def allocate():
        if device == "cuda":
            block = torch.ones(64 * 2**20 // 4, device=device)  # 64 MiB of float32, touched
        else:  # pages new to the process: a tensor may reuse free memory the heap already holds resident
            block = torch.frombuffer(mmap.mmap(-1, 64 * 2**20), dtype=torch.float32).fill_(1.0)
        return float(block[-1])

    result, peak = with_peak_memory(allocate)
    assert result == 1.0
    _, idle = with_peak_memory(lambda: None)
    assert peak - idle >= 60  # MiB


@pytest.fixture(scope="module")
def bench():
    return bench_script("methods")


def test_end_to_end_rows_of_one_method_at_two_nfes_and_a_swept_setting(bench, tmp_path, monkeypatch):
    out = tmp_path / "rows.json"
    argv = ["--methods", "sfd", "--nfe", "1", "2", "--n", "20", "--steps", "4", "--iters", "2", "--batch", "4",
            "--cache", str(tmp_path / "cache"), "--work", str(tmp_path / "runs"), "--out", str(out),
            "--set", "loss=l1,l2", "lr=2e-4"]
    rows = bench.main(argv)
    assert json.loads(out.read_text()) == rows
    for loss in ("l1", "l2"):  # --set reaches every student, once per value of a swept key
        config = (tmp_path / "runs" / f"sfd-1-loss{loss}" / "config.yaml").read_text()
        assert f"loss: {loss}" in config and "lr: 0.0002" in config
    students = [r for r in rows if r["method"] == "sfd"]
    assert sorted((r["nfe"], r["loss"], r["lr"]) for r in students) == [
        (1, "l1", 2e-4), (1, "l2", 2e-4), (2, "l1", 2e-4), (2, "l2", 2e-4)]
    for row in students:
        assert set(row) >= ROW_KEYS
        assert row["trained_params"] > 0 and row["teacher_evaluations"] > 0 and row["peak_memory_mb"] > 0
        assert (row["iters"], row["batch"]) == (2, 4)
        assert 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1
    # every solver at NFE 2, all but Heun (two evaluations a step) at NFE 1
    solvers = {r["method"] for r in rows if r["nfe"] == 1} - {"sfd"}
    assert "heun" not in solvers and "euler" in solvers
    assert "heun" in {r["method"] for r in rows if r["nfe"] == 2}
    (teacher,) = [r for r in rows if r["method"] == "teacher"]
    assert teacher["nfe"] == 7 and teacher["network_evals"] == 14  # 4 Heun steps to sigma = 0, with CFG
    assert "psnr_db" not in teacher and teacher["fd_teacher"] >= 0
    assert [(r["nfe"], r["fd_teacher"]) for r in rows] == sorted((r["nfe"], r["fd_teacher"]) for r in rows)

    # run again, the students are read from their folders and the teacher's and solver rows from the cache, none
    # measured again; other settings train anew
    def no_training(cfg, *args):
        raise AssertionError(f"{cfg.out} was trained again")

    def no_solving(teacher, ev, nfe, sigma_min):
        raise AssertionError(f"the solvers at NFE {nfe} were measured again")

    straightened = []
    monkeypatch.setattr(bench, "trained_rows", no_training)
    monkeypatch.setattr(bench, "solver_rows", no_solving)
    monkeypatch.setattr(bench, "path_straightness", lambda *args: straightened.append(args) or 0.0)
    again = bench.main(argv)
    assert [r for r in again if r["method"] == "sfd"] == students
    assert [r for r in again if r["method"] != "sfd"] == [r for r in rows if r["method"] != "sfd"]
    assert straightened == []  # the teacher's row (its straightness) came from the cache
    with pytest.raises(AssertionError, match="the solvers at NFE 1 were measured again"):
        bench.main([*argv[:argv.index("--steps") + 1], "5", *argv[argv.index("--steps") + 2:]])
    assert len(straightened) == 1  # another reference solve: the teacher's row is measured anew
    with pytest.raises(AssertionError, match="sfd-1-lossl1 was trained again"):
        bench.main(argv[:-1] + ["lr=1e-3"])


def test_a_student_stopped_part_way_goes_on_from_its_checkpoint_to_the_rows_of_one_go(bench, tmp_path, monkeypatch):
    from distill_core.config import DistillConfig
    from distill_core.eval.kept import resumable
    from distill_core.train.callbacks import Callback

    def argv(work):
        return ["--methods", "sfd", "--nfe", "1", "--n", "20", "--steps", "4", "--iters", "4", "--batch", "4",
                "--checkpoint-every", "2", "--cache", str(tmp_path / "cache"), "--work", str(tmp_path / work)]

    def students(rows):
        timing = ("train_seconds", "images_per_s", "peak_memory_mb")
        return [{k: v for k, v in r.items() if k not in timing} for r in rows if r["method"] == "sfd"]

    in_one_go = students(bench.main(argv("one")))

    class Watch(Callback):  # counts the iterations it sees; stops the run after ``stop_at`` as a host's cancel does
        def __init__(self, stop_at):
            self.stop_at, self.iterations = stop_at, []

        def on_iteration(self, run, record):
            self.iterations.append(record["iter"])
            if record["iter"] == self.stop_at:
                raise KeyboardInterrupt

    real = bench.train_student

    def watched(watch):
        monkeypatch.setattr(bench, "train_student", lambda cfg, source, **kw: real(cfg, source, callbacks=[watch],
                                                                                    **kw))
        return watch

    stopped = watched(Watch(stop_at=3))
    with pytest.raises(KeyboardInterrupt):
        bench.main(argv("stopped"))
    assert stopped.iterations == [1, 2, 3]
    config = DistillConfig.from_yaml(tmp_path / "stopped" / "sfd-1" / "config.yaml")
    assert resumable(config.replace(checkpoint_every=10))
    assert not any(resumable(config.replace(**other)) for other in ({"lr": 1e-3}, {"iters": 8}, {"extra": {"base": 1}}))
    going_on = watched(Watch(stop_at=None))
    again = bench.main(argv("stopped"))
    assert going_on.iterations == [4]  # on from the checkpoint the stop wrote
    # the same student; the resumed run solved its teacher pool again (pools are not checkpointed), and says so
    resumed = students(again)
    spent = [r.pop("teacher_evaluations") for r in resumed]
    assert spent[0] > in_one_go[0].pop("teacher_evaluations")
    assert resumed == in_one_go


def test_settings_are_numbers_or_yaml_and_a_comma_sweeps():
    assert sweep(["gan-weight=0.003", "seed=0,1,2", "afs=false,true", "loss=l1"]) == {
        "gan_weight": [0.003], "seed": [0, 1, 2], "afs": [False, True], "loss": ["l1"]}
    assert sweep(["lr=2e-4,1e-3"]) == {"lr": [2e-4, 1e-3]}  # YAML alone reads 2e-4 as a string
    assert sweep(["u_range=[0.1, 0.9]"]) == {"u_range": [[0.1, 0.9]]}  # a list is one value
    assert sweep(["critic_lr=null"]) == {"critic_lr": [None]}
    with pytest.raises(ValueError, match="KEY=VALUE or KEY=V1,V2, got 'gan_weight'"):
        sweep(["gan_weight"])


def test_a_one_step_solver_row_counts_one_evaluation_however_many_batches_it_takes():
    teacher = CFGTeacher(load_builtin_teacher(), 2.0, torch.tensor([10]))
    ev = benchmark.eval_set(teacher, 260, seed=1, steps=1)  # two batches of at most 250
    for name, nfe in (("euler", 1), ("heun", 2), ("euler", 3)):
        row = benchmark.solver_row(name, nfe, teacher, ev)
        assert (row["nfe"], row["network_evals"]) == (nfe, 2 * nfe)


def test_the_teacher_and_reflow_students_report_how_straight_their_paths_are(bench, tmp_path):
    """On the built-in flow teacher, whose solvers also run on the flow time grid."""
    argv = ["--teacher", "builtin-flow", "--methods", "reflow", "--nfe", "2", "--n", "20", "--steps", "4", "--iters",
            "2", "--batch", "4", "--cache", str(tmp_path / "cache"), "--work", str(tmp_path / "runs"), "--set",
            "pairs=8", "pair_steps=2"]
    rows = bench.main(argv)
    by_method = {r["method"]: r for r in rows}
    assert {"unipc", "unipc/flow", "dpmpp_2m/flow"} <= set(by_method)
    assert by_method["teacher"]["straightness"] > 0.05  # the teacher's ODE paths curve
    assert 0 < by_method["reflow"]["straightness"] < 2
    assert "straightness" not in by_method["euler"]


def test_auto_trains_the_nodes_choice_at_each_nfe_and_names_it(bench, tmp_path):
    argv = ["--methods", "auto", "--nfe", "2", "--n", "20", "--steps", "4", "--iters", "2", "--batch", "4",
            "--cache", str(tmp_path / "cache"), "--work", str(tmp_path / "runs")]
    rows = bench.main(argv)
    (row,) = [r for r in rows if r["method"] == "auto"]
    assert row["auto_method"] == "sfd" and row["nfe"] == 2 and row["trained_params"] > 0
    assert "steps: 2" in (tmp_path / "runs" / "auto-2" / "config.yaml").read_text()
    assert "iters: 2" in (tmp_path / "runs" / "auto-2" / "config.yaml").read_text()  # the bench's budget


def test_auto_is_judged_against_the_best_single_method_at_each_nfe(bench):
    def row(method, nfe, fd, trained=True, **kw):
        return {"method": method, "nfe": nfe, "fd_teacher": fd, **({"train_seconds": 1.0} if trained else {}), **kw}

    rows = [row("teacher", 63, 0.03, False), row("dpmpp_2m", 1, 0.01, False),  # solvers are not methods
            row("auto", 1, 0.08, auto_method="kd"), row("kd", 1, 0.08), row("sfd", 1, 0.10),
            row("auto", 2, 0.05, auto_method="sfd"), row("sfd", 2, 0.05), row("sfd-v", 2, 0.04)]
    assert bench.auto_against_methods(rows) == [
        "NFE 1: auto (kd) fd_teacher 0.08, best single method kd 0.08: at least as good",
        "NFE 2: auto (sfd) fd_teacher 0.05, best single method sfd-v 0.04: WORSE",
    ]


def test_a_pipeline_directory_is_benched_in_pooled_pixels_with_its_solves_kept_by_its_prompts(bench, tmp_path,
                                                                                             monkeypatch):
    """Any teacher the main job takes, with its flags: a text-to-image pipeline's students and solvers are rows
    with fd_teacher, precision and recall in pooled pixels (no classifier fits its latents); its cached solves
    are kept by its prompts, so another prompt list is solved afresh, not read from the first list's cache."""
    from tests.test_teacher_from_dir import text_pipeline_dir

    teacher = text_pipeline_dir(tmp_path / "pipeline")
    cache = tmp_path / "cache"
    for i, prompts in enumerate(["a red fox\nan owl\n", "a lighthouse at dusk\n"]):
        (tmp_path / f"p{i}.txt").write_text(prompts)
        rows = bench.main(["--teacher", str(teacher), "--prompts", str(tmp_path / f"p{i}.txt"), "--guidance", "3",
                           "--methods", "sfd", "dmd2", "--nfe", "2", "--n", "6", "--steps", "4", "--iters", "1",
                           "--batch", "2", "--cache", str(cache), "--work", str(tmp_path / f"runs{i}")])
        assert {r["method"] for r in rows} >= {"teacher", "euler", "sfd", "dmd2"}
        for row in rows:
            assert {"fd_teacher", "precision", "recall"} <= set(row) and not {"fd", "class_acc"} & set(row)
        config = (tmp_path / f"runs{i}" / "sfd-2" / "config.yaml").read_text()
        assert f"teacher: {teacher}" in config and f"p{i}.txt" in config and "guidance: 3" in config
    assert len(list(cache.glob("conditions-*/teacher-*-w3-n6-s4.json"))) == 2

    class Measured(Exception):
        pass

    def measured(teacher, n, steps, *args, **kwargs):
        raise Measured(n, steps)

    monkeypatch.setattr(bench, "benchmark_set", measured)  # a directory's defaults: 200 samples, 32-step solves
    with pytest.raises(Measured) as sizes:
        bench.main(["--teacher", str(teacher), "--methods", "sfd", "--cache", str(cache)])
    assert sizes.value.args == (200, 32)


@pytest.mark.parametrize("script, flags, problem", [
    ("methods", ["--nfe", "0"], "argument --nfe: 0: give 1 or more"),
    ("solvers", ["--n", "ten"], "argument --n: 'ten' is not a whole number"),
    ("teacher_targets", ["--solvers", "rk4"], "argument --solvers: invalid choice: 'rk4'"),
])
def test_a_benchmarks_bad_count_or_solver_is_refused_in_one_line(script, flags, problem, capsys):
    with pytest.raises(SystemExit) as stop:
        bench_script(script).main(flags)
    assert stop.value.code == 2 and problem in capsys.readouterr().err
