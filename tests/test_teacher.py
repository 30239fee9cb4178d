import torch

from distill_core.teacher import CFGTeacher


class CountingDenoiser:
    """x0 = x * (1 + label) / 10 (labels broadcast), counting forwards and batch sizes."""

    sigma_min, sigma_max = 0.002, 80.0

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, cond=None):
        self.calls.append(x.shape[0])
        scale = (1.0 + cond.float()).view(-1, 1, 1, 1) / 10.0
        return x * scale


def test_guidance_formula_and_one_batched_forward():
    d = CountingDenoiser()
    teacher = CFGTeacher(d, w=3.0, uncond=torch.tensor([10]))
    x = torch.ones(2, 1, 2, 2)
    out = teacher(x, 1.0, torch.tensor([1, 3]))
    x0_c = x * torch.tensor([2.0, 4.0]).view(-1, 1, 1, 1) / 10
    x0_u = x * 11 / 10
    assert torch.allclose(out, x0_u + 3.0 * (x0_c - x0_u))
    assert d.calls == [4]  # conditional and unconditional in one batched forward


def test_w_one_skips_unconditional_pass():
    d = CountingDenoiser()
    out = CFGTeacher(d, w=1.0, uncond=torch.tensor([10]))(torch.ones(3, 1, 2, 2), 0.5, torch.tensor([0, 1, 2]))
    assert d.calls == [3]
    assert torch.allclose(out[1], torch.full((1, 2, 2), 0.2))


def test_guidance_interval_applies_w_only_inside():
    d = CountingDenoiser()
    teacher = CFGTeacher(d, w=2.0, uncond=torch.tensor([10]), interval=(0.5, 5.0))
    x, c = torch.ones(1, 1, 2, 2), torch.tensor([1])
    assert torch.allclose(teacher(x, 10.0, c), x * 0.2)  # outside: conditional only
    assert torch.allclose(teacher(x, 1.0, c), x * (1.1 + 2.0 * (0.2 - 1.1)))
    assert d.calls == [1, 2]
