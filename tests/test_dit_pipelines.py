"""Text-to-image pipelines of the flow transformers that followed SD3 and Flux, as ``--teacher DIR``: AuraFlow
(UMT5), Chroma (T5 with its text mask, latents packed as Flux's), Lumina 2 (Gemma 2 behind its system prompt;
time runs the other way), Z-Image (Qwen3, each prompt's tokens unpadded; time the other way), Flux.2 klein
(Qwen3's hidden states of three layers; latents of normalised 2 x 2 VAE patches) and dev (Mistral 3's, read through
its processor's chat template; guidance-distilled), HiDream (two CLIPs, T5 and
every layer of Llama 3.1; a mixture of experts) and SANA (Gemma 2 behind its call's instruction; a
deep-compression autoencoder), each built tiny here as diffusers saves it."""

from __future__ import annotations

import json

import diffusers
import pytest
import torch
from conftest import randomise

from distill_core.cli import main
from distill_core.denoisers.diffusers_flow import EMBEDDED_GUIDANCE
from distill_core.diffusers_source import diffusers_source
from distill_core.safetensors_io import read_card
from distill_core.text_pipeline import vae_scale
from tests.test_teacher_from_dir import (
    autoencoder,
    byte_vocab,
    clip_config,
    clip_tokenizer,
    qwen_vl_encoder,
    t5_encoder,
    teacher_steps,
)

KINDS = ("auraflow", "chroma", "lumina2", "zimage", "flux2-klein", "flux2-dev", "hidream", "sana", "cogview4",
         "ovis", "longcat")
#: the CFG scale w each is distilled at by default: its pipeline's (Z-Image's g = 5 is w = 6; Flux.2 dev: none,
#: its guidance an input)
DEFAULT_W = {"auraflow": 3.5, "chroma": 5.0, "lumina2": 4.0, "zimage": 6.0, "flux2-klein": 4.0, "flux2-dev": 1.0,
             "hidream": 5.0, "sana": 4.5, "cogview4": 5.0, "ovis": 5.0, "longcat": 4.5}
#: the channels of each one's latents (Flux.2's: 2 x 2 patches of 16), the pixels a latent pixel spans and the
#: latent's side (others: 16 channels, 2 pixels, 8)
LATENT = {"auraflow": (4, 2, 8), "lumina2": (16, 8, 8), "flux2-klein": (64, 4, 4), "flux2-dev": (64, 4, 4),
          "sana": (8, 8, 8)}
#: the keywords of a pipeline's call that make it sample as the engine does (Lumina 2: no rescaling of the
#: guided velocity; SANA: the image size as given; LongCat-Image: neither rescaling nor rewriting the prompt)
PIPELINE_CALL = {"lumina2": {"cfg_normalization": False}, "sana": {"use_resolution_binning": False},
                 "longcat": {"enable_cfg_renorm": False, "enable_prompt_rewrite": False}}
#: the keywords of a pipeline's call that the test's sigmas need (CogView4: its network's time before the shift, the
#: sigmas given; its call feeds 1000 .. 1 whatever sigmas it is given)
SIGMAS_CALL = {"cogview4": {"timesteps": [900.0, 600.0, 300.0]}}
#: each scheduler's time shift (Chroma's of the 16 tokens of its 8 x 8 latent's 2 x 2 patches; Flux.2's of its
#: 16 tokens at its pipeline's default 50 steps)
SHIFT = {"auraflow": 1.73, "chroma": "tokens", "lumina2": 6.0, "zimage": 3.0, "flux2-klein": "flux2",
         "flux2-dev": "flux2", "hidream": 3.0, "sana": 3.0, "cogview4": "cogview4", "ovis": "tokens",
         "longcat": "tokens"}
#: the time embeddings SFD-v conditions (Lumina 2's returns the caption's too; Chroma's has no layer of its own)
INJECTION = {"auraflow": "time_step_proj", "zimage": "t_embedder", "flux2-klein": "time_guidance_embed",
             "flux2-dev": "time_guidance_embed", "hidream": "t_embedder", "sana": "time_embed",
             "cogview4": "time_condition_embed", "longcat": "time_embed"}


