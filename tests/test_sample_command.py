"""The sample command: a student's images, a row per condition with the same noise in every column, and its
refusals in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import hooks
from PIL import Image

from distill_core import cli
from distill_core.compare import pixels
from distill_core.config import DistillConfig
from distill_core.sampling import sample
from distill_core.sources import builtin_source
from distill_core.student_files import load_student
from distill_core.train.run import train_student


@pytest.fixture(scope="module")
def student_file(tmp_path_factory):
    """A tiny 2-step SFD student of the built-in teacher."""
    cfg = DistillConfig(method="sfd", steps=2, iters=2, batch=4, checkpoint_every=0,
                        out=str(tmp_path_factory.mktemp("run") / "sfd2"))
    return train_student(cfg, builtin_source(), progress=False).path


def test_each_label_is_a_row_drawn_from_the_same_noise_as_the_student_samples_it(student_file, tmp_path, capsys,
                                                                                 monkeypatch):
    import distill_core.sources

    loaded, load = [], distill_core.sources.trained_teacher
    monkeypatch.setattr(distill_core.sources, "trained_teacher", lambda *a: loaded.append(load(*a)) or loaded[-1])
    out = tmp_path / "samples"
    assert cli.main(["sample", str(student_file), "--label", "3", "--label", "7", "--count", "3", "--seed", "5",
                     "--out", str(out)]) == 0
    assert "sfd student, 2 steps: 6 images of 2 conditions" in capsys.readouterr().out
    record = json.loads((out / "samples.json").read_text())
    assert (record["teacher"], record["steps"], record["seed"]) == ("builtin", 2, 5)
    assert [(i["file"], i["condition"], i["noise"]) for i in record["images"]] == [
        (f"{r:02d}_{j:02d}.png", f"class {label}", j) for r, label in enumerate((3, 7)) for j in range(3)]
    source = builtin_source()
    student = load_student(student_file, source.denoiser, source.uncond)
    # the full student's weights went into the teacher's network that sample loaded: no copy of it
    theirs = dict(loaded[0].denoiser.named_parameters())
    ours = dict(student.net.denoiser.named_parameters())
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)
    assert not all(torch.equal(p, q) for p, q in zip(source.denoiser.parameters(), ours.values()))
    z = torch.randn((3, *source.shape), generator=torch.Generator().manual_seed(5))
    for r, label in enumerate((3, 7)):
        expected = pixels(sample(student, student.sigmas()[0] * z, torch.tensor([label] * 3)))
        for j in range(3):
            written = torch.from_numpy(np.array(Image.open(out / f"{r:02d}_{j:02d}.png").convert("RGB")))
            assert torch.equal(written, expected[j]), (label, j)
    grid = Image.open(out / "samples.png")
    assert grid.height > 2 * 48 and grid.width > 3 * 48  # two labelled rows of three images, enlarged to 48 px


def test_without_labels_the_first_classes_are_drawn(student_file, tmp_path):
    out = tmp_path / "samples"
    assert cli.main(["sample", str(student_file), "--count", "1", "--out", str(out)]) == 0
    assert [i["condition"] for i in json.loads((out / "samples.json").read_text())["images"]] == [
        f"class {k}" for k in range(10)]


@pytest.mark.parametrize("flags, message", [
    (["--label", "12"], "--label 12 is not a class of builtin: give labels from 0 to 9"),
    (["--steps", "3"], "cannot sample with 3 steps; choose one of [2]"),
    (["--guidance", "5"], "guidance w=2 is distilled into this student; it cannot sample at w=5"),
    (["--count", "0"], "--count 0: give 1 or more images per condition"),
    (["--prompt", "a cat"], "error: --prompt is for text-to-image pipeline directories"),
])
def test_what_the_student_cannot_draw_is_refused_in_one_line(student_file, tmp_path, capsys, flags, message):
    assert cli.main(["sample", str(student_file), *flags, "--out", str(tmp_path / "s")]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not list((tmp_path / "s").glob("*.png"))


def test_a_missing_file_is_named(tmp_path, capsys):
    assert cli.main(["sample", str(tmp_path / "none.safetensors")]) == 1
    assert "no student file" in capsys.readouterr().err


def test_a_lora_of_a_bf16_run_samples_on_the_bf16_base_it_trained_on(tmp_path, monkeypatch):
    """A LoRA student of a run whose frozen teacher computed in bf16 names that precision; sample draws it on the
    teacher cast to bf16 (a large teacher then fits where its run fitted), the images the student draws on the
    run's own cast teacher. A full student of such a run, whose weights are all its own, keeps a float32 copy."""
    from distill_core.safetensors_io import read_card
    from distill_core.sources import trained_teacher

    cfg = DistillConfig(method="sfd", steps=2, iters=1, batch=4, checkpoint_every=0, student="lora", lora_rank=4,
                        frozen_precision="bf16", afs_center="zero", out=str(tmp_path / "lora"))
    run_source = builtin_source()
    path = train_student(cfg, run_source, progress=False).path
    card = read_card(path)
    assert card["frozen_precision"] == "bf16"
    teacher = trained_teacher("builtin", [card])
    assert {p.dtype for p in teacher.denoiser.parameters()} == {torch.bfloat16}
    out = tmp_path / "samples"
    import distill_core.sources

    loaded, load = [], distill_core.sources.trained_teacher
    monkeypatch.setattr(distill_core.sources, "trained_teacher", lambda *a: loaded.append(load(*a)) or loaded[-1])
    assert cli.main(["sample", str(path), "--label", "4", "--count", "2", "--out", str(out)]) == 0
    # the adapters hooked into the teacher sample loaded: no second copy of its weights
    assert hooks(loaded[0].denoiser) > 0
    student = load_student(path, run_source.denoiser, run_source.uncond)
    z = torch.randn((2, *run_source.shape), generator=torch.Generator().manual_seed(0))
    expected = pixels(sample(student, student.sigmas()[0] * z, torch.tensor([4, 4])))
    for j in range(2):
        written = torch.from_numpy(np.array(Image.open(out / f"00_{j:02d}.png").convert("RGB")))
        assert torch.equal(written, expected[j])
    full = train_student(cfg.replace(student="full", out=str(tmp_path / "full")), builtin_source(), progress=False)
    assert read_card(full.path)["frozen_precision"] == "bf16"
    assert {p.dtype for p in trained_teacher("builtin", [read_card(full.path)]).denoiser.parameters()} == {
        torch.float32}
    assert {p.dtype for p in trained_teacher("builtin", [card, read_card(full.path)]).denoiser.parameters()} == {
        torch.float32}
