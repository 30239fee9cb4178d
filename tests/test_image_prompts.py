"""Distill edit list and Distill image-to-video list: images and lines paired and encoded as the model's stock nodes
encode one prompt, the stock nodes stood in (the real ones run in ``test_real_comfyui.py``)."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from distill_core.denoisers.base import OWN_UNCOND
from distill_core.reference_images import cover, read_image
from distill_nodes import host
from distill_nodes import image_prompts as edits
from tests.test_comfy_adapter import FakeClip, FakeEditModel, FakePatcher, LatentFormat, stand_in_nodes


class FakeVAE:
    """A VAE's node-facing ``encode``: IMAGE [1, H, W, 3] -> a 4-channel latent at an eighth of its size."""

    def __init__(self):
        self.encoded = 0

    def encode(self, pixels):
        self.encoded += 1
        x = pixels.movedim(-1, 1)
        return torch.nn.functional.avg_pool2d(torch.cat([x, x.mean(1, keepdim=True)], 1), 8)


class StockNodes:
    """ReferenceLatent and TextEncodeQwenImageEdit(Plus) as ComfyUI's give them: the reference latent appended to
    the entry's list; Qwen's text encoder reads the image (here: its mean added to the encoded text)."""

    def __init__(self):
        self.calls = []

    def __call__(self, node_id: str, **inputs) -> tuple:
        self.calls.append((node_id, sorted(inputs)))
        if node_id == "ReferenceLatent":
            return ([[c, {**o, "reference_latents": [*o.get("reference_latents", []), inputs["latent"]["samples"]]}]
                     for c, o in inputs["conditioning"]],)
        if node_id == "CLIPVisionEncode":
            return (("seen", float(inputs["image"].mean()), inputs["crop"]),)
        if node_id in ("Wan22ImageToVideoLatent", "LTXVImgToVideo"):  # the image's latent, a mask that keeps it
            image = inputs["start_image" if node_id == "Wan22ImageToVideoLatent" else "image"]
            mask = torch.zeros(1, 1) + inputs.get("strength", 0)  # here: the strength it was given
            latent = {"samples": inputs["vae"].encode(image), "noise_mask": mask}
            return (inputs.get("positive"), inputs.get("negative"), latent)
        if node_id == "TextEncodeHunyuanVideo_ImageToVideo":  # its text encoder reads the image's vision output
            cond, options = inputs["clip"].encode_from_tokens_scheduled(inputs["prompt"])[0]
            return ([[cond + inputs["clip_vision_output"][1], options]],)
        if node_id == "HunyuanImageToVideo":  # v1 (concat): the start frames' latent on every entry it is given;
            # v2 (replace): a guiding frame on every entry, the latent in the first frame of the LATENT it makes
            latent = inputs["vae"].encode(inputs["start_image"])
            if inputs["guidance_type"] == "v2 (replace)":
                image, made = {"guiding_frame_index": 0}, {"samples": latent, "noise_mask": torch.zeros(1, 1)}
            else:
                image, made = {"concat_latent_image": latent}, {"samples": torch.zeros_like(latent)}
            return [[c, {**o, **image, "how": inputs["guidance_type"]}] for c, o in inputs["positive"]], made
        if node_id == "WanImageToVideo":  # the start frames' latent and the vision output on both sides
            image = {"concat_latent_image": inputs["vae"].encode(inputs["start_image"]),
                     "size": (inputs["width"], inputs["height"], inputs["length"], inputs["batch_size"]),
                     **({"clip_vision_output": inputs["clip_vision_output"]} if "clip_vision_output" in inputs
                        else {})}
            return tuple([[c, {**o, **image}] for c, o in inputs[side]] for side in ("positive", "negative")) + ({},)
        image = inputs["image" if node_id == "TextEncodeQwenImageEdit" else "image1"]
        cond, options = inputs["clip"].encode_from_tokens_scheduled(inputs["prompt"])[0]
        latents = {"reference_latents": [inputs["vae"].encode(image)]} if "vae" in inputs else {}
        return ([[cond + image.mean(), {**options, **latents}]],)


def _save(path, height: int, width: int, seed: int) -> np.ndarray:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


WAN_14B, HUNYUAN, HUNYUAN_V2, WAN_5B, LTXV = edits.RELEASES