def gemma(special: list[str]):
    """A tiny Gemma 2 encoder of two layers and its byte-level tokenizer."""
    import transformers

    vocab = byte_vocab(special)
    tokenizer = transformers.GemmaTokenizer(vocab=vocab, merges=[])
    config = transformers.Gemma2Config(vocab_size=len(vocab), hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                       pad_token_id=vocab["<pad>"], bos_token_id=vocab["<bos>"],
                                       eos_token_id=vocab["<eos>"])
    return transformers.Gemma2Model(config), tokenizer


def qwen3(layers: int = 2, causal: bool = False, width: int = 32):
    """A tiny Qwen3 encoder (or language model, ``causal``) of ``layers`` layers and its byte-level tokenizer with
    a chat template."""
    import transformers

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = byte_vocab(special)
    tokenizer = transformers.Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None)
    tokenizer.add_special_tokens({"additional_special_tokens": special[1:]})
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                               "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    config = transformers.Qwen3Config(vocab_size=len(vocab), hidden_size=width, intermediate_size=width,
                                      num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                                      head_dim=width // 2)
    return (transformers.Qwen3ForCausalLM if causal else transformers.Qwen3Model)(config), tokenizer


def llama(special: list[str]):
    """A tiny Llama language model of two layers and its byte-level tokenizer (a fast tokenizer of its own)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = byte_vocab(special)
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=special[0], eos_token=special[1],
                                                     pad_token=special[1], model_max_length=16)
    config = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=16, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                      bos_token_id=vocab[special[0]], eos_token_id=vocab[special[1]])
    return transformers.LlamaForCausalLM(config), tokenizer


def mistral3(root):
    """A tiny Mistral 3 (Mistral Small 3.1's layout: a Pixtral vision tower beside a Mistral language model of the
    31 layers whose hidden states Flux.2 dev's pipeline reads) and the text part of its processor
    (``chat_text_processor``), whose folder ``root / "processor"`` holds a byte-level tokenizer, a chat template
    of a system and a user turn, and a ``PixtralProcessor``'s settings."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from distill_core.text_pipeline import chat_text_processor

    special = ["<s>", "</s>", "<pad>", "[IMG]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[INST]", "[/INST]"]
    vocab = byte_vocab(special)
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>",
                                                     pad_token="<pad>", additional_special_tokens=special[3:])
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}{% for part in m['content'] %}{% if part['type'] == 'text' %}"
        "{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{{ part['text'] }}[/SYSTEM_PROMPT]"
        "{% else %}[INST]{{ part['text'] }}[/INST]{% endif %}{% else %}[IMG]{% endif %}{% endfor %}{% endfor %}")
    folder = root / "processor"
    tokenizer.save_pretrained(folder)
    (folder / "processor_config.json").write_text(json.dumps(PIXTRAL_SETTINGS))
    text = transformers.MistralConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=16,
                                      num_hidden_layers=31, num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    vision = transformers.PixtralVisionConfig(hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                              num_attention_heads=2, head_dim=8, image_size=32, patch_size=4)
    config = transformers.Mistral3Config(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                         image_token_index=vocab["[IMG]"], spatial_merge_size=1)
    return transformers.Mistral3ForConditionalGeneration(config), chat_text_processor(folder)


#: what a ``PixtralProcessor``'s folder says of its processor (its image settings)
PIXTRAL_SETTINGS = {"processor_class": "PixtralProcessor", "image_token": "[IMG]", "image_break_token": "[IMG_BREAK]",
                    "image_end_token": "[IMG_END]", "patch_size": 4, "spatial_merge_size": 1}


