"""The teacher cache: a run reading its targets from the cache trains the student it trains without one, bit for
bit, without calling the teacher; precompute fills the cache ahead; another teacher or setting misses."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_source

from distill_core.afs import class_means
from distill_core.config import DistillConfig
from distill_core.safetensors_io import load
from distill_core.teacher import CFGTeacher
from distill_core.teacher_cache import flatten, unflatten
from distill_core.train.run import precompute_targets, train_student


@pytest.fixture
def teacher_calls(monkeypatch) -> list[int]:
    """Counts the guided teacher's calls (every method's teacher targets go through it)."""
    calls = []
    call = CFGTeacher.__call__

    def counted(self, x, sigma, cond=None):
        calls.append(x.shape[0])
        return call(self, x, sigma, cond)

    monkeypatch.setattr(CFGTeacher, "__call__", counted)
    return calls


def run(tiny_edm, out, **settings) -> tuple[dict, dict]:
    cfg = DistillConfig(teacher="tiny", steps=2, iters=4, batch=4, checkpoint_every=0, out=str(out), **settings)
    tensors, card = load(train_student(cfg, tiny_source(tiny_edm), progress=False).path)
    return tensors, card["training"]


def test_a_nest_of_tensors_comes_back_as_it_went():
    nest = (torch.ones(2), {"c": torch.zeros(3), "y": {"pooled": torch.arange(4)}, "none": None}, [torch.eye(2)])
    tensors, layout = flatten(nest)
    back = unflatten(tensors, layout)
    assert isinstance(back, tuple) and isinstance(back[2], list) and back[1]["none"] is None
    assert torch.equal(back[1]["y"]["pooled"], torch.arange(4)) and torch.equal(back[2][0], torch.eye(2))
    with pytest.raises(TypeError, match="holds tensors"):
        flatten((1.5,))


@pytest.mark.parametrize("settings", [{"method": "sfd"}, {"method": "sfd", "teacher_reuse": 1},
                                      {"method": "reflow", "pairs": 8}],
                         ids=["sfd-pooled", "sfd-fresh", "reflow-pairs"])
def test_a_warm_cache_trains_the_same_student_without_calling_the_teacher(tiny_edm, tmp_path, teacher_calls,
                                                                           settings):
    plain, plain_card = run(tiny_edm, tmp_path / "plain", **settings)
    solved = len(teacher_calls)
    cache = tmp_path / "cache"
    cold, cold_card = run(tiny_edm, tmp_path / "cold", teacher_cache=str(cache), **settings)
    entries = sorted(cache.glob("*.safetensors"))
    assert entries and len(teacher_calls) == 2 * solved
    warm, warm_card = run(tiny_edm, tmp_path / "warm", teacher_cache=str(cache), **settings)
    assert len(teacher_calls) == 2 * solved, "the warm run called the teacher"
    assert sorted(cache.glob("*.safetensors")) == entries
    for student in (cold, warm):
        assert student.keys() == plain.keys()
        assert all(torch.equal(student[k], plain[k]) for k in plain)
    assert plain_card["teacher_evaluations"] == cold_card["teacher_evaluations"] == warm_card["teacher_evaluations"]
    assert plain_card["teacher_evaluations"] > 0


def test_a_warm_cache_holds_the_afs_class_means_too(tiny_edm, tmp_path, teacher_calls, monkeypatch):
    """On a class-conditional teacher SFD's first step aims at the class means, (classes + 1) x 100 teacher
    evaluations at the start of a run: a warm run reads them too, and calls the teacher for nothing."""
    from distill_core.methods import sfd

    means = []
    monkeypatch.setattr(sfd, "class_means", lambda *a, **k: means.append(1) or class_means(*a, **k))
    cfg = {"teacher": "tiny", "steps": 2, "iters": 2, "batch": 4, "checkpoint_every": 0,
           "teacher_cache": str(tmp_path / "cache")}
    cold = train_student(DistillConfig(out=str(tmp_path / "cold"), **cfg), tiny_source(tiny_edm, 10), progress=False)
    assert means == [1] and teacher_calls
    teacher_calls.clear()
    warm = train_student(DistillConfig(out=str(tmp_path / "warm"), **cfg), tiny_source(tiny_edm, 10), progress=False)
    assert means == [1] and not teacher_calls, "the warm run called the teacher"
    (cold_tensors, cold_card), (warm_tensors, warm_card) = load(cold.path), load(warm.path)
    assert cold_card["afs_center"] == "class_mean" and cold_tensors.keys() == warm_tensors.keys()
    assert all(torch.equal(warm_tensors[k], cold_tensors[k]) for k in cold_tensors)
    assert warm_card["training"]["teacher_evaluations"] == cold_card["training"]["teacher_evaluations"]


def test_without_a_folder_the_class_means_are_solved_once_per_process(tiny_edm, tmp_path, monkeypatch):
    """A run without a cache folder keeps the class means in memory: the process's next run on the same teacher
    and seed reads them and trains the same student with the same evaluation count; another seed solves its
    own; only the last ``MEMORY_ENTRIES`` solves stay."""
    from collections import OrderedDict

    from distill_core import teacher_cache
    from distill_core.methods import sfd

    monkeypatch.setattr(teacher_cache, "_memory", OrderedDict())
    monkeypatch.setattr(teacher_cache, "MEMORY_ENTRIES", 1)
    means = []
    monkeypatch.setattr(sfd, "class_means", lambda *a, **k: means.append(k["seed"]) or class_means(*a, **k))

    def student(name: str, seed: int = 0):
        cfg = DistillConfig(teacher="tiny", steps=2, iters=2, batch=4, checkpoint_every=0, seed=seed,
                            out=str(tmp_path / name))
        return load(train_student(cfg, tiny_source(tiny_edm, 10), progress=False).path)

    (first, first_card), (again, again_card) = student("first"), student("again")
    assert means == [0] and list(teacher_cache._memory)
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    assert first_card["training"]["teacher_evaluations"] == again_card["training"]["teacher_evaluations"]
    student("other", seed=1)
    student("first-again")
    assert means == [0, 1, 0] and len(teacher_cache._memory) == 1  # seed 1's solve pushed seed 0's out


def test_precompute_fills_the_cache_the_run_then_reads(tiny_edm, tmp_path, teacher_calls):
    cfg = DistillConfig(teacher="tiny", steps=2, iters=4, batch=4, checkpoint_every=0, out=str(tmp_path / "run"),
                        teacher_cache=str(tmp_path / "cache"))
    written, _ = precompute_targets(cfg, tiny_source(tiny_edm))
    assert written == 2 and teacher_calls  # iterations 0 and 2 start a pool of one batch (teacher_reuse 2)
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written but the cache
    teacher_calls.clear()
    train_student(cfg, tiny_source(tiny_edm), progress=False)
    assert not teacher_calls


def test_another_setting_or_teacher_misses_the_cache(tiny_edm, tmp_path, teacher_calls):
    cache = str(tmp_path / "cache")
    run(tiny_edm, tmp_path / "a", teacher_cache=cache)
    first = len(teacher_calls)
    run(tiny_edm, tmp_path / "b", teacher_cache=cache, guidance=3.0)
    assert len(teacher_calls) == 2 * first
    with torch.no_grad():
        next(tiny_edm.parameters()).add_(0.01)
    run(tiny_edm, tmp_path / "c", teacher_cache=cache)
    assert len(teacher_calls) == 3 * first
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 3 * 2


def test_precompute_refuses_methods_whose_targets_follow_the_student(tiny_edm, tmp_path):
    cfg = DistillConfig(teacher="tiny", method="dmd2", steps=1, iters=2, batch=4, out=str(tmp_path / "run"),
                        teacher_cache=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="no teacher targets to solve ahead"):
        precompute_targets(cfg, tiny_source(tiny_edm))
    with pytest.raises(ValueError, match="give --teacher-cache DIR"):
        precompute_targets(DistillConfig(teacher="tiny", out=str(tmp_path / "run")), tiny_source(tiny_edm))


def test_the_precompute_command_fills_the_cache_and_refuses_in_one_line(tmp_path, capsys):
    from distill_core.cli import main

    flags = ["--teacher-cache", str(tmp_path / "cache"), "--iters", "2", "--batch", "8", "--out", str(tmp_path / "r")]
    assert main(["precompute", *flags]) == 0
    # the AFS class means and one pool of one batch (it serves both iterations)
    assert "wrote 2 teacher solves" in capsys.readouterr().out
    assert main(["precompute", "--method", "dmd2", *flags]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no teacher targets to solve ahead" in err[0]
