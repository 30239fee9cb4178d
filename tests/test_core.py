"""The ground floor: package import, data, the built-in UNet, EDM preconditioning, attention, file I/O."""

import dataclasses
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distill_core import attention, safetensors_io
from distill_core.data import load_mnist, to_model_space
from distill_core.denoisers import cat_conds, expand_sigma
from distill_core.denoisers.edm import EDMDenoiser
from distill_core.nets.unet import UNet, UNetConfig

ROOT = Path(__file__).resolve().parents[1]


def test_pack_imports_without_comfyui():
    # ComfyUI's own modules are not importable (a folder named "comfy" beside the checkout, on sys.path
    # through pytest's rootdir insertion, is only an empty namespace package)
    comfy = importlib.util.find_spec("comfy")
    assert comfy is None or importlib.util.find_spec("comfy.model_management") is None
    spec = importlib.util.spec_from_file_location("comfyui_distill", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["comfyui_distill"] = pack
    try:
        spec.loader.exec_module(pack)
    finally:
        del sys.modules["comfyui_distill"]
    assert isinstance(pack.NODE_CLASS_MAPPINGS, dict)
    assert pack.WEB_DIRECTORY == "./web"


def test_every_engine_module_imports_first():
    """A user's first import may be any module (``from distill_core.sampling import sample``): none may
    depend on another being imported before it (an import cycle fails only in some orders)."""
    modules = sorted(
        ".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for f in (ROOT / "distill_core").rglob("*.py") if f.name != "__main__.py"  # that one runs the CLI
    )
    script = (
        "import importlib, sys\n"
        "failed = []\n"
        f"for name in {modules!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'distill_core' or m.startswith('distill_core.')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as e:\n"
        "        failed.append(f'{name}: {e}')\n"
        "print('\\n'.join(failed))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert len(modules) > 30 and done.stdout.strip() == "", done.stdout


def test_mnist_is_16x16_in_range():
    x, y = load_mnist("test")
    assert x.shape == (10000, 1, 16, 16) and y.shape == (10000,)
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert set(y.unique().tolist()) == set(range(10))
    with pytest.raises(ValueError, match="split"):
        load_mnist("nope")


def test_to_model_space_averages_blocks():
    ones = torch.ones(1, 784)
    out = to_model_space(ones)
    assert out[0, 0, 0, 0] == -1.0  # padded corner
    assert out[0, 0, 8, 8] == 1.0  # interior


def test_unet_shapes_and_multipliers():
    cfg = UNetConfig(resolution=8, model_channels=16, channel_mult=(1, 2), num_blocks=2)
    net = UNet(cfg)
    x = torch.randn(3, 1, 8, 8)
    assert net(x, torch.zeros(3), torch.tensor([0, 5, 10])).shape == x.shape
    half = cfg.scaled(width=0.5, depth=0.5)
    assert half.model_channels == 8 and half.num_blocks == 1
    assert sum(p.numel() for p in UNet(half).parameters()) < sum(p.numel() for p in net.parameters()) / 3
    assert UNetConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("channels", [1, 4])
def test_the_unet_computes_the_same_bits_with_contiguous_copies_of_its_channels_last_weights(channels):
    """A sharded teacher gathers its weights contiguous; the built-in UNet keeps them channels-last. Output
    and weight gradients agree bit for bit, so sharding changes no number a run computes."""
    import copy

    from conftest import TINY_UNET, randomise

    net = randomise(UNet(dataclasses.replace(TINY_UNET, in_channels=channels))).to(memory_format=torch.channels_last)
    gathered = copy.deepcopy(net)
    for p in gathered.parameters():
        p.data = p.data.contiguous()
    assert any(not p.is_contiguous() for p in net.parameters())
    x, c_noise, labels = torch.randn(3, channels, 8, 8), torch.rand(3), torch.tensor([0, 5, 10])
    outs = [n(x, c_noise, labels) for n in (net, gathered)]
    assert torch.equal(*outs)
    for out in outs:
        out.square().sum().backward()
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(net.parameters(), gathered.parameters()))


def test_edm_preconditioning_matches_karras_table_1(tiny_edm):
    sigma = torch.tensor([0.5, 2.0])
    c_skip, c_out, c_in, c_noise = tiny_edm.preconditioning(sigma)
    sd = 0.5
    assert torch.allclose(c_skip, sd**2 / (sigma**2 + sd**2))
    assert torch.allclose(c_out, sigma * sd / (sigma**2 + sd**2).sqrt())
    assert torch.allclose(c_in, 1 / (sigma**2 + sd**2).sqrt())
    assert torch.allclose(c_noise, sigma.log() / 4)
    # with F = 0 the denoiser is exactly c_skip * x
    zero = EDMDenoiser(UNet(UNetConfig(resolution=8, channel_mult=(1,), model_channels=8)))
    x = torch.randn(2, 1, 8, 8)
    assert torch.allclose(zero(x, sigma), c_skip.view(-1, 1, 1, 1) * x)


def test_sigma_and_cond_helpers():
    x = torch.zeros(4, 1, 2, 2)
    assert expand_sigma(1.5, x).shape == (4,)
    with pytest.raises(ValueError, match="shape"):
        expand_sigma(torch.ones(3), x)
    both = cat_conds({"a": torch.ones(2, 3)}, {"a": torch.zeros(2, 3)})
    assert both["a"].shape == (4, 3)
    with pytest.raises(TypeError):
        cat_conds(torch.ones(1), {"a": torch.ones(1)})


def test_attention_matches_softmax_formula():
    q, k, v = torch.randn(3, 2, 2, 5, 4).unbind(0)
    ref = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1) @ v
    assert attention.backend_for(torch.device("cpu")) == "sdpa"
    assert torch.allclose(attention.attention(q, k, v), ref, atol=1e-5)


