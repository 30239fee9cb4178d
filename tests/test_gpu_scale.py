"""bench/gpu_scale.py at toy widths on the CPU: the SDXL and Flux families build from their configurations,
train through the real trainer (LoRA, gradient checkpointing, both methods) in their own processes, and
write rows with the memory plan beside the measured peak."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import gpu_scale  # noqa: E402

ROWS = ["sdxl dmd2-lora 64px b1 +ckpt", "flux sfd-lora 64px b1 +ckpt", "flux sfd-lora 64px b1 +ckpt fp8"]


def test_toy_rows_of_sdxl_and_flux_train_and_report_their_memory_plan(tmp_path):
    out = tmp_path / "rows.json"
    rows = gpu_scale.main(["--tiny", "--quick", "--rows", *ROWS, "--out", str(out)])
    assert [r["name"] for r in rows] == ROWS and json.loads(out.read_text()) == rows
    for row in rows:
        assert "error" not in row, row
        assert row["trained_params"] > 0 and row["seconds_per_iter"] > 0 and row["teacher_seconds_per_image"] > 0
        assert row["plan_mb"] > row["resident_mb"] > 0 and row["activation_mb_per_sample"] > 0
        assert row["family"] == row["model"]
    dmd2, sfd, fp8 = rows
    assert dmd2["trained_params"] > sfd["trained_params"]  # two adapter sets: generator and critic
    # the same network and adapters on a base whose Linear weights take a byte each, not two
    assert (fp8["params"], fp8["trained_params"]) == (sfd["params"], sfd["trained_params"])
    assert fp8["frozen_precision"] == "fp8" and fp8["resident_mb"] < sfd["resident_mb"]


def test_it_refuses_to_run_without_cuda_unless_asked_for_toy_widths(capsys, monkeypatch):
    monkeypatch.setattr(gpu_scale.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        gpu_scale.main(["--quick"])
    assert "give --tiny" in capsys.readouterr().err


def test_a_failed_row_reports_its_error_line_and_where_it_was_raised():
    """A CUDA error is raised by a later call than the kernel that failed, and CUDA's advice follows it: the
    row keeps the exception's own line and the innermost frames (the benchmark reruns such a row with
    CUDA_LAUNCH_BLOCKING=1, whose frames point at the failing call)."""
    stderr = """Traceback (most recent call last):
  File "bench/gpu_scale.py", line 360, in <module>
    main()
  File "distill_core/denoisers/flow.py", line 80, in forward
    v = self.net(x_t, t, cond)
torch.AcceleratorError: CUDA error: device-side assert triggered
Search for `cudaErrorAssert' in https://docs.nvidia.com/cuda/cuda-runtime-api/group__CUDART__TYPES.html
Compile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.
"""
    failed = gpu_scale.failure(stderr)
    assert failed["error"] == "torch.AcceleratorError: CUDA error: device-side assert triggered"
    assert failed["where"][-1] == 'File "distill_core/denoisers/flow.py", line 80, in forward'
