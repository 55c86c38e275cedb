"""CLIP loading: open_clip names and tags, folders, and the templates and preprocessing a folder declares."""

import json
from pathlib import Path

import pytest
import torch
from evaluation_helpers import TINY_CLIP_CONFIG, save_tiny_clip, tiny_clip_model

from erasure.evaluation import ClipLoadError, load_clip, parse_clip_spec

REPO_CLIP = Path(__file__).resolve().parents[2] / "checkpoints" / "toyworld-clip"


def test_parse_clip_spec(tmp_path):
    assert parse_clip_spec("ViT-H-14:laion2b_s32b_b79k") == ("ViT-H-14", "laion2b_s32b_b79k")
    assert parse_clip_spec("ViT-B-32") == ("ViT-B-32", None)
    assert parse_clip_spec(f"local-dir:{tmp_path}") == (f"local-dir:{tmp_path}", None)
    assert parse_clip_spec(str(tmp_path)) == (str(tmp_path), None)


def test_unknown_clip_name_says_how_to_list_names():
    with pytest.raises(ClipLoadError, match=r"Unknown CLIP model 'ViT-Q-99'.*list_models"):
        load_clip("ViT-Q-99", "openai")


def test_openai_weights_need_the_quickgelu_name():
    with pytest.raises(ClipLoadError, match="use 'ViT-L-14-quickgelu:openai'"):
        load_clip("ViT-L-14", "openai")  # fails before any download


def test_unknown_tag_lists_the_known_ones():
    with pytest.raises(ClipLoadError, match=r"no pretrained tag 'nope'; its tags: .*laion2b_s32b_b79k"):
        load_clip("ViT-H-14", "nope")


def test_clip_folder_needs_safetensors_weights(tmp_path):
    folder = save_tiny_clip(tmp_path / "clip")
    (folder / "open_clip_model.safetensors").rename(folder / "open_clip_pytorch_model.bin")
    with pytest.raises(ClipLoadError, match="no .safetensors weights.*pickles"):
        load_clip(str(folder))


def test_local_dir_spec_loads_the_saved_weights(tmp_path):
    folder = save_tiny_clip(tmp_path / "clip", seed=5)
    model, _, _ = load_clip(f"local-dir:{folder}")
    from safetensors.torch import load_file

    saved = load_file(str(folder / "open_clip_model.safetensors"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())


def test_toy_clip_gets_the_toy_caption_templates(tmp_path):
    from erasure.cli import _default_clip
    from erasure.evaluation import DEFAULT_CLIP, DEFAULT_TEMPLATES, default_templates
    from erasure.toyworld.captions import TEMPLATES
    from erasure.toyworld.models import build_clip, save_clip

    toy_templates = default_templates(str(REPO_CLIP))  # declared by the shipped folder's erasure_clip.json
    assert toy_templates == tuple(t.replace("{x}", "{}") for t in TEMPLATES)
    toy = tmp_path / "toyworld-clip"
    save_clip(build_clip()[0], toy)  # the trainer's saver writes the same declaration
    assert default_templates(str(toy)) == toy_templates == default_templates(f"local-dir:{toy}")
    assert default_templates("ViT-L-14-quickgelu") == DEFAULT_TEMPLATES
    assert _default_clip(str(tmp_path / "toyworld-sd")) == str(toy)  # the toy CLIP beside the toy model
    assert _default_clip("CompVis/stable-diffusion-v1-4") == DEFAULT_CLIP


# --------------------------------------------------------------------------------------------------------------
# erasure_clip.json: a folder declares its own templates and preprocessing, read generically
# --------------------------------------------------------------------------------------------------------------


def pixels_of(preprocess):
    from PIL import Image

    return preprocess(Image.new("RGB", (32, 32), (255, 0, 0)))


def test_a_folder_without_a_card_gets_photo_templates_and_open_clips_preprocessing(tmp_path):
    from erasure.evaluation import DEFAULT_TEMPLATES, clip_card, default_templates

    folder = save_tiny_clip(tmp_path / "clip")
    assert clip_card(str(folder)) is None and default_templates(str(folder)) == DEFAULT_TEMPLATES
    _, preprocess, _ = load_clip(str(folder))
    assert pixels_of(preprocess)[0].max().item() == pytest.approx(1.0)  # (1 - 0.5) / 0.5: its preprocess_cfg


def test_a_cards_templates_and_preprocessing_are_used(tmp_path):
    from erasure.evaluation import clip_card, default_templates
    from erasure.evaluation.clip import write_clip_card

    folder = save_tiny_clip(tmp_path / "clip")
    templates = ("a sketch of {}", "{}, drawn")
    write_clip_card(folder, templates, {"mean": [0.25, 0.25, 0.25], "std": [0.25, 0.25, 0.25]})
    assert default_templates(str(folder)) == templates == default_templates(f"local-dir:{folder}")
    assert clip_card(str(folder)).preprocess == {"mean": [0.25] * 3, "std": [0.25] * 3}
    _, preprocess, _ = load_clip(str(folder))
    assert pixels_of(preprocess)[0].max().item() == pytest.approx(3.0)  # (1 - 0.25) / 0.25: the card's
    assert pixels_of(preprocess)[1].max().item() == pytest.approx(-1.0)


def test_an_architecture_json_folder_takes_its_preprocessing_from_the_card(tmp_path):
    from safetensors.torch import save_file

    from erasure.evaluation.clip import write_clip_card

    folder = tmp_path / "arch"
    folder.mkdir()
    model = tiny_clip_model(seed=3)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "weights.safetensors"))
    (folder / "erasure-tiny-arch.json").write_text(json.dumps(TINY_CLIP_CONFIG))
    _, plain, _ = load_clip(str(folder))
    write_clip_card(folder, ("{}",), {"mean": [0.5] * 3, "std": [0.5] * 3})
    loaded, preprocess, _ = load_clip(str(folder))
    assert pixels_of(preprocess)[0].max().item() == pytest.approx(1.0)
    assert pixels_of(plain)[0].max().item() != pytest.approx(1.0)  # open_clip's OpenAI statistics otherwise
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_a_bad_card_is_a_clear_error(tmp_path):
    from erasure.evaluation import default_templates

    folder = save_tiny_clip(tmp_path / "clip")
    (folder / "erasure_clip.json").write_text(json.dumps({"templates": ["no placeholder"]}))
    with pytest.raises(ClipLoadError, match="one '\\{\\}' each"):
        default_templates(str(folder))
    (folder / "erasure_clip.json").write_text("{")
    with pytest.raises(ClipLoadError, match="not valid JSON"):
        load_clip(str(folder))


def test_the_shipped_toy_clip_keeps_its_preprocessing():
    _, preprocess, _ = load_clip(str(REPO_CLIP))
    pixels = pixels_of(preprocess)
    assert pixels.shape == (3, 64, 64)
    assert pixels[0].max().item() == pytest.approx(1.0) and pixels[1].min().item() == pytest.approx(-1.0)


def test_weights_that_cannot_be_fetched_are_one_line_naming_the_tag(monkeypatch):
    import open_clip

    from erasure.evaluation import ClipLoadError, load_clip

    def offline(*args, **kwargs):
        raise RuntimeError("Failed to download weights for tag ...: a paragraph of hub text")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", offline)
    with pytest.raises(ClipLoadError) as error:
        load_clip("ViT-B-32", "laion2b_s34b_b79k")
    message = str(error.value)
    assert "ViT-B-32:laion2b_s34b_b79k" in message and "--clip DIR" in message and "\n" not in message