@pytest.fixture
def stock(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_INPUT_DIR", str(tmp_path / "input"))
    nodes = StockNodes()
    monkeypatch.setattr(host, "run_stock_node", nodes)
    return nodes


def test_cover_scales_without_stretching_and_crops_about_the_centre():
    """A 2:1 image fitted to a square keeps its middle half: a green centre between a red and a blue quarter."""
    image = torch.zeros(1, 8, 16, 3)
    image[:, :, :4, 0], image[:, :, 4:12, 1], image[:, :, 12:, 2] = 1, 1, 1
    square = cover(image, 8, 8)
    assert square.shape == (1, 8, 8, 3)
    assert square[..., 1].min() > 0.9 and square[..., 0].max() < 0.1 and square[..., 2].max() < 0.1
    assert cover(image, 4, 16).shape == (1, 4, 16, 3) and cover(image, 16, 4).shape == (1, 16, 4, 3)


def test_a_folder_and_connected_images_each_take_every_instruction_as_flux_kontext_encodes_an_edit(tmp_path,
                                                                                                   stock, monkeypatch):
    """Every instruction on every image: the connected image first, then the folder's files by name (other files
    left out), each fitted to the size; an instruction's text and an image's latent are encoded once, joined by
    ReferenceLatent; each negative carries its pair's image. Teacher from MODEL takes the lists, each prompt guided
    against the negative with its own image."""
    folder = tmp_path / "input" / "shots"
    folder.mkdir(parents=True)
    second = _save(folder / "b.png", 24, 40, 1)
    _save(folder / "a.jpg", 48, 24, 2)
    (folder / "notes.txt").write_text("not an image")
    (tmp_path / "input" / "empty").mkdir()
    assert edits.image_folders() == [edits.NO_FOLDER, "shots"]
    connected = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(0))
    clip, vae = FakeClip(), FakeVAE()
    out = edits.EditList().run(clip, vae, "Flux Kontext", "add snow\n\n make it night \n", "blurry", edits.EVERY_PAIR,
                               32, 16, images=connected, image_folder="shots")
    assert out["ui"]["text"] == ["3 images x 2 instructions -> 6 training prompts"]
    positive, negative, images = out["result"]
    assert images.shape == (3, 16, 32, 3) and len(positive) == len(negative) == 6
    torch.testing.assert_close(images[0:1], cover(connected, 16, 32))
    torch.testing.assert_close(images[1:2], cover(read_image(folder / "a.jpg"), 16, 32))  # by name: a before b
    torch.testing.assert_close(images[2:3], cover(torch.from_numpy(second)[None] / 255, 16, 32))
    assert vae.encoded == 3 and [c for c, _ in stock.calls] == ["ReferenceLatent"] * 9  # 6 edits, 3 negatives
    for k, (pos, neg) in enumerate(zip(positive, negative, strict=True)):
        image, text = divmod(k, 2)
        torch.testing.assert_close(pos[0], clip.encode_from_tokens_scheduled(["add snow", "make it night"][text])[0][0])
        torch.testing.assert_close(neg[0], clip.encode_from_tokens_scheduled("blurry")[0][0])
        (latent,) = pos[1]["reference_latents"]
        torch.testing.assert_close(latent, vae.encode(images[image:image + 1]))
        assert neg[1]["reference_latents"][0] is latent

    nodes = stand_in_nodes(tmp_path, monkeypatch)
    base = FakeEditModel()
    base.latent_format, base.process_latent_out = LatentFormat(), lambda x: x
    (handle,) = nodes["DistillTeacherFromModel"]().run(FakePatcher(base), positive, negative, 32, 16, 3.0)
    rows = handle.source().draw_cond(8, torch.Generator().manual_seed(0))
    blurry = clip.encode_from_tokens_scheduled("blurry")[0][0]
    assert "ref_latents" not in rows[OWN_UNCOND]  # each row's own images, on both sides of CFG
    torch.testing.assert_close(rows[OWN_UNCOND]["c_crossattn"], blurry.expand(8, -1, -1))
    assert len({tuple(r.flatten().tolist()) for r in rows["ref_latents"]["0"]}) > 1  # rows of several images


