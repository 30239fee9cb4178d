"""The pack inside a real ComfyUI (gated on ``COMFYUI_PATH``: a Comfy-Org/ComfyUI checkout whose
requirements are installed in the Python running these tests, with this package importable).

* The stock LoraLoader applies a LoRA saved by Distill to N steps to the teacher and reproduces the
  student's 4-step samples (in-process, ``tests/comfyui_harness.py``).
* A headless server (``main.py --cpu``) with this pack in its ``custom_nodes``: workflows (a) and
  (b) POSTed to ``/prompt`` in API format finish with their outputs on disk; Cancel (``/interrupt``)
  during training leaves a checkpoint, and queueing again with resume on finishes the run without
  losing or repeating an iteration, and loaders of the student file read it again once a resumed run has
  replaced it; the web extension and the monitor route are served, and the panel
  behind the route starts a run in ComfyUI's Python.

Run: ``COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python -m pytest -m comfyui``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from safetensors import safe_open

from distill_core.safetensors_io import read_card

COMFYUI = os.environ.get("COMFYUI_PATH", "")
ROOT = Path(__file__).resolve().parent.parent
HARNESS = ROOT / "tests" / "comfyui_harness.py"

pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.skipif(not (COMFYUI and Path(COMFYUI, "main.py").is_file()),
                       reason="needs a ComfyUI checkout in COMFYUI_PATH"),
]


def _harness(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(HARNESS), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COMFYUI_PATH": COMFYUI})
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def _probe(*args: str) -> dict:
    """A harness probe in its own ComfyUI process: the JSON of its RESULT line, printed for the test's log."""
    out = _harness(*args).stdout
    result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[len("RESULT "):])
    print(json.dumps(result, indent=1))
    return result


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny_sd15.safetensors"
    _harness("checkpoint", str(path))
    return path


def test_the_stock_lora_loader_reproduces_the_students_samples(checkpoint, tmp_path):
    result = _probe("lora-probe", str(checkpoint), str(tmp_path))
    assert result["student_kind"] == "lora" and result["lora_key_example"].startswith("diffusion_model.")
    assert result["card"]["guidance"] == {"mode": "cfg", "w": 5.0} and result["cfg"] == 5.0
    assert result["steps"] == 5 and result["sigmas"][-1] == pytest.approx(0.1)  # AFS + 4 evaluations, SD sigma_min
    assert result["lora_effect"] > 1e-2  # the LoRA trained and changes the samples ...
    assert result["max_abs_diff"] <= 1e-3  # ... exactly as the engine's student does


def test_gradient_checkpointing_on_a_comfyui_unet_trains_the_same_lora_and_gives_the_model_back(checkpoint,
                                                                                                 tmp_path):
    result = _probe("checkpointing-probe", str(checkpoint), str(tmp_path))
    assert result["checkpointed_during"][0] > 0 and result["checkpointed_after"] == 0
    assert result["same_keys"] and result["weights"] > 0
    assert result["max_relative_diff"] <= 1e-2  # the same updates, up to float rounding (fp16 files)


def test_dmd2_on_a_shared_base_trains_a_lora_the_stock_loader_applies(checkpoint, tmp_path):
    """DMD2 with the generator and the fake score as two LoRAs on the one frozen model: one copy of the base
    weights; the stock LoraLoader loads every key of the generator's file, the student's sampler on the
    loaded MODEL reproduces the engine's samples, and the stock lcm sampler samples it on the file's sigmas."""
    result = _probe("dmd2-probe", str(checkpoint), str(tmp_path))
    assert result["card"]["method"] == "dmd2" and result["card"]["sampler"] == "renoise"
    assert result["held"] <= result["base"] + result["adapters"] + 4096  # one copy of the base weights
    assert result["unloaded_lora_keys"] == 0 and result["student_kind"] == "lora"
    assert result["cfg"] == 1.0 and result["steps"] == 2 and result["sigmas"][-1] == 0
    assert result["lora_effect"] > 1e-2 and result["max_abs_diff"] <= 1e-3
    assert result["lcm_finite"] and result["lcm_scale"] > 0


def test_lcm_lora_trains_through_the_node_into_a_lora_the_stock_ksampler_samples(checkpoint, tmp_path):
    """LCM-LoRA through Distill to N steps: the stock LoraLoader loads every key of its file, the student's sampler
    on the loaded MODEL reproduces the engine's samples, and the stock KSampler with sampler lcm samples it: one
    step (D at sigma_max, deterministic) equals the engine's one-step sample of the same latent, four are finite."""
    result = _probe("lcm-lora-probe", str(checkpoint), str(tmp_path))
    assert result["card"]["method"] == "lcm-lora" and result["card"]["sampler"] == "renoise"
    assert result["unloaded_lora_keys"] == 0 and result["student_kind"] == "lora"
    assert result["cfg"] == 1.0 and result["steps"] == 4 and result["sigmas"][-1] == 0
    assert result["nfe_range"] == [1, 4] and result["card_sigma_max"] == pytest.approx(result["sigma_max"], rel=1e-6)
    assert result["lora_effect"] > 1e-2 and result["max_abs_diff"] <= 1e-3
    assert result["one_step_scale"] > 0 and result["one_step_diff"] <= 1e-3
    assert result["four_steps_finite"] and result["four_steps_scale"] > 0


@pytest.mark.parametrize(("family", "prediction"), [("sd15-v", "V_PREDICTION"), ("sdxl-eps", "EPS"),
                                                    ("sdxl-v", "V_PREDICTION")])
def test_sdxl_and_v_prediction_models_distil_into_loras_the_stock_loader_reproduces(family, prediction, tmp_path):
    """SDXL (its ADM input y built by ComfyUI from the pooled output and sizes), v-prediction from the
    checkpoint's marker (SDXL) or the stock ModelSamplingDiscrete node (SD1.5)."""
    result = _probe("family-probe", family, str(tmp_path))
    assert result["prediction"] == prediction and result["has_adm"] == family.startswith("sdxl")
    assert result["lora_effect"] > 1e-2 and result["max_abs_diff"] <= 1e-3


def test_an_inpainting_model_distils_on_each_prompts_masked_image_and_samplercustom_reproduces(tmp_path):
    """An SD1.5 inpainting UNet (9 input channels): every prompt with its masked image's latent and mask, as
    InpaintModelConditioning writes them, which ComfyUI turns into the model's c_concat (mask and image, 5
    channels); the LoRA loads, and SamplerCustom on the same conditioning reproduces the engine's student."""
    result = _probe("family-probe", "sd15-inpaint", str(tmp_path))
    assert result["image_input"] == [1, 5, 8, 8] and result["prediction"] == "EPS" and not result["has_adm"]
    assert result["lora_effect"] > 1e-2 and result["max_abs_diff"] <= 1e-3


def test_a_plain_model_keeps_its_own_sampling_after_a_flow_patched_clone_of_it_ran(tmp_path):
    """A flow-patched clone (ModelSamplingSD3, shift 3) is read at the teacher node as a flow teacher; after it
    ran, the plain MODEL of the same checkpoint (whose shared BaseModel then held the flow sampling) is its eps
    self, and its LoRA student samples in ComfyUI as in the engine."""
    result = _probe("family-probe", "sd15-flow", str(tmp_path))
    assert result["flow_clone"] == {"prediction": "flow", "shift": 3.0}
    assert result["prediction"] == "EPS" and result["card"].get("comfy_noise") is None
    assert result["lora_effect"] > 1e-2 and result["max_abs_diff"] <= 1e-3


@pytest.mark.parametrize("family", ["sd3", "sd3-fp8", "sd3-fp8-scaled", "flux", "wan", "wan22-5b", "qwen-image",
                                    "lumina2", "auraflow", "hidream", "chroma", "chroma-radiance", "hunyuan-image",
                                    "omnigen2", "cosmos-predict2"])
