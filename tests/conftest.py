"""Shared fixtures: tiny models built from config with every parameter randomised (no download)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from distill_core.denoisers.edm import EDMDenoiser
from distill_core.methods.base import TeacherSource
from distill_core.nets.unet import UNet, UNetConfig

# The processes the tests start (commands, launched runs, benchmark children) compute on one thread each, as the
# test workers do (``_threads``): beside another worker, a second thread only contends for the other's core.
os.environ.setdefault("OMP_NUM_THREADS", "1")

#: the benchmark scripts' folder
BENCH = Path(__file__).resolve().parents[1] / "bench"

TINY_UNET = UNetConfig(in_channels=1, resolution=8, model_channels=8, channel_mult=(1, 2), num_blocks=1,
                       attn_resolutions=(4,), num_classes=10)


def randomise(module: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Give every parameter a seeded random value (zero-initialised output layers would make the
    denoiser linear in x and hide solver errors)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return module


def hooks(network: torch.nn.Module) -> int:
    """How many forward hooks ``network``'s layers hold (a LoRA student hooked into it adds one per adapter)."""
    return sum(len(layer._forward_hooks) for layer in network.modules())


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w -]", "", heading.strip().lower()).replace(" ", "-")


def bench_script(name: str) -> ModuleType:
    """``bench/<name>.py`` imported as the module ``bench_<name>`` (the benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # a dataclass in the script looks its module up by name
    spec.loader.exec_module(module)
    return module


def _library_logs_to_the_runs_stderr() -> None:
    """transformers' and diffusers' log handlers write to the ``sys.stderr`` of the moment the library first logs.
    Made here, that is the whole test run's stream; made inside a test, it would be that test's captured stream,
    which closes with it, and every later warning would print a "Logging error" traceback into another test's
    stderr."""
    for name in ("transformers", "diffusers"):
        try:
            importlib.import_module(name).utils.logging.get_logger(name)
        except ImportError:  # not installed: nothing of it logs
            continue


_library_logs_to_the_runs_stderr()


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


@pytest.fixture
def tiny_edm() -> EDMDenoiser:
    """A tiny class-conditional EDM denoiser on 1x8x8 images with random weights, in eval mode."""
    return EDMDenoiser(randomise(UNet(TINY_UNET))).eval().requires_grad_(False)


def tiny_source(denoiser, classes: int = 0, w: float = 2.0) -> TeacherSource:
    """A teacher source of 1x8x8 samples with conditions drawn from 10 labels (the null class is 10), at
    guidance ``w``; ``classes``: as ``TeacherSource`` counts them (0: the labels are not used as classes)."""
    return TeacherSource("tiny", denoiser, (1, 8, 8), lambda b, g: torch.randint(10, (b,), generator=g),
                         torch.tensor([10]), w, classes=classes)


@pytest.fixture
def short_workflow(tmp_path):
    """``make(path, iterations)``: a copy of a shipped API workflow (same file name, so the same output names)
    with every training node's ``iterations`` cut to ``iterations``: the graph, its wiring, widgets and
    outputs as shipped, at a budget the CPU suite affords (the shipped budgets are measured in
    docs/results.md)."""

    def make(path: Path, iterations: int) -> Path:
        graph = json.loads(Path(path).read_text())
        cut = [node for node in graph.values() if "iterations" in node["inputs"]]
        assert cut, f"{path} has no training node"
        for node in cut:
            node["inputs"]["iterations"] = iterations
        copy = tmp_path / "workflows" / Path(path).name
        copy.parent.mkdir(exist_ok=True)
        copy.write_text(json.dumps(graph))
        return copy

    return make