def test_qwen_image_edit_pairs_image_i_with_instruction_i_through_its_own_node(tmp_path, stock):
    """In order, image i with instruction i, each pair through TextEncodeQwenImageEdit (2509: the Plus node's first
    image), the negative encoded once per image with that image; the VAE encodes each image once, for its first
    text, whose latent the others take through ReferenceLatent."""
    images = torch.rand(2, 20, 30, 3, generator=torch.Generator().manual_seed(1))
    for editor, node_id, image_input in (("Qwen-Image-Edit", "TextEncodeQwenImageEdit", "image"),
                                         ("Qwen-Image-Edit 2509", "TextEncodeQwenImageEditPlus", "image1")):
        stock.calls.clear()
        vae = FakeVAE()
        positive, negative, fitted = edits.EditList().run(FakeClip(), vae, editor, "one\ntwo", "",
                                                          edits.IN_ORDER, 16, 16, images=images)["result"]
        with_vae, without = (node_id, sorted(["clip", "prompt", "vae", image_input])), \
            (node_id, sorted(["clip", "prompt", image_input]))
        assert stock.calls == [with_vae, without, ("ReferenceLatent", ["conditioning", "latent"])] * 2
        assert vae.encoded == 2
        assert len(positive) == len(negative) == 2 and fitted.shape == (2, 16, 16, 3)
        for k in range(2):
            reference = positive[k][1]["reference_latents"][0]
            torch.testing.assert_close(reference, FakeVAE().encode(fitted[k:k + 1]))
            torch.testing.assert_close(negative[k][1]["reference_latents"][0], reference)
            text = FakeClip().encode_from_tokens_scheduled(["one", "two"][k])[0][0]
            torch.testing.assert_close(positive[k][0], text + fitted[k:k + 1].mean())
        assert not torch.equal(negative[0][0], negative[1][0])  # the negative reads each image


def test_each_folder_image_takes_the_lines_of_its_own_text_file(tmp_path, stock):
    """Pairing by the .txt file beside each image (a.png: a.txt): each image with its own lines, the list input
    unused; an image without its file, and connected images (which have none), are refused in one line."""
    folder = tmp_path / "input" / "pairs"
    folder.mkdir(parents=True)
    _save(folder / "a.png", 16, 16, 1)
    _save(folder / "b.png", 16, 16, 2)
    (folder / "a.txt").write_text("remove the hat\n\nmake it night\n")
    (folder / "b.txt").write_text("add a red scarf")
    clip = FakeClip()
    out = edits.EditList().run(clip, FakeVAE(), "Flux Kontext", "", "", edits.BESIDE, 16, 16, image_folder="pairs")
    positive, _, images = out["result"]
    assert out["ui"]["text"] == ["2 images x 3 instructions -> 3 training prompts"] and len(images) == 2
    for entry, text, image in zip(positive, ["remove the hat", "make it night", "add a red scarf"], [0, 0, 1],
                                  strict=True):
        torch.testing.assert_close(entry[0], clip.encode_from_tokens_scheduled(text)[0][0])
        torch.testing.assert_close(entry[1]["reference_latents"][0], FakeVAE().encode(images[image:image + 1]))
    with pytest.raises(ValueError, match="connected images have none: use an image folder alone"):
        edits.EditList().run(clip, FakeVAE(), "Flux Kontext", "", "", edits.BESIDE, 16, 16,
                             images=torch.rand(1, 16, 16, 3), image_folder="pairs")
    seen = edits.EditList.IS_CHANGED(image_folder="pairs", instructions="")  # ComfyUI reads the folder again when
    assert edits.EditList.IS_CHANGED(image_folder="pairs") == seen  # a file of it changes, and only then
    (folder / "b.txt").unlink()
    assert edits.EditList.IS_CHANGED(image_folder="pairs") != seen
    assert edits.EditList.IS_CHANGED() == edits.NO_FOLDER == edits.ImageToVideoList.IS_CHANGED(image_folder="(none)")
    with pytest.raises(ValueError, match="b.png has no instructions beside it: write them in b.txt, one per line"):
        edits.EditList().run(clip, FakeVAE(), "Flux Kontext", "", "", edits.BESIDE, 16, 16, image_folder="pairs")


def test_edit_lists_that_cannot_pair_or_find_their_images_are_refused_in_one_line(tmp_path, stock):
    node, image = edits.EditList(), torch.rand(1, 16, 16, 3)
    run = lambda text="a\nb", pairing=edits.EVERY_PAIR, images=image, folder=edits.NO_FOLDER: node.run(  # noqa: E731
        FakeClip(), FakeVAE(), "Flux Kontext", text, "", pairing, 16, 16, images=images, image_folder=folder)
    with pytest.raises(ValueError, match="the instruction list is empty"):
        run(text=" \n\n")
    with pytest.raises(ValueError, match="needs as many images as lines, got 2 images and 3 lines"):
        run(text="a\nb\nc", pairing=edits.IN_ORDER, images=torch.rand(2, 16, 16, 3))
    assert len(run(text="a\nb\nc", pairing=edits.IN_ORDER)["result"][0]) == 3  # one image: every instruction on it
    with pytest.raises(ValueError, match="pairing 'in order' is none of 'every line on every image', 'image i with"):
        run(pairing="in order")
    with pytest.raises(ValueError, match="no images: connect images"):
        run(images=None)
    (tmp_path / "input" / "empty").mkdir(parents=True)
    with pytest.raises(ValueError, match="the image folder 'empty' holds no images"):
        run(folder="empty")
    with pytest.raises(ValueError, match="is not allowed"):
        run(folder="../outside")
    (tmp_path / "input" / "broken").mkdir()
    (tmp_path / "input" / "broken" / "x.png").write_text("not a png")
    with pytest.raises(ValueError, match=r"x.png is not an image this reads .*remove it from its folder"):
        run(folder="broken")


