"""bench/load_memory.py: the host memory of loading a directory teacher, as loaded and for a bf16 run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "load_memory.py"


def test_a_bf16_run_loads_16_bit_files_in_less_memory_than_a_float32_load(tmp_path):
    """The bench's quick UNet (42 M parameters in bf16 files): for a bf16 run its load peaks at least one byte
    per parameter below the float32 load's, which holds 4 bytes per parameter and then the bf16 cast's 2; the
    sample command on a LoRA student trained in that run adds less than a second copy of the network, and on a
    full student (float32) less than a float32 copy above the float32 load: its weights go from the file's pages
    into the teacher's network, with no copy of them in between."""
    spec = importlib.util.spec_from_file_location("load_memory", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "rows.json"
    rows = bench.main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text()) == rows
    assert [(r["stage"], r["frozen_precision"]) for r in rows] == [
        ("load", "as-loaded"), ("load", "bf16"), ("train a LoRA student", "bf16"), ("sample a LoRA student", "bf16"),
        ("train a full student", "as-loaded"), ("sample a full student", "as-loaded")]
    full, half, trained, sampled, _, sampled_full = rows
    assert trained["peak_mib"] - trained["before_mib"] > half["peak_mib"] - half["before_mib"]  # it loads, then trains
    assert full["parameters"] == half["parameters"] > 40e6 and half["stored_dtype"] == "bfloat16"
    saved_mib = (full["peak_mib"] - full["before_mib"]) - (half["peak_mib"] - half["before_mib"])
    assert saved_mib * 2**20 > half["parameters"]
    # sampling a LoRA student of the bf16 run holds the teacher once: less above the bf16 load than a second
    # bf16 copy of the network (2 bytes per parameter) would add (on 2 CPU cores: 1.2 to 1.5 bytes, the
    # sampling's own tensors and modules; a copy measured 2.4)
    added_mib = (sampled["peak_mib"] - sampled["before_mib"]) - (half["peak_mib"] - half["before_mib"])
    assert added_mib * 2**20 < 2 * half["parameters"]
    # a full student loads into the float32 teacher the sample command loaded: 4 bytes per parameter more would be
    # a copy of its weights beside the network and the file (measured: 2.6 bytes; with copies, 6.1)
    added_mib = (sampled_full["peak_mib"] - sampled_full["before_mib"]) - (full["peak_mib"] - full["before_mib"])
    assert added_mib * 2**20 < 4 * full["parameters"]
