"""Frozen weights in 8 bits (``frozen_precision fp8``): a Linear layer computes with s W_8 as a 16-bit layer
computes with W, up to e4m3's rounding; its product keeps no widened weight for the backward pass; a diffusers
network keeps its precision-sensitive layers and its dtype; a LoRA run trains on it, names it, and its student
samples on it; what it cannot serve is refused in one line."""

from __future__ import annotations

import diffusers
import pytest
import torch
from conftest import randomise
from torch import nn

from distill_core.builtin import cast_precision, cast_weights, fingerprint, solve_fingerprint
from distill_core.config import DistillConfig
from distill_core.fp8 import FP8, SCALE, Fp8Linear, sensitive, store_linear_fp8, widened
from distill_core.safetensors_io import read_card
from distill_core.sources import builtin_source, trained_teacher
from distill_core.train.run import train_student


def test_an_fp8_layer_computes_as_its_weights_scaled_and_keeps_only_8_bits_for_the_backward_pass():
    """y = x (s W_8)^T + b, within e4m3's rounding of the layer's own output (each row's largest weight exactly
    448 s); the gradient of x is g (s W_8); what the product saves for the backward pass is W_8 and s, not a
    widened copy of the weight."""
    torch.manual_seed(0)
    layer = nn.Linear(64, 32)
    x = torch.randn(5, 7, 64, requires_grad=True)
    expected = layer(x)
    original = layer.weight.detach().clone()
    store_linear_fp8(layer, set())
    assert type(layer) is Fp8Linear and layer.weight.dtype == FP8 and not isinstance(layer.weight, nn.Parameter)
    scale = getattr(layer, SCALE)
    assert scale.shape == (32, 1) and torch.equal(layer.weight.float().abs().amax(dim=1), torch.full((32,), 448.0))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    reference = x @ widened(layer.weight, scale, torch.float32).T + layer.bias
    torch.testing.assert_close(y, reference, atol=1e-5, rtol=1e-5)
    error = (y - expected).norm() / expected.norm()
    assert 1e-3 < error < 0.05  # rounded to 3 mantissa bits, not exactly the layer's
    assert all(t.dtype in (FP8, torch.float32) for t in saved)
    assert not any(t.shape == original.shape and t.dtype != FP8 for t in saved)
    g = torch.randn_like(y)
    (grad,) = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(grad, g @ widened(layer.weight, scale, torch.float32), atol=1e-5, rtol=1e-5)


def test_a_diffusers_network_keeps_its_sensitive_layers_and_its_dtype():
    """In a Flux transformer the layers diffusers names precision-sensitive (norms and their modulation, position
    embeddings) stay 16-bit, the others take 8 bits; the network's dtype stays bf16; its output stays within
    e4m3's rounding of the bf16 network's; the cast keeps its fingerprint as loaded and keys its solves apart from
    a bf16 cast's."""
    network = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                               attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                               pooled_projection_dim=16, axes_dims_rope=(4, 6, 6))
    randomise(network, seed=0)
    half = diffusers.FluxTransformer2DModel.from_config(network.config)
    half.load_state_dict(network.state_dict())
    loaded = fingerprint(network)
    cast_weights(half, torch.bfloat16)
    cast_weights(network, FP8)
    kept = {name for name, m in network.named_modules() if type(m) is nn.Linear}
    stored = {name for name, m in network.named_modules() if type(m) is Fp8Linear}
    assert stored and all("norm" in name for name in kept) and not any("norm" in name for name in stored)
    assert sum(id(m) in sensitive(network) for m in network.modules()) > 0
    assert network.dtype == torch.bfloat16 and cast_precision(network) == FP8
    assert fingerprint(network) == loaded and solve_fingerprint(network) != solve_fingerprint(half)
    inputs = {"hidden_states": torch.randn(1, 16, 16), "encoder_hidden_states": torch.randn(1, 4, 32),
              "pooled_projections": torch.randn(1, 16), "timestep": torch.tensor([0.5]),
              "img_ids": torch.zeros(16, 3), "txt_ids": torch.zeros(4, 3)}
    with torch.no_grad():
        ours, theirs = (net(**{k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()},
                            return_dict=False)[0].float() for net in (network, half))
    assert (ours - theirs).norm() / theirs.norm() < 0.1


def test_a_lora_run_on_an_fp8_base_names_it_and_its_student_samples_on_it(tmp_path):
    """A LoRA run with frozen_precision fp8 trains on the teacher's Linear layers in 8 bits, its memory plan counts
    a byte for each of their weights, its file names the precision and its teacher is rebuilt so; a full student,
    or a later run in another precision on the same teacher, is refused in one line."""
    cfg = DistillConfig(method="sfd", steps=2, iters=1, batch=4, checkpoint_every=0, student="lora", lora_rank=4,
                        frozen_precision="fp8", afs_center="zero", out=str(tmp_path / "lora"))
    source, half = builtin_source(), builtin_source()
    run = train_student(cfg, source, progress=False)
    bf16 = train_student(cfg.replace(frozen_precision="bf16", out=str(tmp_path / "bf16")), half, progress=False)
    layers = [m for m in source.denoiser.modules() if type(m) is Fp8Linear]
    weights, rows = sum(m.weight.numel() for m in layers), sum(m.out_features for m in layers)
    assert weights > 0 and bf16.memory_plan.frozen - run.memory_plan.frozen == weights - 4 * rows  # 1 byte, not 2,
    # and a float32 scale per row
    card = read_card(run.path)
    assert card["frozen_precision"] == "fp8"
    teacher = trained_teacher("builtin", [card])
    assert sum(type(m) is Fp8Linear for m in teacher.denoiser.modules()) == sum(
        type(m) is Fp8Linear for m in source.denoiser.modules())
    with pytest.raises(ValueError, match="frozen_precision fp8 keeps the frozen base's weights in 8 bits, which "
                                         "only a LoRA student trains on"):
        train_student(cfg.replace(student="full", out=str(tmp_path / "full")), builtin_source(), progress=False)
    with pytest.raises(ValueError, match="cast to fp8 by an earlier run in this process"):
        train_student(cfg.replace(frozen_precision="bf16", out=str(tmp_path / "again")), source, progress=False)