def test_flow_models_distil_into_loras_the_stock_loader_applies_and_samplercustom_reproduces(family, tmp_path):
    """SD3 (a single file through the stock Load Diffusion Model; sd3-fp8: loaded with weight_dtype fp8_e4m3fn;
    sd3-fp8-scaled: a scaled fp8 file, as the Comfy-Org releases of Wan 2.2 and Flux Kontext ship, each weight in
    fp8 beside its scale), Flux dev (its guidance as an input, sampled with the stock FluxGuidance and CFG 1), Wan
    2.1, Wan 2.2 5B (a 48-channel latent of 16 pixels a side: the teacher's 64 x 64 pixels train on 4 x 4 latents)
    and Qwen-Image (video latents, distilled and sampled as one frame), HunyuanImage 2.1 (a 64-channel latent of 32
    pixels a side), Chroma Radiance (pixels, in patches of 16), Lumina 2 (its token count a scalar input, prompts of
    three lengths; OmniGen2 the same), AuraFlow (a 4-channel latent), HiDream (Llama hidden states as a second text
    input, mixture-of-experts blocks), Chroma (Flux blocks, real CFG) and Cosmos Predict2 text-to-image (its
    rectified flow, which ComfyUI feeds the variance-exploding sigma, so its student samples on Karras's grid of
    sigmas; its fps input, None for an image, is left out): the LoRA loads with no key left unloaded, and
    SamplerCustom with the student's sigmas (flow times t, on the flow grid of the model's shift) and SAMPLER
    reproduces the engine's student from the same noise. Over the fp8 base the adapters train and save in float32;
    the stock loader then merges W + delta W back into fp8 (stochastic rounding, 3 mantissa bits), so ComfyUI's
    sample is the student's up to that rounding: nearer to it than the teacher's is, not within float tolerance."""
    result = _probe("flow-probe", family, str(tmp_path))
    card = result["card"]
    assert result["model_class"] == {
        "sd3": "SD3", "sd3-fp8": "SD3", "sd3-fp8-scaled": "SD3", "flux": "Flux", "wan": "WAN21", "wan22-5b": "WAN22",
        "qwen-image": "QwenImage", "lumina2": "Lumina2", "auraflow": "AuraFlow", "hidream": "HiDream",
        "chroma": "Chroma", "chroma-radiance": "ChromaRadiance", "hunyuan-image": "HunyuanImage21",
        "omnigen2": "Omnigen2", "cosmos-predict2": "CosmosPredict2"}[family]
    fp8 = family.startswith("sd3-fp8")
    assert result["base_weight_dtypes"] == ["torch.float8_e4m3fn" if fp8 else "torch.float32"]
    assert result["lora_dtypes"] == ["torch.float32"]
    sides = {"wan22-5b": [4, 4], "hunyuan-image": [2, 2], "chroma-radiance": [64, 64]}
    assert result["train_latent"][-2:] == sides.get(family, [8, 8])  # of the teacher's 64 x 64 pixels
    # Flux, Qwen-Image and both Chromas: e^1.15
    shifts = {"sd3": 3.0, "sd3-fp8": 3.0, "sd3-fp8-scaled": 3.0, "flux": 3.1582, "wan": 8.0, "wan22-5b": 8.0,
              "qwen-image": 3.1582, "lumina2": 6.0, "auraflow": 1.73, "hidream": 1.0, "chroma": 3.1582,
              "chroma-radiance": 3.1582, "hunyuan-image": 5.0, "omnigen2": 2.6}
    if family == "cosmos-predict2":
        assert card["comfy_noise"] is None and card["schedule"]["name"] == "karras" and result["sigmas"][0] == 80
    else:
        assert card["comfy_noise"] == "flow" and card["schedule"]["name"] == "flow"
        assert card["schedule"]["shift"] == pytest.approx(shifts[family], rel=1e-4)
        assert result["sigmas"][0] == pytest.approx(80 / 81, abs=1e-4) and result["sigmas"][-1] < 1
    if family == "flux":
        assert card["embedded_guidance"] == 3.5 and result["cfg"] == 1.0
    else:
        assert card["embedded_guidance"] is None and result["cfg"] == 4.0
    assert result["unloaded_lora_keys"] == 0 and result["lora_key_example"].startswith("diffusion_model.")
    tolerance = 0.75 * result["lora_effect"] if fp8 else 1e-3
    # the tiny AuraFlow's LoRA moves its 4-channel sample by 8e-3, under the others' 1e-2 floor
    floor = 5e-3 if family == "auraflow" else 1e-2
    assert result["lora_effect"] > floor and result["max_abs_diff"] <= tolerance


@pytest.mark.parametrize(("family", "model_class", "cfg"), [("flux-kontext", "Flux", 1.0),
                                                          ("qwen-image-edit", "QwenImage", 4.0),
                                                          ("flux-fill", "Flux", 1.0)])
def test_editing_models_distil_on_their_reference_images_into_loras_that_samplercustom_reproduces(
        family, model_class, cfg, tmp_path):
    """Flux Kontext (guidance-distilled: every prompt with a reference image's latent, as ReferenceLatent adds it,
    placed as UXO places it, the text input the stock FluxKontextMultiReferenceLatentMethod sets, and a negative
    without either, sampled at CFG 1) and Qwen-Image-Edit (a negative per prompt, each encoded with its prompt's
    image, as TextEncodeQwenImageEdit encodes both, CFG 4); and Flux Fill, an inpainting DiT (every prompt with its
    masked image's latent and mask, as InpaintModelConditioning writes them, its network reading them beside the
    noise):
    the LoRA loads with no key left unloaded, and SamplerCustom on a prompt with its images reproduces the engine's
    student to 1e-4 (5.2e-6, 4.8e-6 and 5.2e-6 measured; an engine that left the references out lands 6.3e-4 and
    8.1e-4 off, one that left Flux Kontext's reference method at its default 2.4e-4)."""
    result = _probe("flow-probe", family, str(tmp_path))
    assert result["model_class"] == model_class and result["cfg"] == cfg
    assert result["card"]["embedded_guidance"] == (3.5 if cfg == 1.0 else None)
    assert result["unloaded_lora_keys"] == 0 and result["lora_key_example"].startswith("diffusion_model.")
    assert result["lora_effect"] > 1e-2 and result["max_abs_diff"] <= 1e-4


def test_the_edit_list_encodes_each_pair_through_qwen_image_edits_own_nodes_for_teacher_from_model(tmp_path):
    """Distill edit list, two images x two instructions, through ComfyUI's TextEncodeQwenImageEdit (the image at a
    megapixel for the text encoder and the VAE) and TextEncodeQwenImageEditPlus (the 2509 release: "Picture 1" and
    its template, the image at 384 x 384 for the text encoder): each pair and each image's negative encoded once,
    the reference latents of one size, and Teacher from MODEL on a tiny Qwen-Image-Edit model takes them and
    evaluates the guided teacher (``edit_list_probe``: stand-ins for the 7B text encoder and the VAE); the VAE encodes
    each image once."""
    result = _probe("edit-list-probe", str(tmp_path))
    pairs = ["add snow", "make it night", ""] * 2  # each image's instructions, then its negative
    for editor, prefix, side, options in (("Qwen-Image-Edit", "", 1024, []),
                                          ("Qwen-Image-Edit 2509", "Picture 1: <|vision_start|><|image_pad|>"
                                           "<|vision_end|>", 384, ["llama_template"])):
        out = result[editor]
        assert out["entries"] == [4, 4] and out["fitted"] == [2, 64, 64, 3]
        assert [t["text"] for t in out["tokenized"]] == [prefix + text for text in pairs]
        assert all(t["images"] == [[1, side, side, 3]] and t["options"] == options for t in out["tokenized"])
        assert out["vae_encoded"] == [[1, 1024, 1024, 3]] * 2  # once per image
        assert out["reference_latents"] == [[1, 16, 1, 128, 128]] * 4
        assert out["references_per_entry"] == [1] * 8 and out["distinct_references"] == 2  # each entry its image's
        assert out["guided_finite"] and out["guided_shape"] == [2, 16, 1, 8, 8]


