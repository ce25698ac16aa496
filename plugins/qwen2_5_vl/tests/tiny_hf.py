"""A tiny random transformers Qwen2.5-VL and matching inputs, built in the tests (no downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmzoo.testing import ParityPair, parity_pair

VOCAB = 1000
IMAGE, VIDEO, V_START, V_END = 995, 996, 993, 994  # special ids remapped below the small vocab
SPREAD = 0.08  # weight std of the tiny model (mmzoo.testing.spread_weights_)


def hf_config():
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        vision_config=dict(
            depth=4,
            hidden_size=64,
            intermediate_size=96,
            num_heads=4,
            out_hidden_size=64,
            fullatt_block_indexes=[1, 3],
            window_size=112,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            tokens_per_second=2,
            hidden_act="silu",
        ),
        text_config=dict(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
        ),
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=V_START,
        vision_end_token_id=V_END,
        tie_word_embeddings=False,
    )


@pytest.fixture(scope="session")
def pair(tmp_path_factory) -> ParityPair:
    """transformers' tiny Qwen2.5-VL with spread weights, saved, and mmzoo's load of it."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    # At transformers' init a wrong part can hide inside the tolerance: spread every weight.
    directory = tmp_path_factory.mktemp("hf_tiny")
    return parity_pair(Qwen2_5_VLForConditionalGeneration, hf_config(), directory, std=SPREAD)


@pytest.fixture(scope="session")
def hf_model(pair):
    return pair.reference


@pytest.fixture(scope="session")
def hf_dir(pair):
    return pair.directory


def make_hf(tmp_path_factory, tied: bool, new_keys: bool = False) -> Path:
    """A tiny random HF checkpoint with every weight spread (tied or untied embeddings)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = hf_config()
    config.tie_word_embeddings = tied
    config.text_config.tie_word_embeddings = tied
    torch.manual_seed(1)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path_factory.mktemp("hf_tied" if tied else "hf_untied")
    model.save_pretrained(path)
    if new_keys:  # the in-memory layout of transformers >= 4.52: model.visual.*, model.language_model.*
        weights = load_file(path / "model.safetensors")
        renamed = {
            k.replace("visual.", "model.visual.", 1)
            if k.startswith("visual.")
            else k.replace("model.", "model.language_model.", 1)
            if k.startswith("model.")
            else k: v
            for k, v in weights.items()
        }
        save_file(renamed, path / "model.safetensors", metadata={"format": "pt"})
    return path


@pytest.fixture(scope="session")
def hf_untied(tmp_path_factory):
    return make_hf(tmp_path_factory, tied=False)


@pytest.fixture(scope="session")
def hf_tied(tmp_path_factory):
    return make_hf(tmp_path_factory, tied=True)


def media_run(token: int, grid: tuple[int, int, int]) -> list[int]:
    t, h, w = grid
    return [V_START] + [token] * (t * h * w // 4) + [V_END]


def text(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 900, (n,), generator=g).tolist()


def make_sample(images=(), videos=(), seconds=(), seed=0):
    """Text, then each image and each video followed by text: ids and pixel inputs."""
    parts: list = [text(5, seed)]
    for grid in images:
        parts += [("image", grid), text(3, seed + 1)]
    for grid in videos:
        parts += [("video", grid), text(4, seed + 2)]
    return make_sequence(parts, seconds, seed)


def make_sequence(parts, seconds=(), seed=0):
    """A batch of one row from ``parts`` in order: token lists (text) and ``(kind, grid)`` media.

    Pixel inputs are random, images' drawn before videos'; ``seconds`` is per video.
    """
    g = torch.Generator().manual_seed(seed + 100)
    ids: list[int] = []
    grids: dict[str, list] = {"image": [], "video": []}
    for part in parts:
        if isinstance(part, tuple):
            kind, grid = part
            ids += media_run(IMAGE if kind == "image" else VIDEO, grid)
            grids[kind].append(grid)
        else:
            ids += part
    batch = {"input_ids": torch.tensor([ids])}
    images, videos = grids["image"], grids["video"]
    if images:
        batch["pixel_values"] = torch.randn(sum(t * h * w for t, h, w in images), 1176, generator=g)
        batch["image_grid_thw"] = torch.tensor(images)
    if videos:
        batch["pixel_values_videos"] = torch.randn(sum(t * h * w for t, h, w in videos), 1176, generator=g)
        batch["video_grid_thw"] = torch.tensor(videos)
        batch["second_per_grid_ts"] = torch.tensor(seconds, dtype=torch.float32)
    return batch


def token_types(input_ids: torch.Tensor) -> torch.Tensor:
    return (input_ids == IMAGE).int() + 2 * (input_ids == VIDEO).int()


def left_pad(*samples: dict) -> tuple[dict, torch.Tensor]:
    """Samples from :func:`make_sample` left-padded into one batch (pad id 0), and the mask."""
    from mmzoo.data.collate import collate_left_padded

    rows = [
        {"input_ids": s["input_ids"][0], "media": {k: v for k, v in s.items() if k != "input_ids"}}
        for s in samples
    ]
    batch = collate_left_padded(rows, 0)
    return {"input_ids": batch["input_ids"], **batch["media"]}, batch["attention_mask"]


def tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files in ``path``."""
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def assert_bitwise(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Same names, dtypes and bits."""
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


HELLO, IM_END = 9707, 151645  # "Hello" and <|im_end|> in the real Qwen2.5 vocabulary


@pytest.fixture(scope="module")
def hello_dir(tmp_path_factory):
    """A tiny real-vocab checkpoint that answers "Hello" and then ends its turn.

    Every embedding gets a large value in dimension 0, so the last hidden state is positive
    there; only "Hello" (weight 1) and <|im_end|> (weight 1.8) read that dimension. With a
    repetition penalty of 2, <|im_end|> (already in the prompt) scores 0.9 against 1 for
    "Hello"; once "Hello" is generated it scores 0.5 and <|im_end|> wins.
    """
    import mmzoo
    from mmzoo.checkpoint.hf_export import save_hf

    spec = mmzoo.get_model("qwen2_5_vl")
    model = mmzoo.build_model("qwen2_5_vl", "tiny", text={"tie_word_embeddings": False})
    with torch.no_grad():
        model.text_decoder.embedding.word_embeddings.weight[:, 0] = 100.0
        out = model.text_decoder.output_layer.weight
        out.zero_()
        out[HELLO, 0], out[IM_END, 0] = 1.0, 1.8
    path = tmp_path_factory.mktemp("hello") / "hf"
    save_hf(model, path, tokenizer=spec.default_tokenizer())
    return path


def infer_args(path, *extra):
    return [
        "infer",
        "--model-dir",
        str(path),
        "--max-pixels",
        "12544",
        "--max-new-tokens",
        "5",
        "--repetition-penalty",
        "2",
        *extra,
    ]
