"""Teacher nodes: the built-in teacher, any ComfyUI MODEL with prompt conditions, and the prompt list."""

from __future__ import annotations

from distill_core.builtin import DEFAULT_GUIDANCE
from distill_core.config import EDM_SIGMA_MIN, SD_SIGMA_MIN
from distill_core.prompts import DEFAULT_NEGATIVE, DEFAULT_PROMPTS, prompt_lines
from distill_core.sources import builtin_source, comfy_source

from .handles import TeacherHandle
from .spec import In, Out, node

TEACHER = Out("DISTILL_TEACHER", "teacher", "the teacher to distil, for Distill to N steps and Compare")
#: the time t from which Wan 2.2 14B's high-noise model denoises, in its text- and its image-to-video releases
TEXT_TO_VIDEO_BOUNDARY, IMAGE_TO_VIDEO_BOUNDARY = 0.875, 0.9



@node("DistillBuiltinTeacher", "Built-in teacher (digits)", "teachers",
      "The shipped 16x16 class-conditional digits teacher: distils anywhere in minutes, no checkpoint needed.",
      inputs=[In("guidance", "FLOAT", "classifier-free guidance scale w the teacher samples with", DEFAULT_GUIDANCE,
                 options={"min": 1.0, "max": 10.0, "step": 0.1})],
      outputs=[TEACHER])
class BuiltinTeacher:
    def run(self, guidance: float, unique_id=None):
        def build():
            source = builtin_source()
            source.guidance = guidance
            return source

        return (TeacherHandle("builtin", build, EDM_SIGMA_MIN, guidance),)


@node("DistillTeacherFromModel", "Teacher from MODEL", "teachers",
      "Any ComfyUI image or text-to-video model from Load Checkpoint or Load Diffusion Model with its prompts: "
      "SD1.x, SD2.x and SDXL (eps, v), and flow models (SD3 / 3.5, Flux, AuraFlow, Lumina 2, HiDream, Chroma, "
      "Qwen-Image, Wan). Each training trajectory uses one positive entry at random; the negative is CFG's other "
      "side. Flux dev takes guidance as an input: the guidance value is its FluxGuidance, and CFG stays 1. "
      "Video models distil on stills (length 1) or on clips of the length you sample with. Wan 2.2 14B: its "
      "high- and low-noise models together, as one teacher. Image-to-video (Wan, HunyuanVideo) and inpainting "
      "models distil on each prompt's image: give the prompts through Distill image-to-video list or the "
      "model's own node (WanImageToVideo, HunyuanImageToVideo, InpaintModelConditioning) at this width, height and "
      "length; Wan 2.2 5B and LTX-Video take theirs through start_latent. Editing models (Flux Kontext, "
      "Qwen-Image-Edit) distil on each prompt's reference images (Distill edit list, or ReferenceLatent / "
      "TextEncodeQwenImageEdit).",
      inputs=[
          In("model", "MODEL", "the teacher model, e.g. from Load Checkpoint (a ModelSampling node before it is "
             "respected: its shift sets the student's flow grid)"),
          In("positive", "CONDITIONING", "training prompts: each entry is one prompt (Distill prompt list, "
             "or CLIP Text Encode outputs combined with Conditioning (Combine)); for an image-to-video or "
             "inpainting model each with its image (WanImageToVideo's positive, several combined), for an editing "
             "model each with its reference images (Distill edit list)"),
          In("negative", "CONDITIONING", "the negative prompt (its first entry) for classifier-free guidance; as "
             "many entries as positive ones pair up in order, each prompt guided against its own (an editing "
             "model's negatives, each encoded with its prompt's image)"),
          In("width", "INT", "training image width in pixels (latents are width / 8; Wan 2.2 5B: / 16, "
             "HunyuanImage 2.1: / 32, Chroma Radiance: pixels; a size the latent does not divide is refused)", 512,
             options={"min": 64, "max": 2048, "step": 8}),
          In("height", "INT", "training image height in pixels", 512, options={"min": 64, "max": 2048, "step": 8}),
          In("guidance", "FLOAT", "CFG scale w the teacher uses; for guidance-distilled models (Flux dev) the "
             "guidance they take as input (as FluxGuidance: 3.5 is Flux dev's default), with CFG 1", 5.0,
             options={"min": 1.0, "max": 20.0, "step": 0.1}),
          In("length", "INT", "video frames of each training clip, for video models (Wan, HunyuanVideo, LTX-Video, "
             "Mochi, Cosmos): the length you will sample with (Wan 2.1: 81); 1 distils on still images. Clips cost "
             "memory and time in proportion to their latent frames, (length - 1) / 4 + 1 for Wan", 1,
             optional=True, options={"min": 1, "max": 1024, "step": 4}),
          In("low_noise_model", "MODEL", "Wan 2.2 14B: its low-noise model (model is then the high-noise one). The "
             "two are one teacher, switched at boundary as their two samplers hand over; the student is one LoRA "
             "per model, saved as <name>_high_noise and <name>_low_noise beside the student file", optional=True),
          In("boundary", "FLOAT", "with a low-noise model: the time t (ComfyUI's sigma) from which the high-noise "
             f"model denoises: {TEXT_TO_VIDEO_BOUNDARY} for Wan 2.2 text-to-video, {IMAGE_TO_VIDEO_BOUNDARY} for "
             "image-to-video", TEXT_TO_VIDEO_BOUNDARY, optional=True,
             options={"min": 0.01, "max": 0.95, "step": 0.005}),
          In("start_latent", "LATENT", "image-to-video on Wan 2.2 5B and LTX-Video: the LATENT with the start image "
             "(Wan22ImageToVideoLatent's with its start_image, LTXVImgToVideo's), made at this width, height and "
             "length; every training clip starts from it, as the sampler given that latent does. Several images: "
             "Distill image-to-video list's start_latent, or one such node each, their latents joined by "
             "Latent Batch, one per prompt in order (or one for all prompts)", optional=True),
      ],
      outputs=[TEACHER])