def test_the_image_to_video_list_encodes_each_start_image_through_wanimagetovideo_for_teacher_from_model(tmp_path):
    """Distill image-to-video list, two start images x two prompts, through ComfyUI's WanImageToVideo and
    CLIPVisionEncode (uncropped): each image's clip (9 frames) and CLIP vision reading encoded once, every prompt
    and its negative carrying the start frames' latent, mask and the reading of its own image, and Teacher from MODEL
    on a tiny Wan 2.1 image-to-video model takes them and evaluates the guided teacher on a clip; for Wan 2.2 5B,
    image i with prompt i through Wan22ImageToVideoLatent, its start latents one per prompt into Teacher from MODEL's
    start_latent on a tiny Wan 2.2 5B model, and the same for LTX-Video through LTXVImgToVideo; for HunyuanVideo,
    each prompt and the negative through TextEncodeHunyuanVideo_ImageToVideo with its image's CLIPVisionEncode
    reading, then HunyuanImageToVideo (v1, concat; and v2, replace, its start latents into start_latent), into
    Teacher from MODEL at its guidance input
    (``start_image_list_probe``: stand-ins for the text encoders, the VAEs and the vision models)."""
    result = _probe("start-image-list-probe", str(tmp_path))
    assert result["entries"] == [4, 4] and result["fitted"] == [2, 64, 64, 3]
    assert result["vae_encoded"] == [[9, 64, 64, 3]] * 2 and result["vision_encoded"] == [[[1, 64, 64, 3], False]] * 2
    assert all(inputs["concat_latent_image"] == [1, 16, 3, 8, 8] and inputs["concat_mask"] == [1, 1, 3, 8, 8]
               for inputs in result["inputs"])
    means = result["image_means"]
    assert result["vision_features"] == [means[0], means[0], means[1], means[1]] and means[0] != means[1]
    assert result["negative_shares_images"] and result["guided_finite"] and result["guided_shape"] == [2, 16, 3, 8, 8]
    hunyuan = result["hunyuan-video-i2v-clip"]  # the text encoder reads each image; every entry carries its frames
    assert hunyuan["entries"] == [4, 4] and len(hunyuan["tokenized"]) == 6
    assert all(t["options"] == ["image_embeds", "image_interleave", "llama_template"] for t in hunyuan["tokenized"])
    first, second = hunyuan["image_means"]
    assert [t["image"] for t in hunyuan["tokenized"]] == [first] * 3 + [second] * 3 and first != second
    assert hunyuan["inputs"] == [["concat_latent_image", "concat_mask", "pooled_output"]] * 8
    assert hunyuan["guided_finite"] and hunyuan["guided_shape"] == [2, 16, 3, 8, 8]
    v2 = result["hunyuan-video-v2-clip"]  # every entry guided by its start frame, which each prompt's LATENT holds
    assert v2["entries"] == [4, 4] and v2["inputs"] == [["guiding_frame_index", "pooled_output"]] * 8
    assert v2["start_samples"] == [4, 16, 3, 8, 8] and v2["kept_frames"] == [[0.0, 1.0, 1.0]] * 4
    assert v2["guided_finite"] and v2["guided_shape"] == [2, 16, 3, 8, 8]
    for family, clip in (("wan22-5b-i2v-clip", [48, 3, 4, 4]), ("ltxv-i2v-clip", [128, 3, 2, 2])):
        out = result[family]  # image i with prompt i, each clip starting from its image's latent frame
        assert out["entries"] == [2, 2] and out["images_differ"] and out["start_samples"] == [2, *clip]
        assert out["kept_frames"] == [[0.0, 1.0, 1.0]] * 2  # LTX-Video at strength 1: its first frame kept whole
        assert out["guided_finite"] and out["guided_shape"] == [2, *clip]


@pytest.mark.parametrize(("family", "model_class", "latent", "shift"), [
    ("wan-clip", "WAN21", [16, 3, 8, 8], 8.0),
    ("wan-i2v-clip", "WAN21", [16, 3, 8, 8], 8.0),
    ("wan22-5b-clip", "WAN22", [48, 3, 4, 4], 8.0),
    ("wan22-5b-i2v-clip", "WAN22", [48, 3, 4, 4], 8.0),
    ("hunyuan-video-clip", "HunyuanVideo", [16, 3, 8, 8], 7.0),
    ("hunyuan-video-i2v-clip", "HunyuanVideoI2V", [16, 3, 8, 8], 7.0),
    ("hunyuan-video-v2-clip", "HunyuanVideo", [16, 3, 8, 8], 7.0),
    ("ltxv-clip", "LTXV", [128, 3, 2, 2], 10.6974),
    ("ltxv-i2v-clip", "LTXV", [128, 3, 2, 2], 10.6974),
    ("mochi-clip", "GenmoMochi", [12, 3, 8, 8], 6.0),
    ("cosmos-clip", "CosmosVideo", [16, 3, 8, 8], None)])
def test_video_models_distil_on_clips_into_loras_that_samplercustom_reproduces_on_a_clip(family, model_class, latent,
                                                                                        shift, tmp_path):
    """Teacher from MODEL with a length: Wan 2.1 (text- and image-to-video: every prompt with its start frame's
    latent and mask, as WanImageToVideo writes them), Wan 2.2 5B (its 48-channel latent 16 pixels a side; and
    image-to-video: its start image in the LATENT of the stock Wan22ImageToVideoLatent, the teacher's start_latent
    and SamplerCustom's latent with its noise mask) and HunyuanVideo (guidance-distilled: its guidance an input,
    sampled with the stock FluxGuidance and CFG 1; and image-to-video, every prompt with its start frame's latent and
    mask, as HunyuanImageToVideo's v1 (concat) writes them on the positive alone; and v2 (replace), its guiding
    frame on every prompt and its start image in the LATENT, as HunyuanImageToVideo writes them) train on clips of
    9 frames, 3 latent frames of 4 frames each,
    LTX-Video on 17 frames, 3 latent frames of 8 (its 128 channels 32 pixels a side; and image-to-video from the
    LATENT of the stock LTXVImgToVideo at strength 0.9, as Wan 2.2 5B's), Mochi on 13, 3 latent frames of 6 (its
    token count a scalar input), and Cosmos 1 on 17 (an EDM model: Karras's sigmas from 80); T5 prompts padded to
    one length with their masks. The LoRA loads with no key left unloaded, and SamplerCustom with the student's
    sigmas and SAMPLER on a latent of the same frames reproduces the engine's student clip from the same noise."""
    result = _probe("flow-probe", family, str(tmp_path))
    card = result["card"]
    assert result["model_class"] == model_class and result["train_latent"] == latent
    if shift is None:  # Cosmos 1: EDM
        assert card["comfy_noise"] is None and card["schedule"]["name"] == "karras" and result["sigmas"][0] == 80
    else:
        assert card["comfy_noise"] == "flow" and card["schedule"]["shift"] == pytest.approx(shift, rel=1e-4)
    guided = family.startswith("hunyuan-video")
    assert card["embedded_guidance"] == (3.5 if guided else None) and result["cfg"] == (1.0 if guided else 4.0)
    assert result["unloaded_lora_keys"] == 0 and result["lora_key_example"].startswith("diffusion_model.")
    assert result["lora_effect"] > 1e-2 and result["max_abs_diff"] <= 1e-3
    if family in ("wan22-5b-i2v-clip", "ltxv-i2v-clip", "hunyuan-video-v2-clip"):  # the clip follows its start
        # image (6.7e-4, 8.9e-4 and 2.8e-4 for the image's negative: the tiny models' frames see each other little),
        # and the engine agrees to 3.3e-6, 3.1e-6 and 3.3e-6 (handed the start frame noisy, not clean, Wan 2.2 5B's
        # lands 3.9e-4 off, LTX-Video's 0.32)
        assert result["start_effect"] > 1e-4 and result["max_abs_diff"] <= 1e-4


