"""A method defined here and nowhere else: two trained networks updated at a 1:3 ratio, registered by name.
Without a change to any other file it runs through the command line (in process), a headless workflow of
its generated training node, the panel's start form (a child process that finds it through the
``distill_core.methods`` entry-point group, as an installed package's method is found) and
``bench/distill.py``, and a run of it resumes bit-exactly."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import bench_script
from torch import nn

import distill_core.workflow as wf
from distill_core.cli import main as cli_main
from distill_core.config import DistillConfig
from distill_core.methods import registry
from distill_core.methods.base import Method, MicroBatch, NodeLayout, OptimSpec, StepLoss, TeacherSource, Widget
from distill_core.options import option
from distill_core.safetensors_io import read_card
from distill_core.sampling import few_step
from distill_core.schedules import karras
from distill_core.sources import builtin_source
from distill_core.students import StudentNet
from distill_core.teacher import CFGTeacher
from distill_core.train.callbacks import StopAt
from distill_core.train.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent
NAME = "pair-test"


@dataclass
class PairConfig:
    critic_updates: int = option(3, "critic updates per generator update", min=1, max=10)
    critic_lr: float = option(1e-3, "the critic's learning rate", min=0, max=1)


class Pair(Method):
    """The generator matches the teacher's x0 prediction where the critic, a one-layer residual model of
    the teacher from the generator's output, says it errs most; the critic learns that residual."""

    Config = PairConfig
    sampler = "euler_afs"
    exported = "generator"
    summary = "a test method: a generator and a critic at a 1:3 update ratio"
    node = NodeLayout(
        "DistillTestPair", "Test pair", "A two-network test method.",
        widgets=(Widget("steps", default=2, max=8), Widget("iterations", "iters", default=3),
                 Widget("critic_updates"), Widget("batch", default=8), Widget("seed")),
        fixed={"student": "full", "guidance_mode": "distilled"}, save_name="pair", model_output=False,
    )

    def __init__(self, source: TeacherSource, cfg: DistillConfig):
        super().__init__(source, cfg)
        self.teacher = CFGTeacher(source.denoiser, self.w, source.uncond)
        self.sigmas = {cfg.steps: karras(cfg.steps, self.sigma_min, self.sigma_max)}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            critic = nn.Conv2d(source.shape[0], source.shape[0], 3, padding=1)
        self.nets = {"generator": StudentNet(copy.deepcopy(source.denoiser).requires_grad_(True)).train(),
                     "critic": critic}
        self.rounds = 0

    def optim_groups(self) -> dict[str, OptimSpec]:
        return {"generator": OptimSpec("adam", schedule="constant"),
                "critic": OptimSpec("adam", lr=self.opts.critic_lr, betas=(0.0, 0.99), schedule="constant")}

    def plan(self, generator: torch.Generator) -> dict:
        return {"sigma": float(torch.rand((), generator=generator) * 10 + 0.1)}

    def losses(self, plan: dict, micro: MicroBatch, generator: torch.Generator) -> Iterator[StepLoss]:
        device = next(self.nets["critic"].parameters()).device
        sigma = torch.full((micro.size,), plan["sigma"], device=device)
        x = (torch.randn((micro.size, *self.source.shape), generator=generator) * plan["sigma"]).to(device)
        cond = self.source.draw_cond(micro.size, generator).to(device)
        with torch.no_grad():
            target = self.teacher(x, sigma, cond)
        self.teacher_evaluations += micro.size * self.teacher.evaluations()
        for k in range(self.opts.critic_updates):
            with torch.no_grad():
                out = self.nets["generator"](x, sigma, cond)
            yield StepLoss("critic", k, (self.nets["critic"](out) - (target - out)).square().mean())
        out = self.nets["generator"](x, sigma, cond)
        weight = 1 + self.nets["critic"](out.detach()).abs().detach()
        self.rounds += 1
        yield StepLoss("generator", 0, (weight * (out - target).square()).mean())

    def state_dict(self) -> dict:
        return {"rounds": self.rounds}

    def load_state_dict(self, state: dict) -> None:
        self.rounds = state["rounds"]

    def preview_steps(self) -> int:
        return self.cfg.steps

    @torch.no_grad()
    def preview(self, noise: torch.Tensor, cond) -> torch.Tensor:
        return few_step(self.nets["generator"], noise, self.sigmas[self.cfg.steps].to(noise.device), cond, afs=False)

    def card(self) -> dict:
        return self.student_card(self.sigmas, {"name": "karras"}, afs=False)


@pytest.fixture
def pair():
    registry.register(NAME)(Pair)
    yield Pair
    registry.unregister(NAME)


def _trainer(out: Path, **kw) -> Trainer:
    cfg = DistillConfig(method=NAME, steps=2, iters=6, batch=4, seed=3, out=str(out), checkpoint_every=2, **kw)
    return Trainer(registry.build_method(builtin_source(), cfg), cfg)


def test_two_networks_step_at_their_ratio_and_resume_bit_exactly(pair, tmp_path):
    whole = _trainer(tmp_path / "whole")
    done = whole.fit()
    lines = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert list(lines[0]["loss"]) == ["critic:0", "critic:1", "critic:2", "0"]  # three critic updates, then one
    assert whole.groups["critic"].lr == 1e-3 and whole.groups["critic"].betas == (0.0, 0.99)
    assert whole.groups["generator"].lr == DistillConfig.lr

    first = _trainer(tmp_path / "split")
    first.callbacks.append(StopAt(3))
    assert first.fit().status == "interrupted"
    again = _trainer(tmp_path / "split")
    resumed = again.fit(resume=True)
    assert resumed.iteration == done.iteration == 6 and again.method.rounds == whole.method.rounds == 6
    assert resumed.teacher_evaluations == done.teacher_evaluations == 6 * 4 * 2
    for name in ("generator", "critic"):
        a, b = whole.unwrapped(name).state_dict(), again.unwrapped(name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
        opt_a, opt_b = whole.optimizers[name].state_dict()["state"], again.optimizers[name].state_dict()["state"]
        assert all(torch.equal(opt_a[i]["exp_avg"], opt_b[i]["exp_avg"]) for i in opt_a), name
    split = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in split] == [r["loss"] for r in lines]


