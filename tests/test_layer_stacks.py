"""Layer stacks come from the family's weight mapping, whatever it names them: each pipeline stage's
layer counts and the split of an mm checkpoint read without metadata."""

from __future__ import annotations

import pytest

import mmzoo
from mmzoo.convert.mapping import COLUMN, GATE_UP, GLU, QKV, Rule, WeightMapping
from mmzoo.convert.parallel import CANONICAL, FUSED, ParallelLayout, depths

# Stacks named as InternVL's are in MindSpeed-MM (the ViT's under ``encoder.encoder.layers``).
VISION = "image_encoder.encoder.encoder.layers.{i}."
TEXT = "text_decoder.decoder.layers.{i}."
HF_TEXT = "language_model.model.layers.{i}."


def _mapping(vision: int = 3, text: int = 4, vision_group: str = "vision") -> WeightMapping:
    qkv = tuple(f"{HF_TEXT}self_attn.{p}_proj.weight" for p in "qkv")
    gate_up = (f"{HF_TEXT}mlp.gate_proj.weight", f"{HF_TEXT}mlp.up_proj.weight")
    table = [
        Rule(
            "image_encoder.encoder.embeddings.patch_embedding.weight",
            ("vision.patch.weight",),
            place="vision:first",
        ),
        Rule(
            VISION + "attn.qkv.weight", ("vision.layers.{i}.attn.qkv.weight",), layers=vision_group, tp=COLUMN
        ),
        Rule(VISION + "norm1.weight", ("vision.layers.{i}.norm1.weight",), layers=vision_group),
        Rule("image_encoder.projector.linear_fc1.weight", ("mlp1.1.weight",), tp=COLUMN, place="vision:last"),
        Rule("text_decoder.embedding.word_embeddings.weight", ("embed.weight",), tp=COLUMN),
        Rule(TEXT + "self_attention.linear_qkv.weight", qkv, op=QKV(4, 2, 8), layers="text", tp=COLUMN),
        Rule(TEXT + "mlp.linear_fc1.weight", gate_up, op=GATE_UP, layers="text", tp=GLU),
        Rule("text_decoder.output_layer.weight", ("lm_head.weight",), tp=COLUMN, place="last"),
    ]
    return WeightMapping.expand(table, {vision_group: vision, "text": text})


@pytest.mark.parametrize("layout", [FUSED, CANONICAL])
@pytest.mark.parametrize("vit, llm", [((3,), (4,)), ((3, 0), (1, 3)), ((2, 1, 0), (0, 2, 2))])
def test_each_stage_s_layers_are_counted_through_the_mapping(layout, vit, llm):
    mapping = _mapping()
    assert depths(mapping) == {"vision": 3, "text": 4}
    assert mapping.layer_prefixes() == {"vision": VISION[:-4], "text": TEXT[:-4]}
    parallel = ParallelLayout(1, vit, llm, layout)
    parallel.check(depths(mapping))
    for stage in range(parallel.pp):
        held = mapping.layers_held(e.name for e in parallel.stage_entries(mapping, stage))
        assert (held["vision"], held["text"]) == (vit[stage], llm[stage])


def test_a_layer_group_no_layout_places_is_an_error():
    with pytest.raises(
        mmzoo.MmzooError, match="layer group.s. audio; mm checkpoints place only vision and text"
    ):
        depths(_mapping(vision_group="audio"))


def test_a_layer_group_over_two_stacks_is_an_error():
    mapping = _mapping()
    other = Rule("image_encoder.other.layers.{i}.w", ("other.{i}.w",), layers="vision")
    mapping = WeightMapping([*mapping.rules, *WeightMapping.expand([other], {"vision": 1}).rules])
    with pytest.raises(mmzoo.MmzooError, match="layer group 'vision' spans two stacks"):
        mapping.layer_prefixes()