def test_two_models_distil_into_a_lora_each_that_two_chained_samplers_reproduce(tmp_path):
    """Wan 2.2 14B's shape: two tiny Wan models of other weights as its high- and low-noise models, one teacher
    switched at t = 0.875. Its 4-step student's evaluations lie on both sides (t = 0.956 and 0.907 high, 0.825
    and 0.655 low); each model's LoRA loads on it with no key left unloaded, and the two SamplerCustom runs that
    Student sigmas for two models splits the steps into (the second adds no noise) give the engine's sample,
    on the stock loader's MODELs and on the node's own."""
    result = _probe("two-model-probe", "sfd", str(tmp_path))
    assert result["card"] == {"comfy_experts": {"boundary": 0.875}, "comfy_noise": "flow", "nfe": 4}
    assert result["student_model"] == "NoneType" and result["unloaded_lora_keys"] == 0
    assert result["same_layers"] and result["keys"]["high"] > 0 and result["key_example"].startswith("diffusion_model.")
    assert result["sigmas_high"] == pytest.approx([0.9877, 0.9558, 0.9074, 0.8252], abs=1e-4)
    assert result["sigmas_low"][0] == result["sigmas_high"][-1] and len(result["sigmas_low"]) == 3
    assert result["lora_effect"] > 1e-3 and result["max_abs_diff"] <= 1e-4 and result["node_models_diff"] == 0
    assert result["drawn_diff"] == 0  # Euler draws no noise


def test_a_dmd2_student_of_two_models_samples_through_two_chained_samplers(tmp_path):
    """The same two tiny Wan models distilled by DMD2 to 4 steps, a re-noising student: the first SamplerCustom
    ends by noising its image to the first time below the boundary, the second goes on from there. With the fresh
    noise fixed (zero) the pair gives the engine's sample on the stock loader's MODELs and on the node's own;
    with it drawn, the pair's sample differs from that."""
    result = _probe("two-model-probe", "dmd2", str(tmp_path))
    assert result["card"] == {"comfy_experts": {"boundary": 0.875}, "comfy_noise": "flow", "nfe": 4}
    assert result["sampler"] == "renoise" and result["unloaded_lora_keys"] == 0 and result["same_layers"]
    assert result["sigmas_low"][0] == result["sigmas_high"][-1] < 0.875 <= result["sigmas_high"][-2]
    assert result["sigmas_low"][-1] == 0 and len(result["sigmas_high"]) + len(result["sigmas_low"]) == 6
    assert result["lora_effect"] > 1e-3 and result["max_abs_diff"] <= 1e-4 and result["node_models_diff"] == 0
    assert result["drawn_diff"] > 1e-3


def test_pixart_sigma_distils_into_a_lora_the_stock_loader_applies_and_samplercustom_reproduces(tmp_path):
    """PixArt Sigma, an eps DiT reading T5 tokens, at 512 x 512 pixels: its position table needs a mean latent
    side over 32, so the run's memory plan probes it at its own size rather than at a half and a quarter."""
    result = _probe("flow-probe", "pixart-sigma", str(tmp_path))
    card = result["card"]
    assert result["model_class"] == "PixArt" and result["train_latent"] == [4, 64, 64]
    assert card["comfy_noise"] is None and card["schedule"]["name"] == "karras"
    assert result["sigmas"][0] == pytest.approx(card["schedule"]["sigma_max"], rel=1e-4)
    assert result["sigmas"][0] > 100  # its sqrt-linear schedule's top sigma (157), not SD's 14.6
    assert result["unloaded_lora_keys"] == 0 and result["cfg"] == 4.0
    assert result["lora_effect"] > 1e-2 and result["max_abs_diff"] <= 1e-3


def test_hunyuan_dit_distils_into_a_lora_the_stock_loader_applies_and_samplercustom_reproduces(tmp_path):
    """HunyuanDiT, a v-prediction DiT reading a BERT's and mT5's tokens, each with its mask: prompts of three
    lengths padded to their encoders' lengths, as ComfyUI's tokenizers pad them to 77 and 256, and a negative
    whose BERT tokens and mask run past the padding (each row runs on its own tokens and mask)."""
    result = _probe("flow-probe", "hunyuan-dit", str(tmp_path))
    card = result["card"]
    assert result["model_class"] == "HunyuanDiT" and result["train_latent"] == [4, 8, 8]
    assert card["comfy_noise"] is None and card["schedule"]["name"] == "karras"
    assert result["sampling"][1] == "ModelSamplingDiscrete" and result["cfg"] == 4.0
    assert result["unloaded_lora_keys"] == 0 and result["lora_key_example"].startswith("diffusion_model.")
    assert result["lora_effect"] > 1e-2 and result["max_abs_diff"] <= 1e-3


