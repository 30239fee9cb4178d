"""Runs under a real ComfyUI's Python (``COMFYUI_PATH``), in its own process (ComfyUI's modules are imported
as ComfyUI imports them, with its command-line arguments set for the CPU):

    python tests/comfyui_harness.py checkpoint OUT.safetensors
        a tiny single-file SD1.5 checkpoint from ComfyUI's own classes, random weights: a one-level
        320-channel UNet with one transformer block (context 768: detected as SD1.5), CLIP-L-sized
        text encoder, TAESD as the VAE; fp16.
    python tests/comfyui_harness.py sdxl-checkpoint OUT.safetensors
        the smallest single-file checkpoint ComfyUI reads as the SDXL family (0.5B UNet, both text encoders).
    python tests/comfyui_harness.py sd3-checkpoint OUT.safetensors TEXT_ENCODER.safetensors
        a tiny single-file SD3 checkpoint (MMDiT and TAESD) and a CLIP-L text encoder file for it, fp16.
    python tests/comfyui_harness.py lora-probe CHECKPOINT WORKDIR
        in-process: Load Checkpoint -> Distill prompt list -> Teacher from MODEL -> Distill to 4 steps
        (LoRA) -> the stock LoraLoader applies the saved file to the teacher -> ComfyUI's sampler with
        the student's sigmas and SAMPLER; prints JSON comparing it with the engine's own sampling of
        the student from the same initial latent.
    python tests/comfyui_harness.py wan-files DIFFUSION_MODEL VAE [OTHER_DIFFUSION_MODEL]
        writes a tiny Wan 2.1 text-to-video model and a Wan 2.1 VAE (random weights) for the stock loaders,
        and a second model of other weights (a Wan 2.2 14B release's low-noise model).
    python tests/comfyui_harness.py wan-i2v-files HIGH_NOISE_MODEL LOW_NOISE_MODEL
        writes the two tiny models of a Wan 2.2 image-to-video A14B release (Wan 2.1's blocks reading the start
        frames' latent and mask beside the noise: 36 input channels, no CLIP vision projection), for the stock loader.
    python tests/comfyui_harness.py flux-files DIFFUSION_MODEL VAE
        writes a tiny Flux dev model and a Flux VAE (random weights) for the stock loaders.
    python tests/comfyui_harness.py wan22-5b-files DIFFUSION_MODEL VAE
        writes a tiny Wan 2.2 TI2V 5B model and a Wan 2.2 VAE (random weights) for the stock loaders.
    python tests/comfyui_harness.py checkpointing-probe CHECKPOINT WORKDIR
        in-process: the same LoRA trained without and with grad_checkpointing on the checkpoint's UNet.
    python tests/comfyui_harness.py lcm-lora-probe CHECKPOINT WORKDIR
        in-process: an LCM-LoRA trained by Distill to N steps, loaded by the stock LoraLoader and sampled by
        the stock KSampler with sampler lcm (one step against the engine, four steps finite).
    python tests/comfyui_harness.py flow-probe FAMILY WORKDIR
        FAMILY: sd3, sd3-fp8, sd3-fp8-scaled, flux, wan, wan22-5b, qwen-image, lumina2, auraflow, hidream, chroma,
        chroma-radiance, hunyuan-image, omnigen2, cosmos-predict2, pixart-sigma (eps), hunyuan-dit (v), the
        editing models flux-kontext and qwen-image-edit (a reference image's latent in every prompt), flux-fill
        (an inpainting DiT: a masked image's latent and mask in every prompt), or on
        clips wan-clip, wan-i2v-clip (image-to-video), wan22-5b-clip, wan22-5b-i2v-clip (image-to-video),
        hunyuan-video-clip, hunyuan-video-i2v-clip (image-to-video), ltxv-clip, ltxv-i2v-clip (image-to-video),
        mochi-clip, cosmos-clip: a tiny model
        (SD3 from a single file through the stock UNETLoader, sd3-fp8 with its weight_dtype fp8_e4m3fn; the others
        built in memory: Flux with its guidance input, Wan 2.1, Wan 2.2 5B and Qwen-Image with one-frame video
        latents, the clip families on clips of 3 latent frames, the image-to-video ones with their start frame's
        latent and mask in every prompt, or for Wan 2.2 5B and LTX-Video in the LATENT that their own nodes make)
        distilled to a LoRA, loaded
        by the stock loader and sampled by SamplerCustom with the student's sigmas, against the engine.
    python tests/comfyui_harness.py two-model-probe METHOD WORKDIR
        two tiny Wan models as Wan 2.2 14B's high- and low-noise models, one teacher distilled (METHOD: sfd or
        dmd2) to a LoRA per model, each loaded by the stock loader on its model and sampled by two chained
        samplers, against the engine.
    python tests/comfyui_harness.py edit-list-probe WORKDIR
        Distill edit list for Qwen-Image-Edit and its 2509 release through ComfyUI's own TextEncodeQwenImageEdit
        and TextEncodeQwenImageEditPlus (a stand-in for the 7B vision-language text encoder and the VAE, which
        record what they are given), into Teacher from MODEL on a tiny Qwen-Image-Edit model and one guided
        teacher evaluation.
    python tests/comfyui_harness.py start-image-list-probe WORKDIR
        Distill image-to-video list through ComfyUI's own WanImageToVideo and CLIPVisionEncode (stand-ins for the
        text encoder, the VAE and the CLIP vision model), into Teacher from MODEL on a tiny Wan 2.1
        image-to-video model and one guided teacher evaluation on a clip; for HunyuanVideo through its
        image-reading text encoder's node and HunyuanImageToVideo on a tiny HunyuanVideo image-to-video model; and
        for Wan 2.2 5B and LTX-Video through Wan22ImageToVideoLatent and LTXVImgToVideo into its start_latent on
        tiny Wan 2.2 5B and LTX-Video models.
    python tests/comfyui_harness.py family-probe {sd15-v,sdxl-eps,sdxl-v,sd15-flow,sd15-inpaint} WORKDIR
        the same on a tiny model of that family built in memory with ComfyUI's model classes (sd15-flow:
        a flow-patched clone is read as a flow teacher, then the plain model of the same checkpoint is
        distilled as the eps model it is).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parent.parent


def _comfyui():
    """Put ComfyUI on the path, on CPU (its model management reads ``args`` at import)."""
    root = os.environ["COMFYUI_PATH"]
    sys.path.insert(0, root)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    comfy.cli_args.args.disable_xformers = True


def _init(module, seed: int = 0) -> None:
    """Every parameter explicitly (ComfyUI's layers skip initialisation): norms' scales 1 and biases 0, the rest
    small; and position tables kept as buffers."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name:
                p.fill_(1.0 if name.endswith(("weight", "scale")) else 0.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        for name, b in module.named_buffers():  # MMDiT's position table is a buffer made with torch.empty
            if name.endswith("pos_embed"):
                b.copy_(torch.randn(b.shape, generator=gen) * 0.02)


def _save_tensors(tensors: dict, path: Path) -> None:
    """``tensors`` in one safetensors file at ``path``, floating-point ones in fp16."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half().contiguous() if v.is_floating_point() else v.contiguous() for k, v in tensors.items()},
              str(path))


def _save_parts(parts: dict, path: Path) -> None:
    """The state dicts of ``parts`` (key prefix -> module) in one fp16 safetensors file at ``path``."""
    _save_tensors({prefix + k: v for prefix, m in parts.items() for k, v in m.state_dict().items()}, path)


def build_checkpoint(path: Path) -> None:
    _comfyui()
    import comfy.ops
    import comfy.sd1_clip
    import comfy.taesd.taesd
    import torch
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = UNetModel(image_size=32, in_channels=4, model_channels=320, out_channels=4, num_res_blocks=[1],
                     channel_mult=(1,), num_heads=8, use_spatial_transformer=True, transformer_depth=[1],
                     context_dim=768, transformer_depth_middle=1, transformer_depth_output=[1, 1],
                     operations=comfy.ops.disable_weight_init)
    clip = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32)
    vae = comfy.taesd.taesd.TAESD(latent_channels=4)
    for k, m in enumerate((unet, clip, vae)):
        _init(m, k)
    _save_parts({"model.diffusion_model.": unet, "cond_stage_model.": clip, "first_stage_model.": vae}, path)


def _random_parts(config, clip, latent_channels: int) -> tuple:
    """(the diffusion network of the ComfyUI model ``config``, the text encoder ``clip``, TAESD on
    ``latent_channels``), every weight random (``_init``)."""
    import comfy.taesd.taesd
    import torch

    config.set_inference_dtype(torch.float32, None)
    parts = (config.get_model({}).diffusion_model, clip, comfy.taesd.taesd.TAESD(latent_channels=latent_channels))
    for k, m in enumerate(parts):
        _init(m, k)
    return parts


def build_sdxl_checkpoint(path: Path) -> None:
    """The smallest single-file checkpoint that ComfyUI reads as the SDXL family: SDXL's UNet layout at Segmind
    Vega's transformer depths (one and two blocks at the two inner levels, none on the way up; 0.6B parameters,
    an SDXL-class model with its ADM input), SDXL's two text encoders at their own size (CLIP-L and OpenCLIP
    bigG: the checkpoint loader builds them so), TAESD as the VAE; random weights, fp16, in ComfyUI's own
    checkpoint layout."""
    _comfyui()
    import comfy.sdxl_clip
    import comfy.supported_models
    import torch

    unet = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2],
                channel_mult=[1, 2, 4], num_heads=-1, num_head_channels=64, use_spatial_transformer=True,
                transformer_depth=[0, 0, 1, 1, 2, 2], transformer_depth_middle=1,
                transformer_depth_output=[0] * 9, context_dim=2048,
                use_linear_in_transformer=True, adm_in_channels=2816, num_classes="sequential",
                use_temporal_attention=False, use_temporal_resblock=False, legacy=False)
    config = comfy.supported_models.Segmind_Vega(unet)
    network, clip, vae = _random_parts(config, comfy.sdxl_clip.SDXLClipModel(device="cpu", dtype=torch.float32), 4)
    tensors = {**config.process_unet_state_dict_for_saving(network.state_dict()),
               **config.process_clip_state_dict_for_saving(clip.state_dict()),
               **config.process_vae_state_dict_for_saving(vae.state_dict())}
    _save_tensors(tensors, path)


def build_sd3_checkpoint(checkpoint: Path, text_encoder: Path) -> None:
    """A tiny single-file SD3 checkpoint (the MMDiT of ``SD3_CONFIG`` reading SD3's 4096-wide token table and
    2048-wide pooled vector; TAESD on the 16-channel latent as its VAE; no text encoder) and a CLIP-L file that
    the stock CLIPLoader loads as an SD3 text encoder (type sd3: the CLIP-G and T5 parts of its output are
    zeros). Random weights, fp16."""
    _comfyui()
    import comfy.sd1_clip
    import comfy.supported_models
    import torch

    config = comfy.supported_models.SD3(dict(SD3_CONFIG, adm_in_channels=2048, context_embedder_config={
        "target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 128}}))
    mmdit, clip, vae = _random_parts(config, comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32), 16)
    _save_parts({"model.diffusion_model.": mmdit, "first_stage_model.": vae}, checkpoint)
    _save_parts({"": clip.transformer}, text_encoder)


def build_wan_files(diffusion_model: Path, vae: Path, other: Path | None = None) -> None:
    """A tiny Wan 2.1 text-to-video diffusion model file that the stock Load Diffusion Model detects (one block of
    width 128, one head, on SD3's 4096-wide token table, so that a CLIP-L loaded as an SD3 text encoder feeds it)
    and a Wan 2.1 VAE file that the stock VAELoader detects (its fixed size, 127M parameters); ``other``: a
    second such model of other weights (a Wan 2.2 14B release's low-noise model beside its high-noise one).
    Random weights, fp16."""
    _comfyui()
    import comfy.ldm.wan.vae
    import comfy.supported_models

    network = comfy.supported_models.WAN21_T2V(dict(TINY_WAN)).get_model({}).diffusion_model
    _init(network, 5)
    _save_parts({"": network}, diffusion_model)
    if other is not None:
        _init(network, 6)
        _save_parts({"": network}, other)
    decoder = comfy.ldm.wan.vae.WanVAE(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                       temperal_downsample=[False, True, True], dropout=0.0)
    _init(decoder, 7)  # its encoder too reads images (image-to-video's start frames)
    _save_parts({"": decoder}, vae)


def build_wan_i2v_files(high: Path, low: Path) -> None:
    """See the module docstring; random weights, fp16."""
    _comfyui()
    import comfy.supported_models

    network = comfy.supported_models.WAN21_T2V({**TINY_WAN, "in_dim": 36}).get_model({}).diffusion_model
    for seed, path in ((5, high), (6, low)):
        _init(network, seed)
        _save_parts({"": network}, path)


def build_flux_files(diffusion_model: Path, vae: Path) -> None:
    """A small Flux dev diffusion model file that the stock Load Diffusion Model detects (its guidance input; one
    double and one single block at Flux's fixed width, 3072, which ComfyUI reads from no weight: 549M parameters;
    on SD3's 4096-wide token table and 2048-wide pooled vector, so that a CLIP-L loaded as an SD3 text encoder
    feeds it) and a Flux VAE file that the stock VAELoader detects (a 16-channel autoencoder without quantisation
    convolutions, its fixed size, 84M parameters). Random weights, fp16."""
    _comfyui()
    import comfy.ldm.models.autoencoder
    import comfy.supported_models

    config = comfy.supported_models.Flux({**FLUX_CONFIG, "context_in_dim": 4096, "vec_in_dim": 2048,
                                          "hidden_size": 3072, "num_heads": 24, "axes_dim": [16, 56, 56]})
    network = config.get_model({}).diffusion_model
    _init(network, 5)
    _save_parts({"": network}, diffusion_model)
    ddconfig = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    module = "comfy.ldm.modules.diffusionmodules.model."
    autoencoder = comfy.ldm.models.autoencoder.AutoencodingEngine(
        regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
        encoder_config={"target": module + "Encoder", "params": ddconfig},
        decoder_config={"target": module + "Decoder", "params": ddconfig})
    _init(autoencoder, 7)
    _save_parts({"": autoencoder}, vae)


def build_wan22_5b_files(diffusion_model: Path, vae: Path) -> None:
    """A tiny Wan 2.2 TI2V 5B diffusion model file that the stock Load Diffusion Model detects (as the tiny Wan 2.1
    one, on 48-channel latents) and a Wan 2.2 VAE file that the stock VAELoader detects (its fixed size, 705M
    parameters, set explicitly: ComfyUI's layers leave theirs unset). Random weights, fp16."""
    _comfyui()
    import comfy.ldm.wan.vae2_2
    import comfy.supported_models

    network = comfy.supported_models.WAN22_T2V({**TINY_WAN, "in_dim": 48, "out_dim": 48}).get_model({})
    _init(network.diffusion_model, 5)
    _save_parts({"": network.diffusion_model}, diffusion_model)
    decoder = comfy.ldm.wan.vae2_2.WanVAE(dim=160, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                          temperal_downsample=[False, True, True], dropout=0.0)
    _init(decoder, 7)
    _save_parts({"": decoder}, vae)


def load_pack():
    """This pack as ComfyUI loads a custom node: its ``__init__.py`` as a package of its own name."""
    spec = importlib.util.spec_from_file_location(
        "comfyui_distill", PACK_ROOT / "__init__.py", submodule_search_locations=[str(PACK_ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def unloaded_lora_keys() -> list[str]:
    """A list that collects what the stock LoRA loaders log about keys they leave unloaded."""
    import logging

    unloaded = []

    class Unloaded(logging.Handler):
        def emit(self, record):
            if "lora key not loaded" in record.getMessage():
                unloaded.append(record.getMessage())

    logging.getLogger().addHandler(Unloaded())
    return unloaded


def _folders(work: Path) -> None:
    import folder_paths

    for kind in ("checkpoints", "loras", "diffusion_models"):
        (work / kind).mkdir(parents=True, exist_ok=True)
        folder_paths.add_model_folder_path(kind, str(work / kind), is_default=True)
    folder_paths.set_output_directory(str(work / "output"))


def lora_probe(checkpoint: Path, work: Path) -> dict:
    """Load Checkpoint -> Distill prompt list (CLIP) -> distil and compare, with the stock LoraLoader."""
    _comfyui()
    _folders(work)
    os.symlink(checkpoint, work / "checkpoints" / checkpoint.name)
    import torch

    stock = importlib.import_module("nodes")  # ComfyUI's own nodes.py (LoraLoader, CheckpointLoaderSimple)
    pack = load_pack().NODE_CLASS_MAPPINGS
    with torch.inference_mode():  # how ComfyUI runs every node
        model, clip, _ = stock.CheckpointLoaderSimple().load_checkpoint(checkpoint.name)
        positive, negative = pack["DistillPromptList"]().run(clip, "a red fox in snow\na lighthouse at dusk", "blurry")
    return distil_and_compare(pack, model, positive, negative,
                              lambda name: stock.LoraLoader().load_lora(model, clip, name, 1.0, 0.0)[0])


#: tiny UNets of each family (ComfyUI's classes, random weights) and their condition sizes
FAMILIES = {
    "sd15-v": dict(config="SD15", context=768, pooled=None, sampling="v_prediction", state={}),
    "sdxl-eps": dict(config="SDXL", context=2048, pooled=1280, sampling=None, state={}),
    "sdxl-v": dict(config="SDXL", context=2048, pooled=1280, sampling=None, state={"v_pred": True}),
    "sd15-flow": dict(config="SD15", context=768, pooled=None, sampling="flow", state={}),
    "sd15-inpaint": dict(config="SD15", context=768, pooled=None, sampling=None, state={}, inpaint=True),
}


def family_probe(family: str, work: Path) -> dict:
    """A tiny model of ``family`` built with ComfyUI's own model classes (SDXL with its ADM ``y`` from
    the pooled output and sizes; v-prediction from the checkpoint's marker or the stock
    ModelSamplingDiscrete node; an inpainting UNet of 9 input channels, each prompt with its masked image's
    latent and mask as InpaintModelConditioning writes them), conditions as CLIP Text Encode would shape them;
    distil and compare with the stock LoraLoaderModelOnly."""
    _comfyui()
    _folders(work)
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    import torch
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete, ModelSamplingSD3

    spec = FAMILIES[family]
    unet = dict(image_size=32, in_channels=9 if spec.get("inpaint") else 4, out_channels=4, model_channels=320,
                num_res_blocks=[1],
                channel_mult=[1], num_heads=8, num_head_channels=-1, use_spatial_transformer=True,
                transformer_depth=[1], transformer_depth_middle=1, transformer_depth_output=[1, 1],
                context_dim=spec["context"], use_linear_in_transformer=spec["config"] == "SDXL",
                adm_in_channels=2816 if spec["config"] == "SDXL" else None, use_temporal_attention=False,
                use_temporal_resblock=False, legacy=False)
    if spec["config"] == "SDXL":
        unet["num_classes"] = "sequential"
    config = getattr(comfy.supported_models, spec["config"])(unet)
    config.set_inference_dtype(torch.float32, None)
    state = {k: torch.ones(1) for k in spec["state"]}
    base = config.get_model(state)
    _init(base.diffusion_model, 3)
    model = comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                             offload_device=mm.unet_offload_device())
    def entry(seed: int) -> list:
        gen = torch.Generator().manual_seed(seed)
        options = {} if spec["pooled"] is None else {"pooled_output": torch.randn(1, spec["pooled"], generator=gen)}
        if spec.get("inpaint"):  # the negative (seed 3) carries the first prompt's image, as the node gives both
            image = torch.Generator().manual_seed(1 if seed == 3 else seed)
            mask = torch.zeros(1, 64, 64)
            mask[:, 16:48, 16:48] = 1  # the square to repaint, in pixels
            options.update(concat_latent_image=torch.randn(1, 4, 8, 8, generator=image), concat_mask=mask)
        return [torch.randn(1, 77, spec["context"], generator=gen), options]

    flow_clone = None
    if spec["sampling"] == "flow":  # an SD3-style rectified-flow sampling patched on by the stock node
        (flow,) = ModelSamplingSD3().patch(model, 3.0)
        mm.load_models_gpu([flow])  # the shared BaseModel now holds the flow clone's sampling
        (handle,) = load_pack().NODE_CLASS_MAPPINGS["DistillTeacherFromModel"]().run(
            flow, [entry(1)], [entry(3)], 64, 64, 5.0)
        with torch.inference_mode(False):
            denoiser = handle.source().denoiser
        flow_clone = {"prediction": denoiser.prediction, "shift": denoiser.shift}
        # the plain MODEL of the same checkpoint, after its flow clone ran: its own eps sampling, distilled below
    elif spec["sampling"]:
        (model,) = ModelSamplingDiscrete().patch(model, spec["sampling"], False)

    stock = importlib.import_module("nodes")
    pack = load_pack().NODE_CLASS_MAPPINGS
    result = distil_and_compare(pack, model, [entry(1), entry(2)], [entry(3)],
                                lambda name: stock.LoraLoaderModelOnly().load_lora_model_only(model, name, 1.0)[0])
    mm.load_models_gpu([model])
    kinds = [c.__name__ for c in type(model.model.model_sampling).__mro__]
    inputs = model.model.extra_conds(cross_attn=torch.zeros(1, 77, spec["context"]), device=torch.device("cpu"),
                                     noise=torch.zeros(1, 4, 8, 8), **entry(1)[1])
    return {**result, "family": family, "flow_clone": flow_clone,
            "prediction": next(k for k in kinds if k in ("EPS", "V_PREDICTION")), "has_adm": "y" in inputs,
            "image_input": list(inputs["c_concat"].cond.shape) if "c_concat" in inputs else None}


#: tiny flow models: SD3's MMDiT (2 blocks of width 128, detected from its file) and Flux (one double and one
#: single block of width 64 with its guidance embedding; ComfyUI detects Flux only at full size, so it is built
#: in memory with ComfyUI's own Flux classes)
SD3_CONFIG = {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2, "input_size": None,
              "adm_in_channels": 32, "num_patches": 64, "pos_embed_max_size": 8, "pos_embed_scaling_factor": None,
              "x_block_self_attn_layers": [],
              "context_embedder_config": {"target": "torch.nn.Linear",
                                          "params": {"in_features": 64, "out_features": 128}}}
FLUX_CONFIG = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2, "vec_in_dim": 32,
               "context_in_dim": 64, "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2, "depth": 1,
               "depth_single_blocks": 1, "axes_dim": [8, 12, 12], "theta": 10000, "qkv_bias": True,
               "guidance_embed": True}
#: tiny models whose latents have a frame axis (Wan 2.1's 16-channel video latent, one frame for an image):
#: Wan 2.1 text-to-video and Qwen-Image, one block of width 64, built in memory with ComfyUI's classes
WAN_CONFIG = {"image_model": "wan2.1", "model_type": "t2v", "dim": 64, "ffn_dim": 128, "freq_dim": 32,
              "text_dim": 64, "num_heads": 2, "num_layers": 1, "in_dim": 16, "out_dim": 16}
#: Wan 2.1 image-to-video: the same blocks, its input the latent beside the start image's latent and mask
WAN_I2V_CONFIG = {**WAN_CONFIG, "model_type": "i2v", "in_dim": 36}
#: Wan 2.2 5B: the same blocks on its 48-channel latent, 16 image pixels a side per latent pixel
WAN22_CONFIG = {**WAN_CONFIG, "in_dim": 48, "out_dim": 48}
#: the Wan networks of the workflow tests: one block of width 128, one head, on SD3's 4096-wide token table, so
#: that a CLIP-L loaded as an SD3 text encoder feeds it
TINY_WAN = {**WAN_CONFIG, "dim": 128, "ffn_dim": 256, "freq_dim": 256, "text_dim": 4096, "num_heads": 1}
QWEN_CONFIG = {"image_model": "qwen_image", "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 1,
               "attention_head_dim": 32, "num_attention_heads": 2, "joint_attention_dim": 64,
               "axes_dims_rope": (8, 12, 12)}
LUMINA2_CONFIG = {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 64, "n_layers": 1,
                  "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 2, "multiple_of": 16, "cap_feat_dim": 64,
                  "axes_dims": [8, 12, 12], "axes_lens": [64, 64, 64], "qk_norm": True}
#: AuraFlow (its MMDiT on a 4-channel SDXL latent), HiDream (a mixture-of-experts DiT reading T5 tokens and a
#: stack of Llama hidden states, ``conditioning_llama3`` [B, layers, tokens, width]) and Chroma (Flux blocks
#: modulated by a distilled approximator; real CFG, its guidance input left at ComfyUI's default 0)
AURAFLOW_CONFIG = {"in_channels": 4, "out_channels": 4, "patch_size": 2, "dim": 64, "n_layers": 2,
                   "n_double_layers": 1, "n_heads": 2, "global_conddim": 64, "cond_seq_dim": 64, "max_seq": 64}
HIDREAM_CONFIG = {"image_model": "hidream", "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 1,
                  "num_single_layers": 1, "attention_head_dim": 32, "num_attention_heads": 2,
                  "caption_channels": [64, 64], "text_emb_dim": 32, "num_routed_experts": 2,
                  "num_activated_experts": 1, "axes_dims_rope": [8, 12, 12], "max_resolution": [16, 16],
                  "llama_layers": [0, 1]}
CHROMA_CONFIG = {"image_model": "chroma", "in_channels": 64, "out_channels": 64, "patch_size": 2,
                 "context_in_dim": 64, "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2, "depth": 1,
                 "depth_single_blocks": 1, "axes_dim": [8, 12, 12], "theta": 10000, "qkv_bias": True,
                 "in_dim": 64, "out_dim": 64, "hidden_dim": 64, "n_layers": 1}
#: HunyuanImage 2.1: HunyuanVideo's blocks on a 64-channel image latent of 32 pixels a side, patch 1 x 1
HUNYUAN_IMAGE_CONFIG = {"image_model": "hunyuan_video", "in_channels": 64, "out_channels": 64, "patch_size": [1, 1],
                        "vec_in_dim": None, "context_in_dim": 64, "hidden_size": 64, "mlp_ratio": 4.0,
                        "num_heads": 2, "depth": 1, "depth_single_blocks": 1, "axes_dim": [16, 16], "theta": 256,
                        "qkv_bias": True, "guidance_embed": False, "byt5": False, "meanflow": False}
#: video models distilled on clips: HunyuanVideo (guidance-distilled: its guidance an input, as Flux's; patches of
#: 1 x 2 x 2) and LTX-Video (a 128-channel latent of 32 pixels a side and 8 frames per latent frame)
HUNYUAN_VIDEO_CONFIG = {**HUNYUAN_IMAGE_CONFIG, "in_channels": 16, "out_channels": 16, "patch_size": [1, 2, 2],
                        "vec_in_dim": 32, "axes_dim": [8, 12, 12], "guidance_embed": True}
LTXV_CONFIG = {"image_model": "ltxv", "in_channels": 128, "cross_attention_dim": 64, "attention_head_dim": 32,
               "num_attention_heads": 2, "caption_channels": 64, "num_layers": 1}
#: Mochi: an asymmetric DiT on a 12-channel latent of 6 frames per latent frame (its block fixes the visual MLP at
#: 12,288 wide, hence the ratio), reading T5 tokens padded to one length (its token count a scalar input)
MOCHI_CONFIG = {"image_model": "mochi_preview", "depth": 1, "patch_size": 2, "num_heads": 2, "hidden_size_x": 64,
                "hidden_size_y": 64, "mlp_ratio_x": 192.0, "mlp_ratio_y": 4.0, "learn_sigma": False, "in_channels": 12,
                "qk_norm": True, "qkv_bias": False, "out_bias": True, "attn_drop": 0.0, "patch_embed_bias": True,
                "posenc_preserve_area": True, "timestep_mlp_bias": True, "attend_to_padding": False,
                "timestep_scale": 1000.0, "use_t5": True, "t5_feat_dim": 64, "t5_token_length": 20,
                "rope_theta": 10000.0}
#: Cosmos 1 text-to-world: an EDM video DiT on a 16-channel latent of 8 frames per latent frame
COSMOS_VIDEO_CONFIG = {"image_model": "cosmos", "max_img_h": 16, "max_img_w": 16, "max_frames": 8, "in_channels": 16,
                       "out_channels": 16, "patch_spatial": 2, "patch_temporal": 1, "model_channels": 64,
                       "block_config": "FA-CA-MLP", "concat_padding_mask": True, "pos_emb_cls": "rope3d",
                       "pos_emb_learnable": False, "pos_emb_interpolation": "crop", "block_x_format": "THWBD",
                       "affline_emb_norm": True, "use_adaln_lora": True, "adaln_lora_dim": 16, "num_blocks": 1,
                       "num_heads": 2, "crossattn_emb_channels": 64, "extra_per_block_abs_pos_emb": True,
                       "rope_h_extrapolation_ratio": 1.0, "rope_w_extrapolation_ratio": 1.0,
                       "rope_t_extrapolation_ratio": 2.0, "extra_per_block_abs_pos_emb_type": "learnable"}
#: Chroma Radiance: Chroma's blocks on pixels (3 channels, patches of 16 decoded by its NeRF head)
CHROMA_RADIANCE_CONFIG = {**CHROMA_CONFIG, "image_model": "chroma_radiance", "in_channels": 3, "out_channels": 3,
                          "patch_size": 16, "nerf_hidden_size": 32, "nerf_mlp_ratio": 2, "nerf_depth": 2,
                          "nerf_max_freqs": 8, "nerf_tile_size": 0, "nerf_final_head_type": "conv",
                          "nerf_embedder_dtype": None}
#: Cosmos Predict2 text-to-image (its DiT on Wan 2.1's latent, Cosmos's rectified flow) and OmniGen2 (a
#: Lumina-style DiT reading Qwen2.5-VL tokens, its token count a scalar input)
COSMOS_PREDICT2_CONFIG = {"image_model": "cosmos_predict2", "max_img_h": 16, "max_img_w": 16, "max_frames": 4,
                          "in_channels": 16, "out_channels": 16, "patch_spatial": 2, "patch_temporal": 1,
                          "concat_padding_mask": True, "model_channels": 64, "num_blocks": 1, "num_heads": 2,
                          "crossattn_emb_channels": 64, "pos_emb_cls": "rope3d", "pos_emb_learnable": True,
                          "pos_emb_interpolation": "crop", "use_adaln_lora": True, "adaln_lora_dim": 16}
OMNIGEN2_CONFIG = {"image_model": "omnigen2", "axes_dim_rope": [8, 12, 12], "axes_lens": [64, 64, 64],
                   "ffn_dim_multiplier": None, "hidden_size": 64, "in_channels": 16, "multiple_of": 16,
                   "norm_eps": 1e-5, "num_attention_heads": 2, "num_kv_heads": 2, "num_layers": 1,
                   "num_refiner_layers": 1, "out_channels": None, "patch_size": 2, "text_feat_dim": 64,
                   "timestep_scale": 1000.0}
#: PixArt Sigma: an eps DiT reading T5 tokens on SDXL's latent
PIXART_SIGMA_CONFIG = {"image_model": "pixart_sigma", "input_size": 8, "patch_size": 2, "in_channels": 4,
                       "hidden_size": 64, "depth": 1, "num_heads": 2, "caption_channels": 64,
                       "model_max_length": 12, "micro_condition": False, "pe_interpolation": 1}
#: HunyuanDiT: a v-prediction DiT reading two text encoders' tokens (a BERT's and mT5's, each with its mask, padded
#: as ComfyUI's tokenizers pad them to 77 and 256 tokens, or longer)
HUNYUAN_DIT_CONFIG = {"image_model": "hydit", "input_size": 8, "patch_size": 2, "in_channels": 4, "hidden_size": 64,
                      "depth": 2, "num_heads": 2, "text_states_dim": 64, "text_states_dim_t5": 64, "text_len": 12,
                      "text_len_t5": 16, "size_cond": False, "use_style_cond": False}
#: the teacher's image side where 64 pixels do not fit: PixArt's position table needs a latent side over 32
SIDES = {"pixart-sigma": 512}
#: guidance-distilled families: distilled at guidance 3.5 as their input, sampled with the stock FluxGuidance
EMBEDDED_GUIDANCE = {"flux", "flux-kontext", "flux-fill", "hunyuan-video-clip", "hunyuan-video-i2v-clip",
                     "hunyuan-video-v2-clip"}
#: editing families, whose prompts carry a reference image's latent (Qwen-Image's latents have a frame axis)
REFERENCE_LATENTS = {"flux-kontext": (16, 8, 8), "qwen-image-edit": (16, 1, 8, 8)}
#: families distilled on clips, and the clip's length in video frames (Wan: 9 frames, 3 latent frames)
LENGTHS = {"wan-clip": 9, "wan-i2v-clip": 9, "wan22-5b-clip": 9, "wan22-5b-i2v-clip": 9, "hunyuan-video-clip": 9,
           "hunyuan-video-i2v-clip": 9, "hunyuan-video-v2-clip": 9,
           "ltxv-clip": 17, "ltxv-i2v-clip": 17, "mochi-clip": 13, "cosmos-clip": 17}
IN_MEMORY = {"flux": ("Flux", FLUX_CONFIG), "flux-kontext": ("Flux", FLUX_CONFIG),
             "flux-fill": ("Flux", {**FLUX_CONFIG, "in_channels": 96}),
             "qwen-image-edit": ("QwenImage", QWEN_CONFIG), "wan": ("WAN21_T2V", WAN_CONFIG),
             "wan22-5b": ("WAN22_T2V", WAN22_CONFIG),
             "qwen-image": ("QwenImage", QWEN_CONFIG),
             "lumina2": ("Lumina2", LUMINA2_CONFIG), "auraflow": ("AuraFlow", AURAFLOW_CONFIG),
             "hidream": ("HiDream", HIDREAM_CONFIG), "chroma": ("Chroma", CHROMA_CONFIG),
             "hunyuan-image": ("HunyuanImage21", HUNYUAN_IMAGE_CONFIG),
             "chroma-radiance": ("ChromaRadiance", CHROMA_RADIANCE_CONFIG),
             "cosmos-predict2": ("CosmosT2IPredict2", COSMOS_PREDICT2_CONFIG),
             "omnigen2": ("Omnigen2", OMNIGEN2_CONFIG), "pixart-sigma": ("PixArtSigma", PIXART_SIGMA_CONFIG),
             "hunyuan-dit": ("HunyuanDiT", HUNYUAN_DIT_CONFIG),
             "wan-clip": ("WAN21_T2V", WAN_CONFIG), "wan-i2v-clip": ("WAN21_I2V", WAN_I2V_CONFIG),
             "wan22-5b-clip": ("WAN22_T2V", WAN22_CONFIG), "wan22-5b-i2v-clip": ("WAN22_T2V", WAN22_CONFIG),
             "hunyuan-video-clip": ("HunyuanVideo", HUNYUAN_VIDEO_CONFIG), "ltxv-clip": ("LTXV", LTXV_CONFIG),
             "hunyuan-video-i2v-clip": ("HunyuanVideoI2V", {**HUNYUAN_VIDEO_CONFIG, "in_channels": 33}),
             "hunyuan-video-v2-clip": ("HunyuanVideo", HUNYUAN_VIDEO_CONFIG),
             "ltxv-i2v-clip": ("LTXV", LTXV_CONFIG),
             "mochi-clip": ("GenmoMochi", MOCHI_CONFIG), "cosmos-clip": ("CosmosT2V", COSMOS_VIDEO_CONFIG)}


def flow_model(family: str, work: Path):
    """(MODEL, context width, pooled width) of a tiny random-weight flow model: SD3 saved as a single file and
    loaded by the stock Load Diffusion Model (UNETLoader; sd3-fp8: its weights kept in fp8_e4m3fn, which
    ComfyUI casts to its compute precision layer by layer); Flux, Wan and Qwen-Image built in memory."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    import torch
    from safetensors.torch import save_file

    name, unet_config = IN_MEMORY.get(family, ("SD3", SD3_CONFIG))
    config = getattr(comfy.supported_models, name)(dict(unet_config))
    config.set_inference_dtype(torch.float32, None)
    base = config.get_model({})
    _init(base.diffusion_model, 5)
    if family in IN_MEMORY:
        return comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                                offload_device=mm.unet_offload_device()), 64, 32
    name = "tiny_sd3.safetensors"
    tensors = {k: v.contiguous() for k, v in base.diffusion_model.state_dict().items()}
    if family == "sd3-fp8-scaled":
        tensors = scaled_fp8(tensors, base.diffusion_model)
    save_file(tensors, str(work / "diffusion_models" / name))
    weight_dtype = "fp8_e4m3fn" if family.endswith("fp8") else "default"
    (model,) = importlib.import_module("nodes").UNETLoader().load_unet(name, weight_dtype)
    return model, 64, 32


def scaled_fp8(tensors: dict, network) -> dict:
    """``tensors`` of ``network`` as ComfyUI's scaled fp8 checkpoints hold them (the Comfy-Org releases of Wan 2.2,
    Flux Kontext, ...): every Linear weight in fp8_e4m3fn divided by its own scale, the scale beside it as
    ``<layer>.scale_weight``, and the marker ``scaled_fp8`` that makes the stock loader build scaled fp8 layers."""
    import torch

    out = dict(tensors)
    for name, module in network.named_modules():
        if isinstance(module, torch.nn.Linear):
            weight = tensors[f"{name}.weight"].float()
            scale = weight.abs().max() / 448  # fp8_e4m3fn's largest value
            out[f"{name}.weight"] = (weight / scale).to(torch.float8_e4m3fn)
            out[f"{name}.scale_weight"] = scale.reshape(())
    out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out


def flow_probe(family: str, work: Path) -> dict:
    """A tiny flow model (sd3 or flux) -> Teacher from MODEL -> Distill to 4 steps (LoRA) -> the stock
    LoraLoaderModelOnly (no key left unloaded) -> SamplerCustom with the student's sigmas (times t) and
    SAMPLER against the engine. Flux distils at guidance 3.5 as its input; ComfyUI samples it with the stock
    FluxGuidance at that value and CFG 1. Also: a plain SD1.5-style MODEL is accepted after a
    ModelSamplingSD3 clone of it ran (the shared BaseModel then held flow sampling)."""
    _comfyui()
    _folders(work)
    import torch
    from comfy_extras.nodes_flux import FluxGuidance, FluxKontextMultiReferenceLatentMethod

    unloaded = unloaded_lora_keys()
    model, context, pooled = flow_model(family, work)

    def entry(seed: int) -> list:
        gen = torch.Generator().manual_seed(seed)
        options = {"pooled_output": torch.randn(1, pooled, generator=gen)}
        tokens = 12
        if family in ("lumina2", "omnigen2"):  # the text encoder's mask gives the token count; prompts of 3 lengths
            tokens = 8 + 4 * seed
            options["attention_mask"] = torch.ones(1, tokens, dtype=torch.long)
        if family in ("ltxv-clip", "ltxv-i2v-clip", "mochi-clip"):  # T5 prompts of 3 lengths padded to one
            # (LTX-Video's to 128)
            tokens = 20
            options["attention_mask"] = (torch.arange(tokens) < 8 + 4 * seed).long()[None]
        if family == "hunyuan-dit":  # BERT and mT5 prompts of 3 lengths padded to their encoders' (BERT's 12), one
            tokens = 12 if seed < 3 else 16  # longer: the negative's BERT tokens and mask run past the padding
            options["attention_mask"] = (torch.arange(tokens) < 4 + 4 * seed).long()[None]
            options["conditioning_mt5xl"] = torch.randn(1, 16, context, generator=gen)
            options["attention_mask_mt5xl"] = (torch.arange(16) < 5 + 3 * seed).long()[None]
        if family == "hidream":  # two Llama layers' hidden states beside the T5 tokens, of three lengths
            options["conditioning_llama3"] = torch.randn(1, 2, 8 + 4 * seed, context, generator=gen)
        if family in REFERENCE_LATENTS and (seed != 3 or family == "qwen-image-edit"):  # as ReferenceLatent and
            # TextEncodeQwenImageEdit add them; Flux Kontext's negative is a zeroed-out prompt without the image,
            # Qwen-Image-Edit's negatives (seeds 3 and 4) are encoded with their prompts' images (seeds 1 and 2)
            image = torch.Generator().manual_seed({3: 1, 4: 2}.get(seed, seed))
            options["reference_latents"] = [torch.randn(1, *REFERENCE_LATENTS[family], generator=image)]
        if family == "flux-fill":  # as InpaintModelConditioning writes them: the masked image's latent and its mask
            image = torch.Generator().manual_seed(1 if seed == 3 else seed)
            options["concat_latent_image"] = torch.randn(1, 16, 8, 8, generator=image)
            options["concat_mask"] = (torch.arange(8) < 4).float().expand(1, 1, 8, 8)  # the left half repainted
        if family == "hunyuan-video-i2v-clip" and seed != 3:  # as HunyuanImageToVideo (v1, concat) writes them:
            # the start frame's latent and its mask over 3 latent frames, on the positive only
            image = torch.Generator().manual_seed(seed)
            options["concat_latent_image"] = torch.randn(1, 16, 1, 8, 8, generator=image)
            options["concat_mask"] = torch.ones(1, 1, 3, 8, 8)
            options["concat_mask"][:, :, :1] = 0
        if family == "hunyuan-video-v2-clip":  # as HunyuanImageToVideo (v2, replace) writes them, on every entry
            # the list gives it: the start frame guides (the frame itself is in the LATENT, ``start_latent``)
            options["guiding_frame_index"] = 0
        if family == "wan-i2v-clip":  # as WanImageToVideo writes them: the start frame's latent and its mask over
            # 3 latent frames; the negative (seed 3) carries the first prompt's image, as the node gives both
            image = torch.Generator().manual_seed(1 if seed == 3 else seed)
            options["concat_latent_image"] = torch.randn(1, 16, 3, 8, 8, generator=image)
            options["concat_mask"] = torch.ones(1, 1, 3, 8, 8)
            options["concat_mask"][:, :, :1] = 0  # the first latent frame is the image's
        return [torch.randn(1, tokens, context, generator=gen), options]

    stock = importlib.import_module("nodes")
    pack = load_pack().NODE_CLASS_MAPPINGS
    positive, negative = [entry(1), entry(2)], [entry(3), entry(4)] if family == "qwen-image-edit" else [entry(3)]
    if family == "flux-kontext":  # the references placed as UNO / UXO place them, a text input of the model
        positive = FluxKontextMultiReferenceLatentMethod.execute(positive, "uxo/uno")[0]
    embedded = family in EMBEDDED_GUIDANCE
    guidance = 3.5 if embedded else 4.0
    sampled = FluxGuidance.execute(positive[:1], guidance)[0] if embedded else None
    start = start_latent(family, SIDES.get(family, 64), LENGTHS[family]) if family in START_LATENTS else None
    result = distil_and_compare(pack, model, positive, negative,
                                lambda name: stock.LoraLoaderModelOnly().load_lora_model_only(model, name, 1.0)[0],
                                guidance=guidance, sample_positive=sampled, side=SIDES.get(family, 64),
                                length=LENGTHS.get(family, 1), start=start)
    sampling = model.get_model_object("model_sampling")
    linear = [m.weight for m in model.model.diffusion_model.modules() if isinstance(m, torch.nn.Linear)]
    return {**result, "family": family, "unloaded_lora_keys": len(unloaded),
            "base_weight_dtypes": sorted({str(w.dtype) for w in linear}),
            "lora_dtypes": sorted({str(t.dtype) for t in _safetensors_tensors(result["lora_file"]).values()}),
            "sampling": [c.__name__ for c in type(sampling).__mro__][:3],
            "model_class": type(model.model).__name__}


class StandInText:
    """A text encoder's node-facing interface: the tokens are the text and the mean of the image features it reads
    (HunyuanVideo's ``image_embeds``), its encoding [1, tokens, width] a function of both, with ``options(text)`` (a
    pooled output, the attention mask of T5's padded tokens); ``given``: the tokenizer's options and image means."""

    def __init__(self, width: int, tokens: int, options):
        self.width, self.tokens, self.options, self.given = width, tokens, options, []

    def tokenize(self, text, image_embeds=None, **options):
        seen = 0.0 if image_embeds is None else float(image_embeds.mean())
        self.given.append({"options": sorted([*options, *(["image_embeds"] if image_embeds is not None else [])]),
                           "image": seen})
        return text, seen

    def encode_from_tokens_scheduled(self, tokens):
        import torch

        text, seen = tokens
        gen = torch.Generator().manual_seed(sum(map(ord, text)))
        return [[torch.randn(1, self.tokens, self.width, generator=gen) + seen, self.options(text)]]


def pack_with_stock_nodes(work: Path) -> dict:
    """This pack's node classes in a ComfyUI on the CPU whose own extra nodes (comfy_extras: WanImageToVideo,
    TextEncodeQwenImageEdit, ...) are registered, as its server registers them, for nodes that run them."""
    import asyncio

    _comfyui()
    _folders(work)
    import nodes

    asyncio.run(nodes.init_builtin_extra_nodes())
    return load_pack().NODE_CLASS_MAPPINGS


def guided_teacher(handle, shape: tuple[int, ...], w: float) -> dict:
    """Teacher from MODEL's teacher, guided at CFG ``w``, on two drawn prompts at noise level 2: finite, and its
    shape."""
    import torch

    from distill_core.teacher import CFGTeacher

    source = handle.source()
    rows = source.draw_cond(2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        guided = CFGTeacher(source.denoiser, w, source.uncond)(torch.randn(2, *shape), torch.full((2,), 2.0), rows)
    return {"guided_finite": bool(torch.isfinite(guided).all()), "guided_shape": list(guided.shape)}


def edit_list_probe(work: Path) -> dict:
    """Distill edit list on two images and two instructions, every pair, for each Qwen-Image-Edit release through
    ComfyUI's own stock node (see the module docstring): what the text encoder and VAE were given, the reference
    latents of the conditioning, and Teacher from MODEL on it with a guided teacher evaluation."""
    pack = pack_with_stock_nodes(work)
    import torch

    model, context, pooled = flow_model("qwen-image-edit", work)

    class StandInClip:
        """The text encoder's node-facing interface: tokens are the text and images; the encoding a function of
        both (Qwen2.5-VL reads the image)."""

        def __init__(self):
            self.given = []

        def tokenize(self, text, images=(), **options):
            self.given.append({"text": text, "images": [list(i.shape) for i in images], "options": sorted(options)})
            return text, [float(i.mean()) for i in images]

        def encode_from_tokens_scheduled(self, tokens):
            text, means = tokens
            gen = torch.Generator().manual_seed(sum(map(ord, text)))
            cond = torch.randn(1, 12, context, generator=gen) + sum(means)
            return [[cond, {"pooled_output": torch.randn(1, pooled, generator=gen)}]]

    class StandInVAE:
        """The Wan VAE's ``encode``: IMAGE [1, H, W, 3] -> a one-frame latent [1, 16, 1, H / 8, W / 8]."""

        def __init__(self):
            self.given = []

        def encode(self, pixels):
            self.given.append(list(pixels.shape))
            x = torch.nn.functional.avg_pool2d(pixels.movedim(-1, 1), 8)
            return x.repeat(1, 6, 1, 1)[:, :16, None]

    images = torch.rand(2, 48, 80, 3, generator=torch.Generator().manual_seed(0))
    out = {}
    for editor in ("Qwen-Image-Edit", "Qwen-Image-Edit 2509"):
        clip, vae = StandInClip(), StandInVAE()
        positive, negative, fitted = pack["DistillEditList"]().run(clip, vae, editor, "add snow\nmake it night", "",
                                                                   "every line on every image", 64, 64,
                                                                   images=images)["result"]
        (handle,) = pack["DistillTeacherFromModel"]().run(model, positive, negative, 64, 64, 4.0)
        out[editor] = {"entries": [len(positive), len(negative)], "fitted": list(fitted.shape),
                       "tokenized": clip.given, "vae_encoded": vae.given,
                       "reference_latents": [list(e[1]["reference_latents"][0].shape) for e in positive],
                       "references_per_entry": [len(e[1]["reference_latents"]) for e in [*positive, *negative]],
                       "distinct_references": len({round(float(e[1]["reference_latents"][0].sum()), 3)
                                                   for e in [*positive, *negative]}),
                       **guided_teacher(handle, (16, 1, 8, 8), 4.0)}
    return out


def start_image_list_probe(work: Path) -> dict:
    """Distill image-to-video list on two start images and two prompts, every pair, through ComfyUI's own
    WanImageToVideo and CLIPVisionEncode (see the module docstring): what the VAE and the CLIP vision model were
    given, the model inputs of the conditioning, and Teacher from MODEL on it with a guided teacher evaluation."""
    from types import SimpleNamespace

    pack = pack_with_stock_nodes(work)
    import torch

    model, context, pooled = flow_model("wan-i2v-clip", work)

    clip = StandInText(context, 12, lambda text: {"pooled_output": torch.randn(1, pooled)})

    class StandInVAE:
        """The Wan 2.1 VAE's ``encode``: frames [T, H, W, 3] -> [1, 16, (T - 1) / 4 + 1, H / 8, W / 8]."""

        def __init__(self):
            self.given = []

        def encode(self, frames):
            self.given.append(list(frames.shape))
            x = torch.nn.functional.avg_pool2d(frames.movedim(-1, 1), 8).movedim(0, 1)[None]  # [1, 3, T, h, w]
            x = torch.cat([x[:, :, :1], x[:, :, 1:].unflatten(2, (-1, 4)).mean(3)], 2)
            return x.repeat(1, 6, 1, 1, 1)[:, :16]

    class StandInVision:
        """CLIP vision's ``encode_image``: the penultimate hidden states [1, 257, 1280] Wan 2.1 reads."""

        def __init__(self):
            self.given = []

        def encode_image(self, image, crop=True):
            self.given.append([list(image.shape), crop])
            return SimpleNamespace(penultimate_hidden_states=torch.full((1, 257, 1280), float(image.mean())))

    images = torch.rand(2, 48, 80, 3, generator=torch.Generator().manual_seed(0))
    vae, vision = StandInVAE(), StandInVision()
    positive, negative, fitted, _ = pack["DistillImageToVideoList"]().run(
        clip, vae, "Wan 2.1 / Wan 2.2 14B (WanImageToVideo)", "the camera pushes in\nit rains", "static", 9,
        "every line on every image", 64, 64, images=images, clip_vision=vision)["result"]
    (handle,) = pack["DistillTeacherFromModel"]().run(model, positive, negative, 64, 64, 4.0, length=9)
    hunyuan = hunyuan_start_list(pack, images, StandInVAE(), work)
    hunyuan_v2 = hunyuan_start_list(pack, images, StandInVAE(), work, "hunyuan-video-v2-clip")
    starts = {family: start_latent_list(pack, family, release, images, work) for family, release in (
        ("wan22-5b-i2v-clip", "Wan 2.2 5B (Wan22ImageToVideoLatent)"), ("ltxv-i2v-clip", "LTX-Video (LTXVImgToVideo)"))}
    return {**starts, "hunyuan-video-i2v-clip": hunyuan, "hunyuan-video-v2-clip": hunyuan_v2,
            "entries": [len(positive), len(negative)], "fitted": list(fitted.shape),
            "vae_encoded": vae.given, "vision_encoded": vision.given,
            "inputs": [{k: list(v.shape) for k, v in e[1].items() if isinstance(v, torch.Tensor)} for e in positive],
            "vision_features": [float(e[1]["clip_vision_output"].penultimate_hidden_states[0, 0, 0]) for e in positive],
            "image_means": [float(i.mean()) for i in fitted],
            "negative_shares_images": all(n[1]["concat_latent_image"] is p[1]["concat_latent_image"]
                                          for p, n in zip(positive, negative, strict=True)),
            **guided_teacher(handle, (16, 3, 8, 8), 4.0)}


def hunyuan_start_list(pack: dict, images, vae, work: Path, family: str = "hunyuan-video-i2v-clip") -> dict:
    """Distill image-to-video list for HunyuanVideo, two start images x two prompts, through ComfyUI's own
    CLIPVisionEncode, TextEncodeHunyuanVideo_ImageToVideo and HunyuanImageToVideo (stand-ins for its text encoder,
    which records the options and the image features it was given, its vision model and ``vae``), into Teacher from
    MODEL on a tiny HunyuanVideo image-to-video model at its guidance input, and a teacher evaluation on a clip:
    ``family`` hunyuan-video-i2v-clip, v1 (concat); hunyuan-video-v2-clip, v2 (replace), its start latents the
    teacher's start_latent."""
    from types import SimpleNamespace

    import torch

    model, context, pooled = flow_model(family, work)
    llava = StandInText(context, 12, lambda text: {"pooled_output": torch.randn(1, pooled)})

    class StandInVision:
        def encode_image(self, image, crop=True):
            return SimpleNamespace(mm_projected=torch.full((1, 4, 8), float(image.mean())))

    v2 = family == "hunyuan-video-v2-clip"
    release = ("HunyuanVideo v2 (HunyuanImageToVideo, v2 replace)" if v2 else
               "HunyuanVideo (HunyuanImageToVideo, v1 concat)")
    positive, negative, fitted, start = pack["DistillImageToVideoList"]().run(
        llava, vae, release, "the camera pushes in\nit rains", "static", 9, "every line on every image", 64, 64,
        images=images, clip_vision=StandInVision())["result"]
    (handle,) = pack["DistillTeacherFromModel"]().run(model, positive, negative, 64, 64, 3.5, length=9,
                                                      **({"start_latent": start} if v2 else {}))
    return {"entries": [len(positive), len(negative)], "tokenized": llava.given,
            "image_means": [float(i.mean()) for i in fitted],
            "inputs": [sorted(k for k, v in e[1].items() if isinstance(v, torch.Tensor | int))
                       for e in positive + negative],
            **({"start_samples": list(start["samples"].shape),
                "kept_frames": start["noise_mask"][:, 0].flatten(2).amax(-1).tolist()} if v2 else {}),
            **guided_teacher(handle, (16, 3, 8, 8), handle.guidance)}


def start_latent_list(pack: dict, family: str, release: str, images, work: Path) -> dict:
    """Distill image-to-video list for a model that keeps the start image in the clip's latent (``family``: Wan 2.2
    5B's or LTX-Video's, ``release``: the list's name for it), two start images x two prompts in order, through that
    release's own stock node (Wan22ImageToVideoLatent, LTXVImgToVideo; stand-ins for the T5 text encoder and a VAE
    that encodes an image as one latent frame of the family's channels), into Teacher from MODEL's start_latent on a
    tiny model of the family, and a guided teacher evaluation on a clip."""
    import torch

    channels, span = START_LATENTS[family]

    class StandInVAE:
        def encode(self, image):
            x = torch.nn.functional.avg_pool2d(image.movedim(-1, 1), span)
            return x.repeat(1, -(-channels // 3), 1, 1)[:, :channels, None]

    model, context, _ = flow_model(family, work)
    t5 = StandInText(context, 20, lambda text: {"attention_mask": (torch.arange(20) < 4 + len(text) % 12).long()[None]})
    positive, negative, _, start = pack["DistillImageToVideoList"]().run(
        t5, StandInVAE(), release, "the camera pushes in\nit rains", "static", LENGTHS[family], "image i with line i",
        64, 64, images=images)["result"]
    (handle,) = pack["DistillTeacherFromModel"]().run(model, positive, negative, 64, 64, 4.0, length=LENGTHS[family],
                                                      start_latent=start)
    side = 64 // span
    return {"entries": [len(positive), len(negative)], "start_samples": list(start["samples"].shape),
            "kept_frames": start["noise_mask"][:, 0].flatten(2).amax(-1).tolist(),  # per latent frame
            "images_differ": bool((start["samples"][0, :, 0] - start["samples"][1, :, 0]).abs().max() > 0),
            **guided_teacher(handle, (channels, 3, side, side), 4.0)}


#: image-to-video families whose start image lies in the LATENT that the sampler is given: its channels and pixel span
START_LATENTS = {"wan22-5b-i2v-clip": (48, 16), "ltxv-i2v-clip": (128, 32), "hunyuan-video-v2-clip": (16, 8)}


def start_latent(family: str, side: int, length: int) -> dict:
    """The LATENT of ComfyUI's own image-to-video latent node with a start image, of ``side`` x ``side`` pixels and
    ``length`` frames (Wan22ImageToVideoLatent; LTXVImgToVideo at strength 0.9, whose mask keeps 0.9 of the image;
    HunyuanImageToVideo in v2, replace), for a VAE that encodes the image as a random latent frame of the family's
    channels."""
    import torch
    from comfy_extras.nodes_hunyuan import HunyuanImageToVideo
    from comfy_extras.nodes_lt import LTXVImgToVideo
    from comfy_extras.nodes_wan import Wan22ImageToVideoLatent

    channels, span = START_LATENTS[family]

    class RandomVAE:
        def encode(self, image):
            return torch.randn(1, channels, 1, side // span, side // span, generator=torch.Generator().manual_seed(4))

    image = torch.rand(1, side, side, 3, generator=torch.Generator().manual_seed(5))
    if family == "ltxv-i2v-clip":
        return LTXVImgToVideo.execute([], [], image, RandomVAE(), side, side, length, 1, 0.9)[2]
    if family == "hunyuan-video-v2-clip":
        return HunyuanImageToVideo().encode([], RandomVAE(), side, side, length, 1, "v2 (replace)", image)[1]
    return Wan22ImageToVideoLatent.execute(RandomVAE(), side, side, length, 1, start_image=image)[0]


def two_model_probe(method: str, work: Path) -> dict:
    """Wan 2.2 14B's shape, tiny: two Wan models of other weights (its high- and low-noise models) -> Teacher from
    MODEL with the low-noise one and boundary 0.875 -> Distill to 4 steps (``method`` sfd) or Distill to 1-4 steps
    (dmd2), LoRA -> one LoRA per model -> the stock LoraLoaderModelOnly on each (no key left unloaded) -> Student
    sigmas for two models -> two chained ComfyUI samplers (the second adds no noise and goes on from the first's
    output), against the engine's sampling of the student from the same initial latent. A DMD2 student re-noises
    between its steps: the comparison fixes its fresh noise (zero), and ``drawn_diff`` says how far the pair's
    sample with drawn noise lies from it."""
    _comfyui()
    _folders(work)
    import comfy.model_management
    import comfy.sample
    import torch

    unloaded = unloaded_lora_keys()
    (high, context, pooled), (low, _, _) = flow_model("wan", work), flow_model("wan", work)
    _init(low.model.diffusion_model, 6)

    def entry(seed: int) -> list:
        gen = torch.Generator().manual_seed(seed)
        return [torch.randn(1, 12, context, generator=gen), {"pooled_output": torch.randn(1, pooled, generator=gen)}]

    stock = importlib.import_module("nodes")
    pack = load_pack().NODE_CLASS_MAPPINGS
    from distill_core import sampling
    from distill_core.denoisers.comfy_conditioning import encode_conditioning
    from distill_core.sampling import sample

    positive, negative = [entry(1), entry(2)], [entry(3)]
    torch.manual_seed(0)
    seen = {}
    with torch.inference_mode():  # how ComfyUI runs every node
        (teacher,) = pack["DistillTeacherFromModel"]().run(high, positive, negative, 64, 64, 4.0,
                                                            low_noise_model=low, boundary=0.875)
        train = sfd_node(pack) if method == "sfd" else lambda teacher: pack["DistillDistributionMatching"]().run(
            teacher, steps=4, method="dmd2", iterations=3, learning_rate=1e-3, batch=2, critic_updates=2, seed=0,
            student="lora", lora_rank=4, save_name="probe_lora", resume=False, preview_every=2,
            checkpoint_every=2, unique_id="5")
        student_model, handle, _ = train(teacher)["result"]
        model_high, sigmas_high, sampler_high, model_low, sigmas_low, sampler_low, cfg = pack[
            "DistillTwoModelSchedule"]().run("(connected student)", 0, handle)
        loras = {name: stock.LoraLoaderModelOnly().load_lora_model_only(m, f"probe_lora_{name}_noise.safetensors",
                                                                         1.0)[0]
                 for name, m in (("high", high), ("low", low))}
        inner = sampler_high.sampler_function

        def recording(model_k, x, sigmas, **kw):
            seen["x_init"] = x.clone()
            return inner(model_k, x, sigmas, **kw)

        sampler_high.sampler_function = recording
        latent = torch.zeros(1, *teacher.source().shape[:1], 1, *teacher.source().shape[1:])
        noise = comfy.sample.prepare_noise(latent, 7)

        def chained(high_model, low_model):
            handed = comfy.sample.sample_custom(high_model, noise, cfg, sampler_high, sigmas_high, positive[:1],
                                                negative, latent, disable_pbar=True, seed=7)
            return comfy.sample.sample_custom(low_model, torch.zeros_like(noise), cfg, sampler_low, sigmas_low,
                                              positive[:1], negative, handed, disable_pbar=True, seed=7)

        drawn = chained(loras["high"], loras["low"])
        fresh_noise, sampling.renoise_noise = sampling.renoise_noise, lambda x, steps: [torch.zeros_like(x)] * steps
        bare, out = chained(high, low), chained(loras["high"], loras["low"])
        nodes_models = chained(model_high, model_low)  # the node's own MODELs, the LoRAs applied the same way
    comfy.model_management.load_models_gpu([high, low])  # the teachers again, without the stock loader's patches
    with torch.inference_mode(False), handle.loaded() as student:  # the engine, the LoRAs hooked into both
        cond = encode_conditioning(high.model, positive[:1], latent.shape[1:])
        ours = sample(student, seen["x_init"].clone() / (1 - float(sigmas_high[0])), cond)
    sampling.renoise_noise = fresh_noise
    # a sampler's result leaves divided by 1 - t_last (x_t / (1 - t) is the engine's x) and in the latent format's
    # scale, which the next sampler takes it back in from
    theirs = low.model.process_latent_in(out)
    keys = {name: sorted(_safetensors_keys(work / "loras" / f"probe_lora_{name}_noise.safetensors"))
            for name in ("high", "low")}
    return {"card": {k: handle.card.get(k) for k in ("comfy_experts", "comfy_noise", "nfe")},
            "student_model": type(student_model).__name__, "unloaded_lora_keys": len(unloaded),
            "keys": {name: len(k) for name, k in keys.items()}, "same_layers": keys["high"] == keys["low"],
            "key_example": keys["high"][0], "sigmas_high": [round(float(s), 4) for s in sigmas_high],
            "sigmas_low": [round(float(s), 4) for s in sigmas_low], "cfg": cfg,
            "max_abs_diff": float((ours - theirs.reshape(ours.shape)).abs().max()),
            "lora_effect": float((out - bare).abs().max()),
            "node_models_diff": float((nodes_models - out).abs().max()),
            "drawn_diff": float((drawn - out).abs().max()), "sampler": handle.card["sampler"],
            "output_scale": float(ours.abs().max())}


def stock_nodes_on_checkpoint(checkpoint: Path, work: Path):
    """ComfyUI's stock nodes and this pack's, the tiny checkpoint through Load Checkpoint and two prompts through
    Distill prompt list; and a list that collects what the stock LoRA loaders log about keys they leave
    unloaded. Returns (stock nodes module, pack node classes, model, clip, positive, negative, unloaded)."""
    _comfyui()
    _folders(work)
    os.symlink(checkpoint, work / "checkpoints" / checkpoint.name)
    import torch

    unloaded = unloaded_lora_keys()
    stock = importlib.import_module("nodes")
    pack = load_pack().NODE_CLASS_MAPPINGS
    with torch.inference_mode():
        model, clip, _ = stock.CheckpointLoaderSimple().load_checkpoint(checkpoint.name)
        positive, negative = pack["DistillPromptList"]().run(clip, "a red fox in snow\na lighthouse at dusk", "blurry")
    return stock, pack, model, clip, positive, negative, unloaded


def checkpointing_probe(checkpoint: Path, work: Path) -> dict:
    """Load Checkpoint -> Teacher from MODEL -> Distill to 4 steps (LoRA, two iterations) twice from one seed,
    without and with grad_checkpointing: how far apart the two LoRAs are, how many of the model's layers were
    checkpointed during the run, and how many are left so after it."""
    _, pack, model, _, positive, negative, _ = stock_nodes_on_checkpoint(checkpoint, work)
    import torch

    from distill_core.nets.surgery import Checkpointed

    checkpointed, enable = [], importlib.import_module("distill_core.nets.surgery").enable_checkpointing

    def counting(net):
        enable(net)
        checkpointed.append(sum(isinstance(m, Checkpointed) for m in net.modules()))

    importlib.import_module("distill_core.train.trainer").enable_checkpointing = counting
    loras = []
    with torch.inference_mode():
        (teacher,) = pack["DistillTeacherFromModel"]().run(model, positive, negative, 64, 64, 5.0)
        for on in (False, True):
            name = f"probe_{'checkpointed' if on else 'plain'}"
            pack["DistillToSteps"]().run(
                teacher, steps=4, method="sfd", iterations=2, learning_rate=1e-3, batch=2, seed=0,
                guidance_mode="auto", student="lora", lora_rank=4, save_name=name, resume=False,
                preview_every=0, checkpoint_every=2, grad_checkpointing=on, unique_id="4")
            loras.append(_safetensors_tensors(work / "loras" / f"{name}.safetensors"))
    plain, ckpt = loras
    weights = [k for k, t in plain.items() if t.ndim >= 2 and t.float().abs().max() > 0]  # not the alpha scalars
    return {"keys": len(plain), "same_keys": sorted(plain) == sorted(ckpt), "weights": len(weights),
            "max_relative_diff": max(float((plain[k].float() - ckpt[k].float()).abs().max()
                                           / plain[k].float().abs().max()) for k in weights),
            "checkpointed_during": checkpointed,
            "checkpointed_after": sum(isinstance(m, Checkpointed) for m in model.model.diffusion_model.modules())}


def dmd2_probe(checkpoint: Path, work: Path) -> dict:
    """Load Checkpoint -> Distill to 1-4 steps (DMD2, two LoRAs on the shared base) -> the stock LoraLoader
    (no key left unloaded) -> the student's sampler against the engine; and the stock ``lcm`` sampler on the
    file's sigmas."""
    stock, pack, model, clip, positive, negative, unloaded = stock_nodes_on_checkpoint(checkpoint, work)
    import comfy.sample
    import comfy.samplers
    import torch

    storage = {}

    def train(teacher):
        from distill_core.config import DistillConfig
        from distill_core.methods import build_method
        from distill_core.student_files import release_teacher

        with torch.inference_mode(False):  # the distinct parameter storage DMD2 holds, teacher included
            source = teacher.source()
            method = build_method(source, DistillConfig(method="dmd2", steps=2, student="lora", lora_rank=4))
            held = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()
                    for m in [*method.nets.values(), source.denoiser] for p in m.parameters()}
            base = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in source.denoiser.parameters()}
            adapters = sum(p.numel() * p.element_size() for n in method.nets.values() for p in n.lora.parameters())
            storage.update(held=sum(held.values()), base=sum(base.values()), adapters=adapters)
            for net in method.nets.values():
                release_teacher(net)
        return pack["DistillDistributionMatching"]().run(
            teacher, steps=2, method="dmd2", iterations=3, learning_rate=1e-3, batch=2, critic_updates=2, seed=0,
            student="lora", lora_rank=4, save_name="probe_lora", resume=False, preview_every=2,
            checkpoint_every=2, unique_id="5")

    result = distil_and_compare(pack, model, positive, negative,
                                lambda name: stock.LoraLoader().load_lora(model, clip, name, 1.0, 0.0)[0], train)
    with torch.inference_mode():  # the stock lcm sampler on the file's sigmas, through the stock loader's MODEL
        lora_model = stock.LoraLoader().load_lora(model, clip, "probe_lora.safetensors", 1.0, 0.0)[0]
        sigmas = torch.tensor(result["sigmas"])
        latent = torch.zeros(1, 4, 8, 8)
        noise = comfy.sample.prepare_noise(latent, 7)
        lcm = comfy.samplers.sampler_object("lcm")
        image = comfy.sample.sample_custom(lora_model, noise, 1.0, lcm, sigmas, positive[:1], negative, latent,
                                           disable_pbar=True, seed=7)
    return {**result, "unloaded_lora_keys": len(unloaded), "lcm_finite": bool(torch.isfinite(image).all()),
            "lcm_scale": float(image.abs().max()), **storage}


def lcm_lora_probe(checkpoint: Path, work: Path) -> dict:
    """Load Checkpoint -> Distill to N steps (method lcm-lora, 4 steps, guidance distilled) -> the stock LoraLoader
    (no key left unloaded) -> the student's sampler against the engine; then the stock KSampler with sampler
    ``lcm`` on the LoRA'd MODEL: its one step (scheduler karras: sigma_max, then 0) is D at sigma_max of the
    initial latent, which the engine's one-step sample from that latent must equal; its four steps
    (sgm_uniform) must be finite."""
    stock, pack, model, clip, positive, negative, unloaded = stock_nodes_on_checkpoint(checkpoint, work)
    import math

    import comfy.model_management
    import comfy.sample
    import torch

    from distill_core.denoisers.comfy_conditioning import encode_conditioning
    from distill_core.sampling import sample

    trained = {}

    def train(teacher):
        trained["out"] = pack["DistillToSteps"]().run(
            teacher, steps=4, method="lcm-lora", iterations=3, learning_rate=1e-3, batch=2, seed=0,
            guidance_mode="distilled", student="lora", lora_rank=4, save_name="probe_lora", resume=False,
            preview_every=2, checkpoint_every=2, unique_id="6")
        return trained["out"]

    def apply_lora(name: str):
        return stock.LoraLoader().load_lora(model, clip, name, 1.0, 0.0)[0]

    result = distil_and_compare(pack, model, positive, negative, apply_lora, train)
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    with torch.inference_mode():
        lora_model = apply_lora("probe_lora.safetensors")

        def ksampler(steps: int, scheduler: str) -> torch.Tensor:
            return stock.KSampler().sample(lora_model, 7, steps, 1.0, "lcm", scheduler, positive[:1], negative,
                                           latent)[0]["samples"]

        one = lora_model.model.process_latent_in(ksampler(1, "karras"))  # KSampler's output: the VAE's latents
        four = ksampler(4, "sgm_uniform")
        sigma_max = float(lora_model.get_model_object("model_sampling").sigma_max)
        x_init = comfy.sample.prepare_noise(latent["samples"], 7) * math.sqrt(1 + sigma_max**2)  # at sigma_max
    comfy.model_management.load_models_gpu([model])
    handle = trained["out"]["result"][1]
    with torch.inference_mode(False), handle.loaded() as student:
        cond = encode_conditioning(model.model, positive[:1], (4, 8, 8))
        ours = sample(student, x_init, cond, steps=1)
    return {**result, "unloaded_lora_keys": len(unloaded), "one_step_diff": float((ours - one).abs().max()),
            "one_step_scale": float(one.abs().max()), "card_sigma_max": handle.card["sigmas"]["1"][0],
            "sigma_max": sigma_max, "four_steps_finite": bool(torch.isfinite(four).all()),
            "four_steps_scale": float(four.abs().max()), "nfe_range": handle.card.get("nfe_range")}


def sfd_node(pack: dict):
    def train(teacher):
        return pack["DistillToSteps"]().run(
            teacher, steps=4, method="sfd", iterations=4, learning_rate=1e-3, batch=2, seed=0,
            guidance_mode="auto", student="lora", lora_rank=4, save_name="probe_lora", resume=False,
            preview_every=2, checkpoint_every=2, unique_id="4")

    return train


def distil_and_compare(pack: dict, model, positive: list, negative: list, apply_lora, train=None,
                       guidance: float = 5.0, sample_positive: list | None = None, side: int = 64,
                       length: int = 1, start: dict | None = None) -> dict:
    """Teacher from MODEL (``side`` x ``side`` pixels; a video model's clips of ``length`` frames; ``start``: the
    LATENT its clips start from) -> a training node (``train(teacher)``; default Distill to 4 steps, LoRA) ->
    Student sigmas + sampler; then ComfyUI's sampler on the teacher with the LoRA applied by ``apply_lora(file
    name)`` (a stock loader) against the engine's own sampling of the student from the same initial latent, of the
    teacher's size and frames (with ``start``, that LATENT and its noise mask, as a workflow samples)."""
    import comfy.model_management
    import comfy.sample
    import torch

    from distill_core.denoisers.comfy_conditioning import encode_conditioning, start_rows
    from distill_core.sampling import sample

    torch.manual_seed(0)
    video = getattr(model.model.latent_format, "latent_dimensions", 2) == 3
    with torch.inference_mode():  # how ComfyUI runs every node
        (teacher,) = pack["DistillTeacherFromModel"]().run(model, positive, negative, side, side, guidance,
                                                            length=length, start_latent=start)
        out = (train or sfd_node(pack))(teacher)
        student_model, handle, curve = out["result"]
        sigmas, sampler, cfg = pack["DistillStudentSchedule"]().run("(connected student)", 0, handle)

        lora_model = apply_lora("probe_lora.safetensors")
        seen = {}
        inner = sampler.sampler_function

        def recording(model_k, x, sigmas, **kw):
            seen["x_init"] = x.clone()
            seen["x_out"] = inner(model_k, x, sigmas, **kw)
            return seen["x_out"]

        sampler.sampler_function = recording
        channels, *frames, height, width = teacher.source().shape  # the teacher's latent; a still: one frame
        latent = torch.zeros(1, channels, *(frames or [1] * video), height, width)
        latent, mask = (latent, None) if start is None else (start["samples"], start["noise_mask"])
        noise = comfy.sample.prepare_noise(latent, 7)
        sampled = sample_positive or positive[:1]
        for name, m in (("teacher", model), ("lora", lora_model)):  # the same noise, without and with the LoRA
            comfy.sample.sample_custom(m, noise, cfg, sampler, sigmas, sampled, negative[:1], latent,
                                       noise_mask=mask, disable_pbar=True, seed=7)
            seen[name] = seen["x_out"]
        if start is not None:  # the LoRA from another start image: the clip's other frames follow the image
            other, x_init = torch.cat([-latent[:, :, :1], latent[:, :, 1:]], 2), seen["x_init"]
            comfy.sample.sample_custom(lora_model, noise, cfg, sampler, sigmas, sampled, negative[:1], other,
                                       noise_mask=mask, disable_pbar=True, seed=7)
            seen["start_effect"] = float((seen["x_out"] - seen["lora"])[:, :, 1:].abs().max())
            seen["x_init"] = x_init

    card = handle.card
    # ComfyUI gives a flow model x_t = x / (1 + sigma) at t = sigma / (1 + sigma), and divides its sampler's
    # result by 1 - t_last: the engine's x at both ends
    first, last = (1 - float(sigmas[0]), 1 - float(sigmas[-1])) if card.get("comfy_noise") == "flow" else (1, 1)
    comfy.model_management.load_models_gpu([model])  # the teacher again: ComfyUI unpatches the LoRA (as nodes do)
    with torch.inference_mode(False), handle.loaded() as student:  # the engine, LoRA hooked into the teacher
        base = teacher.model.model
        kept = start_rows(base, start, latent.shape[1:], 1) if start is not None else None
        cond = encode_conditioning(base, sampled, latent.shape[1:], kept)  # the negative is the student's uncond
        ours = sample(student, seen["x_init"].clone() / first, cond)
    seen["lora"], seen["teacher"] = seen["lora"] / last, seen["teacher"] / last
    lora_keys = sorted(_safetensors_keys(handle.path))
    return {
        "max_abs_diff": float((ours - seen["lora"]).abs().max()),
        "lora_effect": float((seen["teacher"] - seen["lora"]).abs().max()),
        "output_scale": float(ours.abs().max()),
        "steps": len(sigmas) - 1,
        "cfg": cfg,
        "sigmas": [round(float(s), 4) for s in sigmas],
        "card": {k: card.get(k) for k in ("method", "nfe", "afs", "guidance", "sampler", "comfy_noise",
                                          "embedded_guidance", "schedule")},
        "student_kind": card["student"]["kind"],
        "lora_keys": len(lora_keys),
        "lora_key_example": lora_keys[0],
        "student_model": type(student_model).__name__,
        "loss_curve_shape": list(curve.shape),
        "lora_file": str(handle.path),
        "train_latent": list(teacher.source().shape),
        "start_effect": seen.get("start_effect"),
    }


def _safetensors_keys(path: Path):
    return list(_safetensors_tensors(path))


def _safetensors_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


if __name__ == "__main__":
    command = sys.argv[1]
    if command == "checkpoint":
        build_checkpoint(Path(sys.argv[2]))
    elif command == "sdxl-checkpoint":
        build_sdxl_checkpoint(Path(sys.argv[2]))
    elif command == "sd3-checkpoint":
        build_sd3_checkpoint(Path(sys.argv[2]), Path(sys.argv[3]))
    elif command == "wan-files":
        build_wan_files(*map(Path, sys.argv[2:5]))
    elif command == "wan-i2v-files":
        build_wan_i2v_files(*map(Path, sys.argv[2:4]))
    elif command == "flux-files":
        build_flux_files(*map(Path, sys.argv[2:4]))
    elif command == "wan22-5b-files":
        build_wan22_5b_files(*map(Path, sys.argv[2:4]))
    elif command == "lora-probe":
        print("RESULT " + json.dumps(lora_probe(Path(sys.argv[2]).resolve(), Path(sys.argv[3]).resolve())))
    elif command == "lcm-lora-probe":
        print("RESULT " + json.dumps(lcm_lora_probe(Path(sys.argv[2]).resolve(), Path(sys.argv[3]).resolve())))
    elif command == "checkpointing-probe":
        print("RESULT " + json.dumps(checkpointing_probe(Path(sys.argv[2]).resolve(), Path(sys.argv[3]).resolve())))
    elif command == "dmd2-probe":
        print("RESULT " + json.dumps(dmd2_probe(Path(sys.argv[2]).resolve(), Path(sys.argv[3]).resolve())))
    elif command == "flow-probe":
        print("RESULT " + json.dumps(flow_probe(sys.argv[2], Path(sys.argv[3]).resolve())))
    elif command == "two-model-probe":
        print("RESULT " + json.dumps(two_model_probe(sys.argv[2], Path(sys.argv[3]).resolve())))
    elif command == "edit-list-probe":
        print("RESULT " + json.dumps(edit_list_probe(Path(sys.argv[2]).resolve())))
    elif command == "start-image-list-probe":
        print("RESULT " + json.dumps(start_image_list_probe(Path(sys.argv[2]).resolve())))
    elif command == "family-probe":
        print("RESULT " + json.dumps(family_probe(sys.argv[2], Path(sys.argv[3]).resolve())))
    else:
        raise SystemExit(f"unknown command {command!r}")
