"""The reference-steps benchmark (``bench/reference_steps.py``): each Heun step count of the report's reference
solve against a solve of twice the largest, on any teacher the main job takes."""

import json

import pytest
from conftest import bench_script


def test_longer_reference_solves_land_closer_and_a_bad_teacher_is_refused_in_one_line(tmp_path):
    bench = bench_script("reference_steps")
    out = tmp_path / "rows.json"
    rows = bench.main(["--steps", "8", "4", "--n", "4", "--out", str(out)])
    assert json.loads(out.read_text()) == rows
    assert [r["steps"] for r in rows] == [4, 8] and {r["against_steps"] for r in rows} == {16}
    assert [r["network_evals"] for r in rows] == [14, 30]  # 2 steps - 1 evaluations of the teacher, each with CFG
    assert rows[0]["psnr_db"] + 5 < rows[1]["psnr_db"]  # Heun is second order: twice the steps, a quarter the error
    with pytest.raises(SystemExit, match="unknown teacher 'nope'"):
        bench.main(["--teacher", "nope"])
    with pytest.raises(SystemExit, match="at least 2 Heun steps"):
        bench.main(["--steps", "1"])