def glm(special: list[str]):
    """A tiny GLM-4 encoder of two layers and a byte-level tokenizer of its own whose first special token pads and
    whose others begin every text, as GLM-4's [gMASK] <sop> do."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = byte_vocab(special)
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.post_processor = processors.TemplateProcessing(single=" ".join([*special[1:], "$A"]),
                                                       special_tokens=[(t, vocab[t]) for t in special[1:]])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token=special[0],
                                                     eos_token=special[0], model_max_length=64)
    config = transformers.GlmConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                    pad_token_id=vocab[special[0]])
    return transformers.GlmModel(config), tokenizer


def dit_pipeline_dir(root, kind: str, distilled: bool = False):
    """A tiny AuraFlow, Chroma, Lumina 2 or Z-Image pipeline as diffusers saves one, on 8 x 8 latents: each
    transformer of one block (and one refiner), its own text encoder of one or two layers, an AutoencoderKL (4
    channels for AuraFlow, else 16, scaled and shifted; Lumina 2's pipeline takes its VAE as 8 pixels a latent
    pixel, so its VAE makes them so), and its scheduler: FlowMatch shifted as each ships (AuraFlow 1.73,
    Lumina 2 6, Z-Image 3; Chroma by its token count, as Flux dev). Flux.2 klein: a Qwen3 language model of the 27
    layers whose hidden states its pipeline reads, a Flux.2 VAE of one halving on 16 channels with random
    running statistics, and its pipeline's ``is_distilled`` as ``distilled`` says. HiDream: CLIPs of 128
    positions (its pipeline pads them so), T5, Llama of two layers, both of them read, and two routed experts
    of which each token takes one. SANA: Gemma 2, a deep-compression autoencoder of three halvings on 8
    channels and its DPM-Solver over flow times, shifted by 3."""
    import transformers

    flow = diffusers.FlowMatchEulerDiscreteScheduler
    if kind in ("auraflow", "chroma"):  # AuraFlow: UMT5; Chroma: T5
        tokenizer, encoder = t5_encoder(umt5=kind == "auraflow")
    if kind == "auraflow":
        network = diffusers.AuraFlowTransformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_mmdit_layers=1, num_single_dit_layers=1,
            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
            pos_embed_max_size=64)
        pipeline = diffusers.AuraFlowPipeline(
            tokenizer=tokenizer, text_encoder=encoder, vae=autoencoder(4), transformer=network,
            scheduler=flow(shift=1.73))
    elif kind == "chroma":
        network = diffusers.ChromaTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(2, 2, 4), approximator_num_channels=8,
            approximator_hidden_dim=16, approximator_layers=1)
        pipeline = diffusers.ChromaPipeline(
            scheduler=flow(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15),
            vae=autoencoder(16, shift_factor=0.1), tokenizer=tokenizer, transformer=network, text_encoder=encoder)
    elif kind == "lumina2":
        encoder, tokenizer = gemma(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"])
        network = diffusers.Lumina2Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=16, hidden_size=32, num_layers=1, num_refiner_layers=1,
            num_attention_heads=2, num_kv_heads=1, multiple_of=16, axes_dim_rope=(4, 6, 6), axes_lens=(300, 16, 16),
            cap_feat_dim=32)
        pipeline = diffusers.Lumina2Pipeline(transformer=network, scheduler=flow(shift=6.0),
                                             vae=autoencoder(16, blocks=4, shift_factor=0.1), text_encoder=encoder,
                                             tokenizer=tokenizer)
    elif kind.startswith("flux2"):
        dev = kind == "flux2-dev"
        encoder, tokenizer = mistral3(root) if dev else qwen3(layers=27, causal=True, width=16)
        network = diffusers.Flux2Transformer2DModel(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=48, timestep_guidance_channels=16, axes_dims_rope=(2, 2, 2, 2),
            guidance_embeds=dev)
        vae = diffusers.AutoencoderKLFlux2(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                                           up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
                                           latent_channels=16, norm_num_groups=4, sample_size=32)
        vae.bn.running_mean.normal_(generator=torch.Generator().manual_seed(2))
        vae.bn.running_var.uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(3))
        scheduler = flow(use_dynamic_shifting=True, time_shift_type="exponential")
        pipeline = diffusers.Flux2Pipeline(scheduler=scheduler, vae=vae, text_encoder=encoder, tokenizer=tokenizer,
                                           transformer=network) if dev else diffusers.Flux2KleinPipeline(
            scheduler=scheduler, vae=vae, text_encoder=encoder, tokenizer=tokenizer, transformer=network,
            is_distilled=distilled)
    elif kind == "hidream":
        clip, clip_vocab = clip_tokenizer(root)
        t5_tokens, t5 = t5_encoder()
        encoder, tokenizer = llama(["<|begin_of_text|>", "<|end_of_text|>"])
        network = diffusers.HiDreamImageTransformer2DModel(
            patch_size=2, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
            num_attention_heads=2, caption_channels=[32, 16], text_emb_dim=32, num_routed_experts=2,
            num_activated_experts=1,
            axes_dims_rope=(4, 2, 2), max_resolution=(32, 32), llama_layers=[0, 1])
        clips = [transformers.CLIPTextModelWithProjection(clip_config(clip_vocab, 128, projection_dim=16))
                 for _ in range(2)]
        pipeline = diffusers.HiDreamImagePipeline(
            scheduler=flow(shift=3.0), vae=autoencoder(16, shift_factor=0.1), text_encoder=clips[0], tokenizer=clip,
            text_encoder_2=clips[1], tokenizer_2=clip, text_encoder_3=t5, tokenizer_3=t5_tokens,
            text_encoder_4=encoder, tokenizer_4=tokenizer, transformer=network)
    elif kind == "cogview4":
        encoder, tokenizer = glm(["<|endoftext|>", "[gMASK]", "<sop>"])
        network = diffusers.CogView4Transformer2DModel(
            patch_size=2, in_channels=16, out_channels=16, num_layers=1, attention_head_dim=8, num_attention_heads=2,
            text_embed_dim=32, time_embed_dim=16, condition_dim=8, pos_embed_max_size=16, sample_size=8,
            rope_axes_dim=(4, 4))
        pipeline = diffusers.CogView4Pipeline(
            tokenizer=tokenizer, text_encoder=encoder, vae=autoencoder(16, shift_factor=0.1), transformer=network,
            scheduler=flow(base_shift=0.25, max_shift=0.75, base_image_seq_len=256, use_dynamic_shifting=True,
                           time_shift_type="linear"))
    elif kind == "ovis":
        encoder, tokenizer = qwen3()
        network = diffusers.OvisImageTransformer2DModel(
            patch_size=1, in_channels=64, out_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(2, 2, 4))
        pipeline = diffusers.OvisImagePipeline(
            scheduler=flow(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15),
            vae=autoencoder(16, shift_factor=0.1), text_encoder=encoder, tokenizer=tokenizer, transformer=network)
    elif kind == "longcat":
        tokenizer, encoder = qwen_vl_encoder(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
        network = diffusers.LongCatImageTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(2, 2, 4))
        pipeline = diffusers.LongCatImagePipeline(
            scheduler=flow(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15),
            vae=autoencoder(16, shift_factor=0.1), text_encoder=encoder, tokenizer=tokenizer, text_processor=None,
            transformer=network)
    elif kind == "sana":
        encoder, tokenizer = gemma(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"])
        network = diffusers.SanaTransformer2DModel(
            in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8, num_layers=1,
            num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=32,
            sample_size=8, patch_size=1)
        blocks = {"encoder_block_out_channels": (8,) * 4, "decoder_block_out_channels": (8,) * 4,
                  "encoder_layers_per_block": (1,) * 4, "decoder_layers_per_block": (1,) * 4,
                  "encoder_qkv_multiscales": ((),) * 4, "decoder_qkv_multiscales": ((),) * 4}
        vae = diffusers.AutoencoderDC(in_channels=3, latent_channels=8, attention_head_dim=8, scaling_factor=0.4,
                                      **blocks)
        pipeline = diffusers.SanaPipeline(
            tokenizer=tokenizer, text_encoder=encoder, vae=vae, transformer=network,
            scheduler=diffusers.DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                                            flow_shift=3.0))
    else:
        encoder, tokenizer = qwen3()
        network = diffusers.ZImageTransformer2DModel(in_channels=16, dim=32, n_layers=1, n_refiner_layers=1, n_heads=2,
                                                     n_kv_heads=2, cap_feat_dim=32, axes_dims=[4, 6, 6],
                                                     axes_lens=[256, 16, 16])
        pipeline = diffusers.ZImagePipeline(scheduler=flow(shift=3.0), vae=autoencoder(16, shift_factor=0.1),
                                            text_encoder=encoder, tokenizer=tokenizer, transformer=network)
    randomise(network, seed=0)
    pipeline.save_pretrained(root / "pipeline", safe_serialization=True)
    if kind == "flux2-dev":  # its processor named as Flux.2 dev's pipeline names it
        index = root / "pipeline" / "model_index.json"
        named = {**json.loads(index.read_text()), "tokenizer": ["transformers", "PixtralProcessor"]}
        index.write_text(json.dumps(named))
        (root / "pipeline" / "tokenizer" / "processor_config.json").write_text(json.dumps(PIXTRAL_SETTINGS))
    return root / "pipeline"


def pipeline_latents(pipe, prompt: str, x: torch.Tensor, w: float, sigmas: list[float], side: int,
                     **call) -> torch.Tensor:
    """The pipeline's own sampler (Euler on ``sigmas``, at the engine's CFG scale ``w``; Flux.2 dev's: without CFG,
    its guidance input at its default) from latents x [B, C, H, W] of an image of ``side`` pixels, as latents of x's
    shape."""
    kind = type(pipe).__name__
    packed = kind in ("ChromaPipeline", "OvisImagePipeline", "LongCatImagePipeline")
    b, c, h, width = x.shape
    latents = pipe._pack_latents(x, b, c, h, width) if packed else x
    scale = {"ZImagePipeline": w - 1, "Flux2Pipeline": EMBEDDED_GUIDANCE["Flux2Transformer2DModel"]}.get(kind, w)
    if kind.startswith("Flux2"):  # its latent output leaves the latent space: its last step's tokens instead
        return flux2_latents(pipe, x.shape, prompt=prompt, latents=latents, sigmas=sigmas,
                             num_inference_steps=len(sigmas), height=side, width=side, guidance_scale=scale, **call)
    out = pipe(prompt=prompt, latents=latents, sigmas=sigmas, num_inference_steps=len(sigmas), height=side,
               width=side, guidance_scale=scale, output_type="latent", **call).images
    return pipe._unpack_latents(out, side, side, pipe.vae_scale_factor).view(x.shape) if packed else out


def stock_pipeline(root, **components):
    """The pipeline at ``root`` as diffusers loads it, ``components`` given rather than loaded; Flux.2 dev's with
    the text part of its processor (``chat_text_processor``: its ``PixtralProcessor`` needs torchvision),
    LongCat-Image's without its prompt-rewriting processor."""
    from distill_core.text_pipeline import CHAT_PROCESSORS, chat_text_processor

    index = json.loads((root / "model_index.json").read_text())
    chat = index["_class_name"] in CHAT_PROCESSORS
    if "text_processor" in index:  # LongCat-Image's, which rewrites prompts only (the tests turn that off)
        components.setdefault("text_processor", None)
    pipe = diffusers.DiffusionPipeline.from_pretrained(root, local_files_only=True,
                                                       **({"tokenizer": None} if chat else {}), **components)
    if chat:
        pipe.tokenizer = chat_text_processor(root / "tokenizer")
    return pipe