def test_wan_image_to_video_prompts_take_each_start_image_through_wanimagetovideo_once(tmp_path, stock):
    """Every prompt on every start image: WanImageToVideo once per image on all its prompts and the negative (its
    start frames encoded once), at the list's size and length, with CLIPVisionEncode's reading of the image where a
    CLIP vision model is connected (Wan 2.1) and none without (Wan 2.2)."""
    images = torch.rand(2, 30, 40, 3, generator=torch.Generator().manual_seed(2))
    clip = FakeClip()
    for clip_vision in ("vision model", None):
        stock.calls.clear()
        vae = FakeVAE()
        out = edits.ImageToVideoList().run(clip, vae, WAN_14B, "pan left\nzoom in\nrain", "static", 9,
                                           edits.EVERY_PAIR, 32, 16, images=images, clip_vision=clip_vision)
        positive, negative, fitted, start = out["result"]
        assert start is None
        assert out["ui"]["text"] == ["2 images x 3 prompts -> 6 training prompts"] and fitted.shape == (2, 16, 32, 3)
        per_image = ["CLIPVisionEncode", "WanImageToVideo"] if clip_vision else ["WanImageToVideo"]
        assert [c for c, _ in stock.calls] == per_image * 2
        assert vae.encoded == 2 and len(positive) == len(negative) == 6
        for k, (pos, neg) in enumerate(zip(positive, negative, strict=True)):
            image, text = divmod(k, 3)
            prompt = ["pan left", "zoom in", "rain"][text]
            torch.testing.assert_close(pos[0], clip.encode_from_tokens_scheduled(prompt)[0][0])
            torch.testing.assert_close(neg[0], clip.encode_from_tokens_scheduled("static")[0][0])
            assert pos[1]["size"] == (32, 16, 9, 1) and neg[1]["concat_latent_image"] is pos[1]["concat_latent_image"]
            torch.testing.assert_close(pos[1]["concat_latent_image"], FakeVAE().encode(fitted[image:image + 1]))
            assert pos[1].get("clip_vision_output") == (("seen", float(fitted[image].mean()), "none") if clip_vision
                                                        else None)


def test_wan_22_5b_prompts_start_from_each_images_latent_one_per_prompt(tmp_path, stock):
    """Wan 2.2 5B keeps the start image in the clip's latent: Wan22ImageToVideoLatent once per image, its LATENT
    repeated for each of the image's prompts, in prompt order (Teacher from MODEL's start_latent: one per prompt), and
    the prompts as CLIP Text Encode encodes them; a CLIP vision model is refused."""
    images = torch.rand(2, 30, 40, 3, generator=torch.Generator().manual_seed(3))
    vae = FakeVAE()
    positive, negative, fitted, start = edits.ImageToVideoList().run(
        FakeClip(), vae, WAN_5B, "pan left\nzoom in", "static", 9, edits.IN_ORDER, 32, 16, images=images)["result"]
    assert [c for c, _ in stock.calls] == ["Wan22ImageToVideoLatent"] * 2 and vae.encoded == 2
    assert len(positive) == len(negative) == 2 and start["samples"].shape == (2, 4, 2, 4)
    for k in range(2):
        torch.testing.assert_close(start["samples"][k:k + 1], FakeVAE().encode(fitted[k:k + 1]))
        assert "concat_latent_image" not in positive[k][1]
    torch.testing.assert_close(start["noise_mask"], torch.zeros(2, 1))
    with pytest.raises(ValueError, match="Wan22ImageToVideoLatent reads no CLIP vision features: disconnect"):
        edits.ImageToVideoList().run(FakeClip(), vae, WAN_5B, "a", "", 9, edits.IN_ORDER, 32, 16, images=images,
                                     clip_vision="vision model")
    stock.calls.clear()  # LTX-Video: LTXVImgToVideo at strength 1, its image input "image"
    *_, start = edits.ImageToVideoList().run(FakeClip(), vae, LTXV, "a", "", 9, edits.IN_ORDER, 32, 16,
                                             images=images)["result"]
    assert stock.calls == [("LTXVImgToVideo", sorted(["vae", "image", "width", "height", "length", "batch_size",
                                                      "positive", "negative", "strength"]))] * 2
    assert start["samples"].shape == (2, 4, 2, 4) and float(start["noise_mask"].max()) == 1.0