# ------------------------------------------------------------------ a real server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, base: Path):
        self.base, self.port = base, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        (base / "custom_nodes").mkdir(parents=True)
        (base / "custom_nodes" / "comfyui-distill").symlink_to(ROOT)
        self.log = open(base / "server.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
             "--disable-auto-launch", "--base-directory", str(base)],
            cwd=COMFYUI, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 180
        while time.time() < deadline:
            assert self.proc.poll() is None, self.tail()
            try:
                self.get("/object_info/DistillToSteps")
                return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(1)
        raise TimeoutError("ComfyUI did not start:\n" + self.tail())

    def tail(self) -> str:
        self.log.flush()
        return (self.base / "server.log").read_text()[-6000:]

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=60) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict | None = None):
        request = urllib.request.Request(self.url + path, data=json.dumps(body or {}).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                text = r.read()
        except urllib.error.HTTPError as e:
            raise AssertionError(f"{path}: {e.code} {e.read().decode()[:3000]}") from e
        return json.loads(text) if text else {}

    def queue(self, graph: dict) -> str:
        return self.post("/prompt", {"prompt": graph, "client_id": uuid.uuid4().hex})["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                entry = history[prompt_id]
                if entry["status"]["status_str"] != "error" or entry["status"]["messages"]:
                    return entry
            time.sleep(1)
        raise TimeoutError(f"prompt {prompt_id} did not finish:\n" + self.tail())

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, checkpoint):
    base = tmp_path_factory.mktemp("comfy")
    (base / "models" / "checkpoints").mkdir(parents=True)
    (base / "models" / "checkpoints" / checkpoint.name).symlink_to(checkpoint)
    s = Server(base)
    yield s
    s.stop()


def _workflow(name: str) -> dict:
    return json.loads((ROOT / "workflows" / name).read_text())


#: the text encoder of the workflow tests: the tiny CLIP-L through the stock CLIPLoader as an SD3 text encoder
#: (4096-wide tokens, its pooled vector 2048 wide)
TINY_CLIP = {"class_type": "CLIPLoader", "inputs": {"clip_name": "tiny_clip_l.safetensors", "type": "sd3"}}


def _short_workflow(name: str, checkpoint: str, **distill) -> dict:
    """A shipped checkpoint workflow on a tiny checkpoint: 64x64 images, a short run."""
    graph = _workflow(f"api/{name}.json")
    for node in graph.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = checkpoint
        elif kind in ("DistillTeacherFromModel", "DistillEditList", "EmptyLatentImage", "EmptySD3LatentImage",
                      "ImageScale"):
            inputs.update(width=64, height=64)
        elif kind in ("DistillToSteps", "DistillDistributionMatching"):
            inputs.update({"iterations": 4, "batch": 2, "preview_every": 2, "checkpoint_every": 2, **distill})
    return graph


def _sd15_workflow(name: str = "sd15_lora_4_steps", **distill) -> dict:
    """An SD1.5 workflow (b, or its DMD2 twin) on the tiny checkpoint."""
    return _short_workflow(name, "tiny_sd15.safetensors", **distill)


def _images(entry: dict, base: Path) -> list[Path]:
    return [base / i["type"] / i["subfolder"] / i["filename"]
            for out in entry["outputs"].values() for i in out.get("images", [])]


def _saves_one_image(server, graph: dict) -> None:
    """``graph`` runs on the server and saves one image."""
    entry = server.wait(server.queue(graph))
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    images = _images(entry, server.base)
    assert len(images) == 1 and images[0].stat().st_size > 0


def test_the_server_lists_the_nodes_and_serves_the_web_extension(server):
    info = server.get("/object_info")
    ours = {k for k in info if k.startswith("Distill")}
    assert {"DistillToSteps", "DistillTeacherFromModel", "DistillStudentSchedule", "DistillMonitor"} <= ours
    assert all(info[k]["category"].startswith("distill/") for k in ours)
    assert any(e.endswith("/distill.js") for e in server.get("/extensions"))
    stock = json.loads((ROOT / "tests" / "data" / "stock_nodes.json").read_text())["nodes"]
    for name, entry in stock.items():  # what the offline workflow tests validate against is this ComfyUI's
        assert (info[name]["input_order"], info[name]["output"]) == (entry["input_order"], entry["output"]), name
    templates = server.get("/workflow_templates")["comfyui-distill"]  # the UI workflows, not their API twins
    assert sorted(templates) == sorted(p.stem for p in (ROOT / "workflows").glob("*.json"))


def test_workflow_b_sd15_lora_with_stock_nodes(server):
    """Load Checkpoint -> Distill to 4 steps (LoRA) -> SamplerCustom with the student's sigmas -> Save Image."""
    _saves_one_image(server, _sd15_workflow())
    lora = server.base / "models" / "loras" / "sd15_sfd_4step_lora.safetensors"
    card = read_card(lora)
    assert card["student"]["kind"] == "lora" and card["nfe"] == 4 and card["guidance"]["mode"] == "cfg"
    with safe_open(str(lora), "pt") as f:
        assert all(k.startswith("diffusion_model.") for k in f.keys())


def test_the_sd15_dmd2_workflow_trains_a_2_step_lora_that_samplercustom_samples(server):
    """Load Checkpoint -> Distill to 1-4 steps (DMD2, two LoRAs on the one model) -> SamplerCustom with the
    student's sigmas, its re-noising sampler and cfg 1 -> Save Image."""
    _saves_one_image(server, _sd15_workflow("sd15_dmd2_lora_2_steps"))
    card = read_card(server.base / "models" / "loras" / "sd15_dmd2_2step_lora.safetensors")
    assert (card["method"], card["sampler"], card["nfe"]) == ("dmd2", "renoise", 2)
    assert card["student"]["kind"] == "lora" and card["guidance"] == {"mode": "distilled", "w": 5.0}


@pytest.fixture(scope="module")
def sdxl_checkpoint(server, tmp_path_factory) -> str:
    """The smallest checkpoint ComfyUI reads as SDXL (its two text encoders at full size), in the server's
    checkpoints folder."""
    checkpoint = tmp_path_factory.mktemp("sdxl") / "tiny_sdxl.safetensors"
    _harness("sdxl-checkpoint", str(checkpoint))
    (server.base / "models" / "checkpoints" / checkpoint.name).symlink_to(checkpoint)
    return checkpoint.name


def _sdxl_workflow(name: str, checkpoint: str) -> dict:
    """An SDXL workflow on the tiny checkpoint, on two of its prompts (each an OpenCLIP bigG pass on a CPU)."""
    graph = _short_workflow(name, checkpoint)
    prompts = next(node["inputs"] for node in graph.values() if node["class_type"] == "DistillPromptList")
    prompts["prompts"] = "\n".join(prompts["prompts"].splitlines()[:2])
    return graph


def test_the_sdxl_workflow_trains_a_4_step_lora_that_samplercustom_samples(server, sdxl_checkpoint):
    """Load Checkpoint (SDXL) -> Distill to 4 steps (LoRA) -> SamplerCustom with the student's sigmas -> Save
    Image."""
    _saves_one_image(server, _sdxl_workflow("sdxl_lora_4_steps", sdxl_checkpoint))
    lora = server.base / "models" / "loras" / "sdxl_sfd_4step_lora.safetensors"
    card = read_card(lora)
    assert (card["method"], card["nfe"], card["student"]["kind"]) == ("sfd", 4, "lora")
    assert card["guidance"]["mode"] == "cfg" and "comfy_noise" not in card  # an eps model, sampled in sigmas
    with safe_open(str(lora), "pt") as f:
        assert any(k.startswith("diffusion_model.middle_block.") for k in f.keys())


def test_the_sdxl_dmd2_workflow_trains_a_4_step_lora_that_samplercustom_samples(server, sdxl_checkpoint):
    """Load Checkpoint (SDXL) -> Distill to 1-4 steps (DMD2, two LoRAs on the one model) -> SamplerCustom with
    the student's sigmas, its re-noising sampler and cfg 1 -> Save Image."""
    _saves_one_image(server, _sdxl_workflow("sdxl_dmd2_lora_4_steps", sdxl_checkpoint))
    card = read_card(server.base / "models" / "loras" / "sdxl_dmd2_4step_lora.safetensors")
    assert (card["method"], card["sampler"], card["nfe"]) == ("dmd2", "renoise", 4)
    assert card["student"]["kind"] == "lora" and card["student"]["rank"] == 64
    assert card["guidance"] == {"mode": "distilled", "w": 8.0}


@pytest.fixture(scope="module")
def sd3_files(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sd3")
    _harness("sd3-checkpoint", str(folder / "tiny_sd35.safetensors"), str(folder / "tiny_clip_l.safetensors"))
    return folder


def test_the_sd35_workflow_trains_a_4_step_lora_that_samplercustom_samples(server, sd3_files):
    """Load Checkpoint (SD3.5) and its text encoders -> Distill to 4 steps (LoRA) -> SamplerCustom with the
    student's sigmas -> Save Image, on a tiny SD3 checkpoint. Its text encoder is one CLIP-L through the stock
    CLIPLoader (type sd3), in place of TripleCLIPLoader's three full-size encoders (T5-XXL alone is 4.7B
    parameters)."""
    models = server.base / "models"
    (models / "checkpoints" / "tiny_sd35.safetensors").symlink_to(sd3_files / "tiny_sd35.safetensors")
    (models / "text_encoders").mkdir(exist_ok=True)
    (models / "text_encoders" / "tiny_clip_l.safetensors").symlink_to(sd3_files / "tiny_clip_l.safetensors")
    graph = _short_workflow("sd35_lora_4_steps", "tiny_sd35.safetensors")
    loaders = [nid for nid, node in graph.items() if node["class_type"] == "TripleCLIPLoader"]
    assert len(loaders) == 1
    graph[loaders[0]] = TINY_CLIP
    _saves_one_image(server, graph)
    lora = models / "loras" / "sd35_sfd_4step_lora.safetensors"
    card = read_card(lora)
    assert (card["method"], card["nfe"], card["comfy_noise"]) == ("sfd", 4, "flow")
    assert card["student"]["kind"] == "lora" and card["guidance"] == {"mode": "cfg", "w": 4.5}
    with safe_open(str(lora), "pt") as f:
        assert any(k.startswith("diffusion_model.joint_blocks.") for k in f.keys())


@pytest.fixture(scope="module")
def flux_files(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("flux")
    _harness("flux-files", str(folder / "tiny_flux_dev.safetensors"), str(folder / "tiny_flux_vae.safetensors"))
    return folder


def _link_models(server, files: dict[str, Path]) -> None:
    """Each of ``files`` (name: path) in the server's models folder of its kind: a VAE, a text encoder (a CLIP), or
    else a diffusion model."""
    for file, source in files.items():
        folder = server.base / "models" / ("vae" if "vae" in file else "text_encoders" if "clip" in file
                                           else "diffusion_models")
        folder.mkdir(exist_ok=True)
        if not (folder / file).exists():
            (folder / file).symlink_to(source)


def _flux_workflow(server, sd3_files: Path, flux_files: Path, name: str) -> dict:
    """The shipped Flux workflow ``name``, short, on the small Flux model and its VAE, with one CLIP-L through the
    stock CLIPLoader (type sd3) in place of DualCLIPLoader's CLIP-L and T5-XXL (4.7B parameters)."""
    _link_models(server, {"tiny_flux_dev.safetensors": flux_files / "tiny_flux_dev.safetensors",
                          "tiny_flux_vae.safetensors": flux_files / "tiny_flux_vae.safetensors",
                          "tiny_clip_l.safetensors": sd3_files / "tiny_clip_l.safetensors"})
    graph = _short_workflow(name, "", iterations=2, batch=1, preview_every=1, checkpoint_every=1)
    for nid, node in list(graph.items()):
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "UNETLoader":
            inputs["unet_name"] = "tiny_flux_dev.safetensors"
        elif kind == "VAELoader":
            inputs["vae_name"] = "tiny_flux_vae.safetensors"
        elif kind == "DualCLIPLoader":
            graph[nid] = TINY_CLIP
    return graph


def _saved_flux_lora(server, name: str, guidance: float) -> None:
    """The LoRA ``name`` a Flux workflow saved: a 4-step SFD student of the flow model at its guidance input, sampled
    without CFG, with keys on Flux's double blocks."""
    card = read_card(server.base / "models" / "loras" / f"{name}.safetensors")
    assert (card["method"], card["nfe"], card["comfy_noise"], card["embedded_guidance"]) == ("sfd", 4, "flow",
                                                                                            guidance)
    assert card["student"]["kind"] == "lora" and card["guidance"]["w"] == 1.0
    with safe_open(str(server.base / "models" / "loras" / f"{name}.safetensors"), "pt") as f:
        assert any(k.startswith("diffusion_model.double_blocks.") for k in f.keys())


def test_the_flux_dev_workflow_trains_a_4_step_lora_that_samplercustom_samples_at_its_guidance(server, sd3_files,
                                                                                             flux_files):
    """Load Diffusion Model (Flux dev, in fp8) and its text encoders and VAE -> Teacher from MODEL at guidance 3.5
    (its input) -> Distill to 4 steps (LoRA) -> SamplerCustom with the student's sigmas, FluxGuidance 3.5 and cfg
    1 -> Save Image, on a small Flux dev model (two iterations of one image: its blocks have Flux's full width;
    ``_flux_workflow``)."""
    _saves_one_image(server, _flux_workflow(server, sd3_files, flux_files, "flux_dev_lora_4_steps"))
    _saved_flux_lora(server, "flux_dev_sfd_4step_lora", 3.5)


def test_the_flux_kontext_workflow_trains_a_4_step_lora_on_edits_of_an_image(server, sd3_files, flux_files):
    """Load Image -> Distill edit list (every instruction on the image: CLIP Text Encode and the stock ReferenceLatent
    on its VAE latent) -> Teacher from MODEL at guidance 2.5 (Kontext dev's input; its network is Flux dev's) ->
    Distill to 4 steps (LoRA) -> SamplerCustom with the student's sigmas on a new instruction with the same image
    (Image Scale, VAE Encode, ReferenceLatent), FluxGuidance 2.5 and cfg 1 -> Save Image, on the small Flux model
    (``_flux_workflow``), 64-pixel images and a folder of two more images in ComfyUI's input folder."""
    import numpy as np
    from PIL import Image

    folder = server.base / "input" / "kontext_edits"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, size in (("kontext_probe.png", (64, 64)), ("kontext_edits/a.png", (48, 80)),
                       ("kontext_edits/b.jpg", (80, 40))):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(server.base / "input" / name)
    assert "kontext_edits" in server.get("/object_info/DistillEditList")["DistillEditList"]["input"]["optional"][
        "image_folder"][0]
    graph = _flux_workflow(server, sd3_files, flux_files, "flux_kontext_lora_4_steps")
    for node in graph.values():
        if node["class_type"] == "LoadImage":
            node["inputs"]["image"] = "kontext_probe.png"
        elif node["class_type"] == "DistillEditList":
            node["inputs"]["image_folder"] = "kontext_edits"
    entry = server.wait(server.queue(graph))
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    assert len(_images(entry, server.base)) == 1
    edit_list = next(k for k, node in graph.items() if node["class_type"] == "DistillEditList")
    assert entry["outputs"][edit_list]["text"] == ["3 images x 12 instructions -> 36 training prompts"]
    _saved_flux_lora(server, "flux_kontext_sfd_4step_lora", 2.5)


@pytest.fixture(scope="module")
def wan_files(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("wan")
    _harness("wan-files", str(folder / "tiny_wan21.safetensors"), str(folder / "tiny_wan_vae.safetensors"),
             str(folder / "tiny_wan_low_noise.safetensors"))
    return folder


@pytest.fixture(scope="module")
def wan22_5b_files(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("wan22_5b")
    _harness("wan22-5b-files", str(folder / "tiny_wan22_5b.safetensors"), str(folder / "tiny_wan22_vae.safetensors"))
    return folder


def _wan_workflow(server, sd3_files: Path, wan_files: Path, name: str) -> dict:
    """A shipped Wan workflow on the tiny Wan files in ``wan_files`` (``wan_files``: the Wan 2.1 model, its
    VAE and a low-noise model of other weights, as Wan 2.2 14B's; ``wan22_5b_files``: a Wan 2.2 5B model and the
    Wan 2.2 VAE), a CLIP-L through the stock CLIPLoader (type sd3, 4096-wide tokens, as UMT5-XXL's) in place of
    UMT5-XXL (5.7B parameters), clips of 5 frames (2 latent frames) at 64 x 64 pixels, 4 iterations."""
    files = {path.name: path for path in wan_files.glob("*.safetensors")}
    files["tiny_clip_l.safetensors"] = sd3_files / "tiny_clip_l.safetensors"
    _link_models(server, files)
    high = next(f for f in files if f.startswith("tiny_wan2") and "vae" not in f)  # Wan 2.1 or Wan 2.2 5B
    graph = _workflow(f"api/{name}.json")
    for node in graph.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "UNETLoader":
            inputs["unet_name"] = "tiny_wan_low_noise.safetensors" if "low_noise" in inputs["unet_name"] else high
        elif kind == "VAELoader":
            inputs["vae_name"] = next(file for file in files if "vae" in file)
        elif kind == "CLIPLoader":
            inputs.update(TINY_CLIP["inputs"])
        elif kind in ("DistillTeacherFromModel", "DistillImageToVideoList", "EmptyHunyuanLatentVideo",
                      "Wan22ImageToVideoLatent", "WanImageToVideo"):
            inputs.update(width=64, height=64, length=5)
        elif kind == "DistillToSteps":
            inputs.update(iterations=4, batch=2, preview_every=2, checkpoint_every=2)
    return graph


@pytest.mark.parametrize(("name", "files", "w"), [("wan21_lora_4_steps", "wan_files", 6.0),
                                                ("wan22_5b_lora_4_steps", "wan22_5b_files", 5.0)])
def test_the_wan_workflows_train_a_4_step_lora_on_clips_and_sample_a_clip(server, sd3_files, request, name, files,
                                                                          w):
    """Load Diffusion Model (Wan 2.1 text-to-video; Wan 2.2 TI2V 5B) -> ModelSamplingSD3 -> Teacher from MODEL on
    clips of 5 frames (2 latent frames; 5B's of 48 channels, 16 pixels a side) -> Distill to 4 steps (LoRA) ->
    SamplerCustom with the student's sigmas on the stock EmptyHunyuanLatentVideo (5B: Wan22ImageToVideoLatent) of
    the same length -> VAE Decode (the stock Wan 2.1 VAE; the Wan 2.2 VAE) -> an animated WEBP, on a tiny model
    (``_wan_workflow``)."""
    models = server.base / "models"
    entry = server.wait(server.queue(_wan_workflow(server, sd3_files, request.getfixturevalue(files), name)))
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    clips = [image for image in _images(entry, server.base) if image.suffix == ".webp"]  # Save Animated WEBP's
    assert len(clips) == 1 and clips[0].stat().st_size > 0
    card = read_card(models / "loras" / f"{name.replace('lora_4_steps', 'sfd_4step_lora')}.safetensors")
    assert (card["method"], card["nfe"], card["comfy_noise"]) == ("sfd", 4, "flow")
    assert card["schedule"]["shift"] == pytest.approx(8.0) and card["guidance"] == {"mode": "cfg", "w": w}


def test_the_wan22_14b_workflow_trains_a_lora_per_model_and_samples_a_clip_with_two_samplers(server, sd3_files,
                                                                                          wan_files):
    """Two Load Diffusion Model nodes (the high- and low-noise models) -> ModelSamplingSD3 on each -> Teacher
    from MODEL with both on clips -> Distill to 4 steps (LoRA) -> Student sigmas for two models -> two chained
    SamplerCustom nodes on its MODELs -> VAE Decode -> an animated WEBP, on tiny Wan files; the two LoRAs are
    written beside the student file, each with its model's keys."""
    models = server.base / "models"
    entry = server.wait(server.queue(_wan_workflow(server, sd3_files, wan_files, "wan22_14b_lora_4_steps")))
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    clips = [image for image in _images(entry, server.base) if image.suffix == ".webp"]
    assert len(clips) == 1 and clips[0].stat().st_size > 0
    student = models / "loras" / "wan22_14b_sfd_4step_lora.safetensors"
    card = read_card(student)
    assert (card["method"], card["nfe"], card["comfy_experts"]) == ("sfd", 4, {"boundary": 0.875})
    for name in ("high", "low"):
        lora = student.with_name(f"{student.stem}_{name}_noise.safetensors")
        assert read_card(lora)["student"] == student.name
        with safe_open(str(lora), "pt") as f:
            assert all(k.startswith("diffusion_model.") for k in f.keys())
            assert any(k.startswith("diffusion_model.blocks.0.") for k in f.keys())


def test_the_wan22_14b_image_to_video_workflow_trains_on_start_images_and_samples_a_clip_from_one(server, sd3_files,
                                                                                                  wan_files, tmp_path):
    """Load Image and a folder of two more start images -> Distill image-to-video list (each through
    WanImageToVideo) -> Teacher from MODEL on the two models of a Wan 2.2 image-to-video release (boundary 0.9) ->
    Distill to 4 steps (LoRA) -> Student sigmas for two models -> WanImageToVideo on a new prompt and the image ->
    two chained SamplerCustom nodes -> an animated WEBP, on tiny image-to-video models (36 input channels) and the
    tiny Wan VAE; the list encoded every motion on each of the three images."""
    import numpy as np
    from PIL import Image

    _harness("wan-i2v-files", str(tmp_path / "tiny_wan22_i2v_high.safetensors"),
             str(tmp_path / "tiny_wan22_i2v_low.safetensors"))
    _link_models(server, {name: tmp_path / name for name in ("tiny_wan22_i2v_high.safetensors",
                                                             "tiny_wan22_i2v_low.safetensors")})
    folder = server.base / "input" / "start_frames"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for name, size in (("i2v_probe.png", (64, 64)), ("start_frames/a.png", (48, 80)), ("start_frames/b.png", (80, 48))):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(server.base / "input" / name)
    graph = _wan_workflow(server, sd3_files, wan_files, "wan22_14b_i2v_lora_4_steps")
    for node in graph.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "UNETLoader":
            inputs["unet_name"] = f"tiny_wan22_i2v_{'low' if 'low_noise' in inputs['unet_name'] else 'high'}" \
                                  ".safetensors"
        elif kind == "LoadImage":
            inputs["image"] = "i2v_probe.png"
        elif kind == "DistillImageToVideoList":
            inputs["image_folder"] = "start_frames"
    entry = server.wait(server.queue(graph))
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    clips = [image for image in _images(entry, server.base) if image.suffix == ".webp"]
    assert len(clips) == 1 and clips[0].stat().st_size > 0
    listed = next(k for k, node in graph.items() if node["class_type"] == "DistillImageToVideoList")
    assert entry["outputs"][listed]["text"] == ["3 images x 12 prompts -> 36 training prompts"]
    student = server.base / "models" / "loras" / "wan22_14b_i2v_sfd_4step_lora.safetensors"
    card = read_card(student)
    assert (card["method"], card["nfe"], card["comfy_experts"]) == ("sfd", 4, {"boundary": 0.9})
    assert card["guidance"] == {"mode": "cfg", "w": 3.5}
    for name in ("high", "low"):
        with safe_open(str(student.with_name(f"{student.stem}_{name}_noise.safetensors")), "pt") as f:
            assert any(k.startswith("diffusion_model.blocks.0.") for k in f.keys())


def test_workflow_a_builtin_teacher(server):
    entry = server.wait(server.queue(_workflow("api/builtin_distill_4_steps.json")))
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    assert (server.base / "models" / "diffusion_models" / "digits_4step.safetensors").is_file()
    images = _images(entry, server.base)  # Few-step sample's previews
    assert len(images) == 10 and all(p.parent.name == "temp" and p.stat().st_size > 0 for p in images)


def test_the_three_methods_workflow_compares_its_students_in_one_grid(server):
    entry = server.wait(server.queue(_workflow("api/compare_three_methods.json")), timeout=1200)  # three trainings
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    for name in ("digits_sfd_4step", "digits_reflow_4step", "digits_dmd2_2step"):
        assert (server.base / "models" / "diffusion_models" / f"{name}.safetensors").is_file()
    output = entry["outputs"]["5"]
    assert "dmd2, 2 steps: " in " ".join(output["text"]) and len(output["images"]) == 1


def test_cancel_keeps_a_checkpoint_and_requeueing_with_resume_finishes(server):
    run = server.base / "output" / "distill_runs" / "cancel_me"
    graph = _sd15_workflow(iterations=12, save_name="cancel_me")
    prompt_id = server.queue(graph)
    checkpoint_info = run / "checkpoints" / "checkpoint.json"
    deadline = time.time() + 300
    while not checkpoint_info.is_file():
        assert time.time() < deadline, server.tail()
        time.sleep(0.5)
    server.post("/interrupt")
    entry = server.wait(prompt_id)
    assert entry["status"]["status_str"] == "error"  # ComfyUI's "interrupted"
    assert any(m[0] == "execution_interrupted" for m in entry["status"]["messages"])
    saved = json.loads(checkpoint_info.read_text())["iteration"]
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "interrupted" and 2 <= saved < 12

    graph["4"]["inputs"]["resume"] = True
    entry = server.wait(server.queue(graph))
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    iterations = [json.loads(line)["iter"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert iterations == list(range(1, 13))


def _with_lora_loader(graph: dict, lora_name: str) -> dict:
    """``graph`` (a workflow with Load Checkpoint as node 1) and beside it: the stock LoraLoader of ``lora_name``
    -> SamplerCustom with the sigmas, sampler and cfg of Student sigmas + sampler reading the same file -> Save
    Latent (nodes 22 to 27)."""
    text = {"clip": ["22", 1], "text": "a lighthouse"}
    return {**graph,
            "22": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": lora_name,
                                                           "strength_model": 1.0, "strength_clip": 1.0}},
            "23": {"class_type": "CLIPTextEncode", "inputs": text},
            "24": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "25": {"class_type": "SamplerCustom", "inputs": {
                "model": ["22", 0], "add_noise": True, "noise_seed": 0, "cfg": ["27", 2], "positive": ["23", 0],
                "negative": ["23", 0], "sampler": ["27", 1], "sigmas": ["27", 0], "latent_image": ["24", 0]}},
            "26": {"class_type": "SaveLatent", "inputs": {"samples": ["25", 0], "filename_prefix": "latents/grows"}},
            "27": {"class_type": "DistillStudentSchedule", "inputs": {"student_file": f"loras/{lora_name}",
                                                                       "steps": 0}}}


def test_loaders_read_a_student_file_again_once_it_is_replaced(server):
    """A workflow that trains a LoRA and also samples its file through the stock LoraLoader. Resumed to more
    iterations, the run replaces the file; that prompt still shows the old file's sample (ComfyUI reuses the
    outputs of nodes whose inputs are unchanged), and the next queue of the same workflow reads the new file
    (the training node has ComfyUI forget its cached outputs). A file replaced outside ComfyUI (here: touched)
    is read again by the pack's own loader on the next queue."""
    import torch
    from safetensors.torch import load_file

    lora = server.base / "models" / "loras" / "grows.safetensors"
    train = _sd15_workflow(iterations=2, save_name="grows")
    loaders = {"22", "25", "27"}

    def cached_nodes(graph: dict) -> set[str]:
        entry = server.wait(server.queue(graph))
        assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
        return set(next(m[1]["nodes"] for m in entry["status"]["messages"] if m[0] == "execution_cached"))

    def latents() -> list:
        files = sorted((server.base / "output" / "latents").glob("grows_*.latent"))
        return [load_file(str(p))["latent_tensor"] for p in files]

    cached_nodes(train)
    train["4"]["inputs"]["resume"] = True
    assert not loaders & cached_nodes(_with_lora_loader(train, "grows.safetensors"))
    train["4"]["inputs"]["iterations"] = 4
    assert loaders <= cached_nodes(_with_lora_loader(train, "grows.safetensors"))  # the prompt that replaces it
    assert read_card(lora)["training"]["iterations"] == 4
    assert not loaders & cached_nodes(_with_lora_loader(train, "grows.safetensors"))  # the next one
    old, new = latents()
    assert not torch.equal(old, new)

    assert loaders <= cached_nodes(_with_lora_loader(train, "grows.safetensors"))  # nothing changed
    os.utime(lora, ns=(lora.stat().st_atime_ns, lora.stat().st_mtime_ns + 10**9))
    assert "27" not in cached_nodes(_with_lora_loader(train, "grows.safetensors"))


def test_the_monitor_route_starts_the_panel_in_the_comfyui_process(server):
    url = server.get("/distill/monitor")["url"]
    assert url.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(url, timeout=60) as r:
        assert r.status == 200
    assert server.get("/distill/monitor")["url"] == url


def test_the_panel_in_comfyui_starts_a_run_that_trains_and_reports_in_comfyuis_python(server):
    """The panel ComfyUI serves starts a distillation as a child of ComfyUI's Python, which imports the engine
    from the pack's folder, into ComfyUI's runs folder, where the panel follows it to its report."""
    from gradio_client import Client

    client = Client(server.get("/distill/monitor")["url"], verbose=False)
    options = "eval_samples: 4\nreport_solvers: euler\nreference_steps: 8\n"
    said = client.predict("from_the_panel", "builtin", "sfd", 2, 2, 2, options, api_name="/start")
    assert said.startswith("started"), said
    run = server.base / "output" / "distill_runs" / "from_the_panel"
    deadline = time.time() + 600
    while not (run / "report.json").is_file():
        assert time.time() < deadline and (run / "log.txt").is_file(), server.tail()
        time.sleep(1)
    assert json.loads((run / "report.json").read_text())["iterations"] == 2
    assert {row["run"]: row for row in client.predict(api_name="/runs")}["from_the_panel"]["status"] == "finished"
    client.close()


# ------------------------------------------------------------------ the front end in a real browser
CHROMIUM = Path("/usr/bin/chromium")
SPARKLINE = (79, 195, 247)  # web/distill.js's line colour #4fc3f7


def _sparkline_pixels(png: bytes) -> int:
    import io

    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)
    return int((np.abs(pixels - np.array(SPARKLINE)) <= 40).all(axis=-1).sum())


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.is_file(), reason="needs Debian's chromium")
def test_the_front_end_loads_the_workflows_and_draws_live_progress(server, tmp_path):
    """ComfyUI's own front end in headless chromium: the extension is registered, every shipped UI
    workflow loads with its widget values intact, progress events draw the loss sparkline on the
    Distill node, and its "open monitor" button opens the panel."""
    from playwright.sync_api import sync_playwright

    args = ["--no-sandbox", "--disable-background-networking", "--disable-component-update", "--no-first-run"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=args)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(server.url, wait_until="networkidle")
        page.wait_for_function("() => window.app && window.app.graph", timeout=90_000)
        assert "comfyui-distill.progress" in page.evaluate("() => window.app.extensions.map(e => e.name)")
        page.wait_for_timeout(1000)
        page.keyboard.press("Escape")  # the first-run template browser of a fresh user folder

        for path in sorted((ROOT / "workflows").glob("*.json")):
            ui = json.loads(path.read_text())
            page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", ui)
            loaded = page.evaluate(
                "() => window.app.graph.serialize().nodes.map(n => [n.id, n.type, n.widgets_values])")
            assert {n: (t, w) for n, t, w in loaded} == {
                n["id"]: (n["type"], n["widgets_values"]) for n in ui["nodes"]}, path.name

        page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }",
                      json.loads((ROOT / "workflows" / "builtin_distill_4_steps.json").read_text()))
        page.evaluate("() => { window.app.canvas.centerOnNode(window.app.graph.getNodeById(2));"
                      " window.app.canvas.setDirty(true, true); }")
        page.wait_for_timeout(500)
        before = _sparkline_pixels(page.screenshot())
        save_name = json.loads((ROOT / "workflows" / "api" / "builtin_distill_4_steps.json").read_text())[
            "2"]["inputs"]["save_name"]

        def progress(run: str) -> None:
            for i in range(1, 31):
                page.evaluate("(d) => window.comfyAPI.api.api.dispatchCustomEvent('distill.progress', d)",
                              {"node": "2", "iteration": i, "total": 40, "loss": 0.5 * 0.9**i * (1 + 0.2 * (i % 3)),
                               "eta_s": 1.3 * (40 - i), "run": run})
            page.evaluate("() => window.app.canvas.setDirty(true, true)")
            page.wait_for_timeout(500)

        progress("output/distill_runs/another_graphs_run")  # a node with the same id in another workflow
        assert _sparkline_pixels(page.screenshot()) == before
        progress(f"output/distill_runs/{save_name}")
        shot = page.screenshot()
        (tmp_path / "node_progress.png").write_bytes(shot)
        assert _sparkline_pixels(shot) > before + 100  # the loss line (anti-aliased, 1.5 px wide)

        with page.expect_popup(timeout=90_000) as popup:
            page.evaluate("() => window.app.graph.getNodeById(2).widgets.find(w => w.name === 'open monitor')"
                          ".callback()")
        assert popup.value.url.startswith("http://127.0.0.1:")
        browser.close()