def flux2_latents(pipe, shape: torch.Size, **call) -> torch.Tensor:
    """A Flux.2 pipeline's latents [B, C, H, W] after its last step (its output un-normalises and unpatchifies
    them): its tokens [B, H W, C] as its step callback sees them."""
    last = {}

    def keep(pipe, step, t, tensors):
        last["latents"] = tensors["latents"]
        return tensors

    pipe(**call, output_type="latent", callback_on_step_end=keep)
    return last["latents"].transpose(1, 2).reshape(shape)


@pytest.mark.parametrize("kind", KINDS)
def test_a_dit_pipeline_samples_as_its_own_pipeline_and_distils_end_to_end(tmp_path, kind):
    """An AuraFlow, Chroma, Lumina 2, Z-Image, Flux.2 klein or dev, HiDream or SANA pipeline directory is a teacher
    over prompts: Euler with CFG through its denoiser on the pipeline's own sigmas reproduces its sampler (its text
    encoders and negative, its time convention and scale, Chroma's text mask and packing, Z-Image's unpadded
    prompts and its g = w - 1, Lumina 2's system prompt, Flux.2's patch latents, dev's chat template and guidance
    input, SANA's instruction); CFG defaults to its pipeline's scale (Flux.2 dev: none, its guidance input its
    pipeline's 4, which the student's file names), the student's flow grid to its scheduler's shift. The main job
    distils it with the full report and a grid decoded by its VAE; SFD-v conditions the time embeddings of all but
    Chroma and Lumina 2, which are refused."""
    from distill_core.schedules import cogview4_shift, flux2_shift, flux_shift
    from distill_core.students import StudentNet

    teacher = dit_pipeline_dir(tmp_path, kind)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\nan owl in the snow at night\n")
    channels, pixels, grid = LATENT.get(kind, (16, 2, 8))
    side = grid * pixels
    assert pixels == vae_scale(teacher) * (2 if kind.startswith("flux2") else 1)
    source = diffusers_source(teacher, prompts=prompts, resolution=side)
    assert (source.shape, source.guidance) == ((channels, grid, grid), DEFAULT_W[kind])
    shift = {"tokens": flux_shift(16), "flux2": flux2_shift(16, 50), "cogview4": cogview4_shift(16)}.get(
        SHIFT[kind], SHIFT[kind])
    assert source.denoiser.shift == pytest.approx(shift)
    pipe = stock_pipeline(teacher)
    if kind == "hidream":  # its pipeline scales every image to its default's area: that default, here
        pipe.default_sample_size = side // vae_scale(teacher)
    if kind == "sana":  # Euler steps in place of its DPM-Solver's, on flow times shifted as its own
        pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=3.0)
    x = torch.randn(1, *source.shape, generator=torch.Generator().manual_seed(0))
    w = DEFAULT_W[kind] if kind == "flux2-dev" else 2.0  # dev: no CFG, its guidance input at its pipeline's 4
    expected = pipeline_latents(pipe, "an owl in the snow at night", x, w, [0.9, 0.6, 0.3], side,
                                **PIPELINE_CALL.get(kind, {}), **SIGMAS_CALL.get(kind, {}))
    times = pipe.scheduler.sigmas.double()
    ours = teacher_steps(source, w, x, times, torch.tensor([1]))
    scale = float(expected.abs().max())  # float32 rounding, relative to the latents' size
    assert scale > 1
    torch.testing.assert_close(ours.double() / scale, expected.double() / scale, atol=1e-5, rtol=0)

    out = tmp_path / "run"
    assert main(["distill", "--teacher", str(teacher), "--prompts", str(prompts), "--resolution", str(side),
                 "--steps", "2", "--iters", "2", "--batch", "2", "--eval-samples", "4", "--reference-steps", "8",
                 "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["guidance"] == DEFAULT_W[kind] and any(r["method"] == "sfd" and r["nfe"] == 2 for r in report["rows"])
    card = read_card(out / "student.safetensors")
    assert card.get("embedded_guidance") == (4.0 if kind == "flux2-dev" else None)
    assert card["schedule"]["name"] == "flow" and card["schedule"]["shift"] == pytest.approx(source.denoiser.shift)
    assert (out / "grid.png").read_bytes()[25] == 2  # RGB: decoded by its VAE
    if kind in INJECTION:
        student = StudentNet(source.denoiser, step_conditioned=True)
        assert student.injection.endswith(INJECTION[kind])
        with torch.no_grad():
            torch.nn.init.normal_(student.step_embed.mlp[-1].weight)
            assert not torch.allclose(student(x, 2.0, torch.tensor([0]), nfe=2),
                                      student(x, 2.0, torch.tensor([0]), nfe=5))
    else:
        with pytest.raises(ValueError, match=f"cannot condition a {type(pipe.transformer).__name__} on a step count"):
            StudentNet(source.denoiser, step_conditioned=True)


def test_a_step_distilled_flux2_klein_samples_without_cfg_and_a_negative_it_cannot_take_is_not_exported(tmp_path,
                                                                                                      capsys):
    """A Flux.2 klein pipeline that names itself step-distilled (``is_distilled``) samples without CFG, as its
    pipeline does; a student of the base model guided against a negative prompt, which its pipeline cannot
    take, is refused export in one line."""
    from distill_core.config import DistillConfig
    from distill_core.train.run import train_student

    teacher = dit_pipeline_dir(tmp_path / "distilled", "flux2-klein", distilled=True)
    assert diffusers_source(teacher, prompts=["an owl"], resolution=16).guidance == 1.0
    base = dit_pipeline_dir(tmp_path / "base", "flux2-klein")
    source = diffusers_source(base, prompts=["an owl"], resolution=16, negative="blurry")
    cfg = DistillConfig(steps=2, iters=1, batch=2, checkpoint_every=0, out=str(tmp_path / "run"), student="lora",
                        guidance_mode="cfg")
    path = train_student(cfg, source, progress=False).path
    assert main(["export-diffusers", str(path), "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "against the negative 'blurry', and Flux2KleinPipeline guides against the empty prompt only" in err
    assert "Traceback" not in err and not (tmp_path / "x").exists()


def test_flux2_dev_takes_the_runs_guidance_as_its_input_and_refuses_what_it_cannot_read(tmp_path, capsys):
    """Flux.2 dev takes the run's --guidance as its guidance input (the student's file names it) and samples
    without CFG, so a negative prompt is refused in one line; a processor folder without the chat template its
    text encoder reads prompts through is refused by name."""
    teacher = dit_pipeline_dir(tmp_path, "flux2-dev")
    x = torch.randn(1, 64, 4, 4, generator=torch.Generator().manual_seed(0))
    own, given = (diffusers_source(teacher, prompts=["an owl"], resolution=16, guidance=g) for g in (None, 2.5))
    assert (own.card["embedded_guidance"], given.card["embedded_guidance"], given.guidance) == (4.0, 2.5, 1.0)
    with torch.no_grad():
        assert (own.denoiser(x, 2.0, torch.tensor([0])) - given.denoiser(x, 2.0, torch.tensor([0]))).abs().max() > 1e-4
    assert main(["distill", "--teacher", str(teacher), "--negative", "blurry", "--resolution", "16",
                 "--out", str(tmp_path / "run"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "Flux.2 dev samples without CFG, so a negative prompt has nothing to steer away from" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()
    (teacher / "tokenizer" / "chat_template.jinja").unlink()
    with pytest.raises(ValueError, match="the processor has no chat template"):
        diffusers_source(teacher, prompts=["an owl"], resolution=16)


def test_hidreams_experts_pass_gradients_and_train_mode_changes_nothing_it_computes(tmp_path):
    """HiDream routes its tokens to its experts without gradients in eval mode: wherever gradients are wanted
    (a LoRA student's frozen base is in eval mode) its experts take their training route, so their weights get
    gradients; its outputs are the same in eval mode, with gradients and in training mode (whose output layout
    the engine puts back in place)."""
    teacher = dit_pipeline_dir(tmp_path, "hidream")
    denoiser = diffusers_source(teacher, prompts=["a red fox", "an owl"], resolution=16).denoiser
    expert = next(m for m in denoiser.modules() if hasattr(m, "moe_infer")).experts[0].w1.weight
    expert.requires_grad_(True)
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma, prompts = torch.tensor([2.0, 0.5]), torch.tensor([0, 1])
    with torch.no_grad():
        plain = denoiser(x, sigma, prompts)
    with_grad = denoiser(x, sigma, prompts)
    with_grad.square().sum().backward()
    assert expert.grad is not None and expert.grad.abs().sum() > 0
    with torch.no_grad():
        trained = denoiser.train()(x, sigma, prompts)
    torch.testing.assert_close(with_grad.detach(), plain, atol=1e-6, rtol=0)
    torch.testing.assert_close(trained, plain, atol=1e-6, rtol=0)
    assert plain.abs().max() > 0.5