def test_hunyuan_video_prompts_read_each_image_through_the_text_encoder_and_carry_its_start_frames(tmp_path, stock):
    """HunyuanVideo image-to-video: CLIPVisionEncode once per image, each prompt and the negative through
    TextEncodeHunyuanVideo_ImageToVideo with that reading, then HunyuanImageToVideo (v1, concat) once per image on
    all of them, the negative given as its last entry; without a CLIP vision model the list is refused."""
    images = torch.rand(2, 16, 16, 3, generator=torch.Generator().manual_seed(4))
    clip, vae = FakeClip(), FakeVAE()
    positive, negative, fitted, start = edits.ImageToVideoList().run(
        clip, vae, HUNYUAN, "pan left\nzoom in", "static", 9, edits.EVERY_PAIR, 16, 16, images=images,
        clip_vision="vision model")["result"]
    per_image = ["CLIPVisionEncode", *["TextEncodeHunyuanVideo_ImageToVideo"] * 3, "HunyuanImageToVideo"]
    assert [c for c, _ in stock.calls] == per_image * 2 and vae.encoded == 2 and start is None
    for k, (pos, neg) in enumerate(zip(positive, negative, strict=True)):
        image, text = divmod(k, 2)
        seen = float(fitted[image].mean())
        expected = clip.encode_from_tokens_scheduled(["pan left", "zoom in"][text])[0][0] + seen
        torch.testing.assert_close(pos[0], expected)
        torch.testing.assert_close(neg[0], clip.encode_from_tokens_scheduled("static")[0][0] + seen)
        assert pos[1]["how"] == neg[1]["how"] == "v1 (concat)"
        torch.testing.assert_close(neg[1]["concat_latent_image"], FakeVAE().encode(fitted[image:image + 1]))
    with pytest.raises(ValueError, match="HunyuanVideo image-to-video reads the image through its text encoder"):
        edits.ImageToVideoList().run(clip, vae, HUNYUAN, "a", "", 9, edits.EVERY_PAIR, 16, 16, images=images)


def test_hunyuan_video_v2_prompts_guide_from_the_start_latent_of_each_image(tmp_path, stock):
    """HunyuanVideo v2 (replace): the same encoding with HunyuanImageToVideo in v2, every entry (the negatives too)
    with its guiding frame, and each prompt's start latent, its image's, in order, for Teacher from MODEL."""
    images = torch.rand(2, 16, 16, 3, generator=torch.Generator().manual_seed(4))
    positive, negative, fitted, start = edits.ImageToVideoList().run(
        FakeClip(), FakeVAE(), HUNYUAN_V2, "pan left\nzoom in", "static", 9, edits.EVERY_PAIR, 16, 16, images=images,
        clip_vision="vision model")["result"]
    assert [c for c, _ in stock.calls].count("HunyuanImageToVideo") == 2 and len(positive) == len(negative) == 4
    assert all(e[1]["how"] == "v2 (replace)" and e[1]["guiding_frame_index"] == 0 for e in positive + negative)
    assert start["samples"].shape[0] == 4 and start["noise_mask"].shape[0] == 4
    for k in range(4):  # prompts 0 and 1 from the first image, 2 and 3 from the second
        torch.testing.assert_close(start["samples"][k:k + 1], FakeVAE().encode(fitted[k // 2:k // 2 + 1]))


class ClassicNode:
    FUNCTION = "go"

    def go(self, value):
        return (value + 1,)


class V3Node:
    @classmethod
    def define_schema(cls):
        return None

    @classmethod
    def execute(cls, value):
        return types.SimpleNamespace(result=(value * 2, "second"))


def test_stock_nodes_run_as_comfyui_runs_them_and_a_missing_one_asks_for_an_update(monkeypatch):
    monkeypatch.setitem(sys.modules, "nodes", types.SimpleNamespace(NODE_CLASS_MAPPINGS={
        "ClassicNode": ClassicNode, "V3Node": V3Node}))
    assert host.run_stock_node("ClassicNode", value=1) == (2,)
    assert host.run_stock_node("V3Node", value=3) == (6, "second")
    with pytest.raises(ValueError, match="this ComfyUI has no TextEncodeQwenImageEdit node, which this needs: update"):
        host.run_stock_node("TextEncodeQwenImageEdit", prompt="x")
