"""Training prompts of text-to-image teachers: the shipped default lists (of prompts, edits and motions) and prompt
files."""

from __future__ import annotations

from pathlib import Path

#: A varied default prompt list for prompt-conditioned teachers (subjects, styles, lighting, framing).
DEFAULT_PROMPTS = "\n".join([
    "a red fox curled up asleep in fresh snow, soft morning light",
    "portrait of an elderly fisherman with a weathered face, overcast day, 85mm photo",
    "a cosy reading nook with a window seat and rain outside, warm lamp light",
    "isometric illustration of a tiny floating island with a lighthouse",
    "a bowl of ramen with a soft-boiled egg, steam rising, top-down food photo",
    "watercolor painting of a mountain lake at dusk with pine trees",
    "a vintage red bicycle leaning against a blue door in a narrow street",
    "futuristic city skyline at night with neon signs reflected in wet streets",
    "macro photo of a dragonfly on a reed, shallow depth of field",
    "an astronaut tending a vegetable garden inside a glass dome on mars",
    "oil painting of a stormy sea with a small sailing boat",
    "a golden retriever puppy running through autumn leaves",
    "minimalist product photo of a ceramic coffee mug on linen",
    "ancient library with towering bookshelves and floating candles",
    "pixel art of a knight standing at the gate of a castle",
    "a desert canyon with layered red rock under a starry sky",
])
DEFAULT_NEGATIVE = "blurry, low quality, distorted, watermark, text"
#: A default list of edit instructions for editing models (Flux Kontext, Qwen-Image-Edit): edits that fit any image.
DEFAULT_EDITS = "\n".join([
    "make it a watercolor painting",
    "turn the scene into night with warm lights in the windows",
    "add falling snow",
    "change the season to autumn, with orange and red leaves",
    "make it a pencil sketch",
    "give it a neon cyberpunk look",
    "turn it into a photo of a clay model",
    "make the sky stormy and dramatic",
    "make it look like a vintage 1970s photograph",
    "render it as pixel art",
    "make it an oil painting in the style of impressionism",
    "turn it into a paper cut-out collage",
])
#: A default list of motion prompts for image-to-video models (Wan): motions that fit any start image.
DEFAULT_MOTIONS = "\n".join([
    "the camera slowly pushes in",
    "a gentle wind moves through the scene",
    "the camera pans slowly to the right",
    "the subject turns and looks at the camera",
    "the light shifts as clouds pass over",
    "the camera slowly orbits around the subject",
    "the scene comes alive with subtle natural motion",
    "handheld camera with slight movement, cinematic",
    "the camera pulls back to reveal the surroundings",
    "soft rain begins to fall",
    "time-lapse of the light changing from day to dusk",
    "the subject walks toward the camera",
])


def prompt_flag(prompts: str | Path | list[str]) -> str:
    """The option that gave ``prompts``: the prompts themselves (``--prompt``, a list) or a file (``--prompts``)."""
    return "--prompt" if isinstance(prompts, list) else "--prompts"


def prompt_lines(text: str) -> list[str]:
    """The non-empty lines of ``text``, stripped: one prompt (or instruction) per line."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_prompts(path: str | Path | list[str] | None, default: str = DEFAULT_PROMPTS) -> list[str]:
    """The prompts of a text file, one per non-empty line (or of a list of prompts); the shipped list ``default``
    (one per line) without either."""
    if not path:
        return default.splitlines()
    if isinstance(path, list):
        prompts = [prompt.strip() for prompt in path]
        if not all(prompts):
            raise ValueError("an empty prompt: give each prompt some text (the empty prompt is CFG's other side)")
        return prompts
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise FileNotFoundError(f"--prompts {path}: cannot read it ({e.strerror}); give a text file with one "
                                "prompt per line") from None
    prompts = prompt_lines(text)
    if not prompts:
        raise ValueError(f"--prompts {path} holds no prompt: write one prompt per line")
    return prompts