def test_the_command_line_trains_it_with_its_own_flags(pair, tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli_main(["distill", "--method", NAME, "--steps", "2", "--iters", "2", "--batch", "4",
                     "--critic-updates", "2", "--eval-samples", "10", "--out", str(out), "--no-progress"]) == 0
    card = read_card(out / "student.safetensors")
    assert card["method"] == NAME and card["sampler"] == "euler_afs"
    assert card["training"]["critic_updates"] == 2 and card["training"]["teacher_evaluations"] == 2 * 4 * 2
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == NAME and any(r["method"] == NAME for r in report["rows"])
    assert "--critic-updates" in _help(capsys)


def _help(capsys) -> str:
    with pytest.raises(SystemExit):
        cli_main(["distill", "--help"])
    return capsys.readouterr().out


def test_its_generated_node_runs_in_a_headless_workflow(pair, tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("DISTILL_OUTPUT_DIR", str(tmp_path / "output"))
    pack = wf.node_pack()
    assert "DistillTestPair" in pack.training.register_training_nodes()
    try:
        declared = pack.NODE_CLASS_MAPPINGS["DistillTestPair"].INPUT_TYPES()["required"]
        assert declared["critic_updates"][1]["default"] == 3 and declared["critic_updates"][1]["max"] == 10
        graph = {
            "1": {"class_type": "DistillBuiltinTeacher", "inputs": {"guidance": 2.0}},
            "2": {"class_type": "DistillTestPair", "inputs": {
                "teacher": ["1", 0], "steps": 2, "iterations": 2, "critic_updates": 2, "batch": 4, "seed": 0,
                "save_name": "pair", "resume": False, "preview_every": 1, "checkpoint_every": 1}},
        }
        student, curve = wf.run_graph(graph)["2"]
        assert read_card(student.path)["method"] == NAME and curve.shape[-1] == 3
        assert student.path == tmp_path / "models" / "diffusion_models" / "pair.safetensors"
    finally:
        pack.NODE_CLASS_MAPPINGS.pop("DistillTestPair", None)
        pack.NODE_DISPLAY_NAME_MAPPINGS.pop("DistillTestPair", None)


def test_the_panel_starts_it_in_a_process_that_finds_it_by_entry_point(pair, tmp_path, monkeypatch):
    from distill_core.panel.jobs import Jobs, method_options

    site = tmp_path / "site"
    info = site / "pair_test_plugin-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pair-test-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[distill_core.methods]\n{NAME} = test_method_plugin:Pair\n")
    monkeypatch.setenv("PYTHONPATH", f"{ROOT / 'tests'}:{site}")
    assert "critic_updates: 3" in method_options(NAME)
    jobs = Jobs(tmp_path / "runs")
    run = jobs.start("pair-run", "builtin", NAME, 2, 2, 4,
                     "critic_updates: 2\neval_samples: 10\nreport_solvers: euler\nreference_steps: 8\n")
    deadline = time.time() + 300
    while jobs.alive("pair-run") and time.time() < deadline:
        time.sleep(0.5)
    log = (run / "log.txt").read_text()
    assert jobs.exit_code("pair-run") == 0, log
    assert read_card(run / "student.safetensors")["training"]["critic_updates"] == 2
    with pytest.raises(ValueError, match="critic_updates must lie in"):
        jobs.start("bad-run", "builtin", NAME, 2, 2, 4, "critic_updates: 11\n")


def test_the_benchmark_trains_and_scores_it(pair, tmp_path):
    bench = bench_script("distill")
    rows = bench.main(["--quick", "--methods", NAME, "--nfe", "2", "--n", "10", "--iters", "2",
                       "--work", str(tmp_path / "bench"), "--out", str(tmp_path / "rows.json")])
    ours = [r for r in rows if r["method"] == NAME]
    assert len(ours) == 1 and ours[0]["nfe"] == 2 and ours[0]["teacher_evaluations"] == 2 * 16 * 2
    assert json.loads((tmp_path / "rows.json").read_text()) == rows


def test_ema_and_gradient_accumulation_work_per_group(pair, tmp_path):
    """The run's ``ema`` averages the exported group only; with two micro-batches every update of either
    group accumulates both halves of the batch before its optimizer steps."""
    trainer = _trainer(tmp_path / "ema", ema=0.5, grad_accum=2)
    assert set(trainer.ema) == {"generator"}
    start = {k: v.clone() for k, v in trainer.ema["generator"].state_dict().items()}
    result = trainer.fit()
    live, ema = trainer.unwrapped("generator").state_dict(), trainer.ema["generator"].state_dict()
    moved = [k for k in live if live[k].is_floating_point() and not torch.equal(live[k], start[k])]
    assert moved and all(not torch.equal(ema[k], live[k]) for k in moved)
    assert all(torch.equal(v, ema[k].cpu()) for k, v in result.student.state_dict().items())
    lines = [json.loads(line) for line in (tmp_path / "ema" / "metrics.jsonl").read_text().splitlines()]
    assert all(list(r["loss"]) == ["critic:0", "critic:1", "critic:2", "0"] for r in lines)