class TeacherFromModel:
    def run(self, model, positive, negative, width: int, height: int, guidance: float, length: int = 1,
            low_noise_model=None, boundary: float = TEXT_TO_VIDEO_BOUNDARY, start_latent=None, unique_id=None):
        from distill_core.denoisers.comfy import ComfyDenoiser, ComfyExperts, model_sampling, refuse_unsupported
        from distill_core.denoisers.comfy_conditioning import IMAGE_INPUT, teacher_inputs
        from distill_core.denoisers.comfy_family import latent_shape

        refuse_unsupported(model)  # this MODEL's own sampling, not the one its checkpoint's clones share
        sampling = model_sampling(model)
        shape = latent_shape(model.model, width, height, length)  # a bad size, length or latent is refused here
        experts = None
        if low_noise_model is not None:  # two experts of one release, refused here when they are not
            refuse_unsupported(low_noise_model)
            experts = (low_noise_model.model, model_sampling(low_noise_model), boundary)
            ComfyExperts(ComfyDenoiser(model.model, sampling), ComfyDenoiser(*experts[:2]), boundary)
        for name, conditioning in (("positive", positive), ("negative", negative)):
            if not isinstance(conditioning, list) or not conditioning:
                raise ValueError(f"{name} must be a non-empty CONDITIONING (from CLIP Text Encode or Distill "
                                 f"prompt list)")
        # prompts, images and start latents whose model inputs cannot be batched are refused here too
        inputs, cfg = teacher_inputs(model.model, positive, negative, shape, guidance, start_latent)
        if experts and IMAGE_INPUT in inputs and boundary == TEXT_TO_VIDEO_BOUNDARY:
            print(f"[comfyui-distill] these two models take an image (image-to-video), whose release hands over at "
                  f"t = {IMAGE_TO_VIDEO_BOUNDARY}, and boundary is text-to-video's {TEXT_TO_VIDEO_BOUNDARY}: set it "
                  f"to {IMAGE_TO_VIDEO_BOUNDARY} unless you mean {TEXT_TO_VIDEO_BOUNDARY}")

        def build():
            return comfy_source(model.model, positive, negative, width, height, guidance, sampling=sampling,
                                length=length, experts=experts, start=start_latent)

        return (TeacherHandle("comfyui", build, SD_SIGMA_MIN, cfg, model=model, low_model=low_noise_model),)


@node("DistillPromptList", "Distill prompt list", "teachers",
      "Encodes one prompt per line (and a negative prompt) with the model's CLIP into training conditions.",
      inputs=[
          In("clip", "CLIP", "the text encoder, e.g. from Load Checkpoint"),
          In("prompts", "STRING", "training prompts, one per line; a varied list ships as the default",
             DEFAULT_PROMPTS, options={"multiline": True}),
          In("negative", "STRING", "negative prompt used for classifier-free guidance", DEFAULT_NEGATIVE,
             options={"multiline": True}),
      ],
      outputs=[Out("CONDITIONING", "positive", "one entry per prompt line"),
               Out("CONDITIONING", "negative", "the encoded negative prompt")])
class PromptList:
    def run(self, clip, prompts: str, negative: str, unique_id=None):
        lines = prompt_lines(prompts)
        if not lines:
            raise ValueError("the prompt list is empty: write at least one prompt (one per line)")
        return [encode(clip, p) for p in lines], [encode(clip, negative)]


def encode(clip, text: str) -> list:
    """One CONDITIONING entry for ``text``, as CLIP Text Encode builds it."""
    tokens = clip.tokenize(text)
    return clip.encode_from_tokens_scheduled(tokens)[0]
