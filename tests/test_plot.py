"""Line plots with axes and legends: the loss curve of the training nodes."""

from __future__ import annotations

import math

import pytest
import torch

from distill_core.plot import COLOURS, labelled_grid, line_plot, log_ticks, nice_ticks, table_image, tick_label
from distill_core.report import loss_curve, update_names


@pytest.mark.parametrize("lo, hi, ticks", [
    (0.0, 1.0, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]),
    (1.0, 299.0, [50.0, 100.0, 150.0, 200.0, 250.0]),
    (0.031, 0.074, [0.04, 0.05, 0.06, 0.07]),
])
def test_ticks_are_round_values_inside_the_range(lo, hi, ticks):
    assert nice_ticks(lo, hi) == pytest.approx(ticks)


def test_a_log_axis_ticks_whole_decades_or_round_values_inside_one():
    assert log_ticks(-3.2, 0.3) == [-3.0, -2.0, -1.0, 0.0]
    assert [round(10**t, 6) for t in log_ticks(math.log10(0.031), math.log10(0.074))] == [0.04, 0.05, 0.06, 0.07]
    assert [tick_label(v) for v in (0.00321, 10000.0, 250.0)] == ["0.00321", "1e+04", "250"]


def colour_pixels(image: torch.Tensor, colour: tuple[int, int, int]) -> int:
    return int((image == torch.tensor(colour, dtype=torch.uint8)).all(-1).sum())


def test_every_series_is_drawn_in_its_own_colour_with_text_beside_the_axes():
    image = line_plot({"a": [(0, 1.0), (10, 0.1)], "b": [(0, 2.0), (10, 3.0)], "c": [(5, 1.0)]},
                      "title", "iteration", "loss", log_y=True, width=400, height=240)
    assert image.shape == (240, 400, 3) and image.dtype == torch.uint8
    assert all(colour_pixels(image, COLOURS[k]) > 10 for k in range(3))
    left_margin, bottom_margin = image[30:200, :60], image[-30:, 80:]
    assert (left_margin < 128).any() and (bottom_margin < 128).any()  # tick values and axis labels


def test_a_plot_without_values_says_so_instead_of_failing():
    image = line_plot({"a": [(0, -1.0)]}, "training loss", "iteration", "loss", log_y=True, width=300, height=150)
    assert image.shape == (150, 300, 3) and (image[50:100, 100:200] < 128).any()
    assert colour_pixels(image, COLOURS[0]) == 0


def test_the_loss_curve_names_each_update_in_its_legend():
    assert update_names(["0", "1", "fake_score:0"]) == {"0": "step 1", "1": "step 2", "fake_score:0": "fake_score"}
    assert update_names(["0"]) == {"0": "student"}
    assert update_names(["0", "expert:0", "expert:1"])["expert:1"] == "expert 2"
    metrics = [{"iter": i, "loss": {"0": 1.0 / i, "1": 2.0 / i, "fake_score:0": 0.5}} for i in range(1, 40)]
    curve = loss_curve(metrics)
    assert curve.shape == (320, 640, 3) and all(colour_pixels(curve, COLOURS[k]) > 10 for k in range(3))


def test_a_labelled_grid_names_each_row_and_enlarges_small_images():
    rows = [(name, torch.full((3, 16, 16, 3), 200, dtype=torch.uint8)) for name in ("teacher", "a student")]
    grid = labelled_grid(rows, pad=2, min_row_height=48)
    assert grid.shape[0] == 2 * (48 + 2) + 2 and grid.shape[-1] == 3
    label_w = grid.shape[1] - 3 * (48 + 2) - 2
    assert (grid[:, :label_w] < 128).any()  # the names
    assert (grid[2:50, label_w + 2:label_w + 50] == 200).all()  # the first image, 3x larger


def test_a_table_image_draws_its_text():
    image = table_image([["row", "PSNR dB"], ["sfd, 4 steps", "30.95"]])
    assert image.dtype == torch.uint8 and image.shape[1] > image.shape[0] and (image < 128).any()
