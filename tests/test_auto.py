"""Method "auto": presets by step count and teacher, each backed by a row of docs/results.md."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import slug

from distill_core.methods import auto
from distill_core.methods.registry import methods

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results.md"


@pytest.mark.parametrize("steps, has_data, method", [
    (1, True, "kd"), (2, True, "sfd"), (3, True, "sfd"), (4, True, "sfd"), (6, True, "sfd"),
    (7, True, "sfd"), (8, True, "sfd"), (12, True, "sfd"), (13, True, "sfddm"), (16, True, "sfddm"),
    (16, False, "sfd"),
])
def test_the_builtin_teacher_gets_the_benchmarks_winner_at_the_nearest_step_count(steps, has_data, method):
    preset = auto.choose(steps, "builtin", has_data)
    assert preset.method == method and preset.settings == auto.BENCH_BUDGET
    assert preset.describe().startswith(f"auto chose {method}, 220 iterations x batch 64: docs/results.md#")


@pytest.mark.parametrize("steps, row", [(1, 1), (2, 2), (3, 2), (4, 4), (8, 4)])
def test_the_flow_teacher_gets_its_own_benchmarks_winner(steps, row):
    preset = auto.choose(steps, "builtin-flow", has_data=True)
    assert preset == auto.BUILTIN_FLOW[row][0]
    assert preset.method == "sfd" and "on the built-in flow teacher" in preset.evidence


def test_resolve_gives_every_method_what_follows_from_its_step_count():
    assert auto.resolve("sfd-v", 8, "builtin") == ("sfd-v", {"nfe_range": (2, 8)}, None)
    assert auto.resolve("sfd", 8, "comfyui") == ("sfd", {}, None)
    method, settings, chose = auto.resolve("auto", 1, "builtin")
    assert (method, settings) == ("kd", auto.BENCH_BUDGET) and chose == auto.choose(1, "builtin", True).describe()
    assert auto.resolve("auto", 4, "comfyui") == ("sfd", {}, auto.OTHER.describe())


def test_other_teachers_get_sfd_at_their_own_budget_and_zero_steps_is_refused():
    assert auto.choose(4, "comfyui", has_data=False) == auto.OTHER
    assert auto.OTHER.method == "sfd" and auto.OTHER.settings == {}
    with pytest.raises(ValueError, match="at least 1 step"):
        auto.choose(0, "builtin", True)


def sections() -> dict[str, str]:
    """docs/results.md's sections by the anchor of their heading."""
    parts = re.split(r"^## (.+)$", RESULTS.read_text(), flags=re.M)
    return {slug(title): body for title, body in zip(parts[1::2], parts[2::2])}


def test_every_preset_cites_a_section_of_the_results_that_holds_its_numbers():
    found = sections()
    presets = [p for table in auto.TABLES.values() for options in table.values() for p in options]
    for preset in presets:
        assert preset.method in methods()
        for anchor in re.findall(r"docs/results\.md#([a-z0-9-]+)", preset.evidence):
            assert anchor in found, f"{preset.method}: no section #{anchor} in docs/results.md"
        cited = " ".join(found[a] for a in re.findall(r"docs/results\.md#([a-z0-9-]+)", preset.evidence))
        for number in re.findall(r"\d\.\d{3}", preset.evidence):
            assert number in cited, f"{preset.method}: {number} is not in the cited sections"