def test_safetensors_io_roundtrip_and_refusals(tmp_path):
    path = safetensors_io.save_atomic({"w": torch.arange(3.0)}, tmp_path / "a.safetensors", {"kind": "x"})
    tensors, card = safetensors_io.load(path)
    assert card == {"kind": "x"} and torch.equal(tensors["w"], torch.arange(3.0))
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]  # no temporary left behind
    with pytest.raises(FileNotFoundError, match="does not exist"):
        safetensors_io.load(tmp_path / "missing.safetensors")
    (tmp_path / "b.ckpt").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="only .safetensors"):
        safetensors_io.load(tmp_path / "b.ckpt")
    from safetensors.torch import save_file

    save_file({"w": torch.ones(1)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ValueError, match="no comfyui-distill metadata"):
        safetensors_io.read_card(tmp_path / "foreign.safetensors")


def test_safetensors_io_mapped_tensors_are_views_of_the_file(tmp_path):
    """``mapped``: the same tensors, their data inside a mapping of the file (Linux's /proc/self/maps), not a
    copy on the heap as the default load's."""
    weights = torch.randn(64, 1024)
    path = safetensors_io.save_atomic({"w": weights}, tmp_path / "m.safetensors", {"kind": "x"})

    def in_file_mapping(t: torch.Tensor) -> bool:
        for line in Path("/proc/self/maps").read_text().splitlines():
            span, *_, name = line.split(maxsplit=5)
            low, high = (int(a, 16) for a in span.split("-"))
            if low <= t.data_ptr() < high:
                return name.strip() == str(path.resolve())
        return False

    mapped, _ = safetensors_io.load(path, mapped=True)
    copied, _ = safetensors_io.load(path)
    assert torch.equal(mapped["w"], weights) and torch.equal(copied["w"], weights)
    assert in_file_mapping(mapped["w"]) and not in_file_mapping(copied["w"])


def test_failed_write_leaves_previous_file_intact(tmp_path, monkeypatch):
    path = safetensors_io.save_atomic({"w": torch.ones(2)}, tmp_path / "s.safetensors", {"v": 1})

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors_io, "save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        safetensors_io.save_atomic({"w": torch.zeros(2)}, path, {"v": 2})
    assert safetensors_io.read_card(path) == {"v": 1}
    assert len(list(tmp_path.iterdir())) == 1
