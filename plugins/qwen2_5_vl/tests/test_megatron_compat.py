"""A converted tp=1 text-decoder shard loads into megatron-core's GPTModel with the same logits.

Needs ``mmzoo[megatron]`` (megatron-core 0.16.1); skipped without it. On a CPU-only torch,
megatron-core's ``torch.cuda`` device and RNG calls are redirected to the CPU and the causal
mask is passed explicitly (FACTS).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from tiny_hf import text

import mmzoo
from mmzoo.checkpoint import conversion as convert

megatron = pytest.importorskip(
    "megatron.core", reason="megatron-core is not installed (pip install mmzoo[megatron])"
)


@pytest.fixture
def megatron_on_cpu(monkeypatch, tmp_path):
    """A one-process gloo group, model parallel state, and torch.cuda calls pointed at the CPU."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as mp_random

    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    mp_random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)  # fork() is a no-op
    created = not dist.is_initialized()
    if created:
        store = tmp_path / "gloo_store"  # a file rendezvous: no port to collide with other runs
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    yield
    parallel_state.destroy_model_parallel()
    if created:
        dist.destroy_process_group()


def gpt_model(config):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from mmzoo.nn.megatron_decoder import transformer_config

    t = config.text
    mcore = transformer_config(t)
    return GPTModel(
        config=mcore,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=t.vocab_size,
        max_sequence_length=256,
        share_embeddings_and_output_weights=t.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(t.rope_theta),
    ).eval()


def test_gptmodel_loads_a_converted_text_decoder_shard(megatron_on_cpu, hf_dir, tmp_path):
    mm = convert.hf_to_mm(hf_dir, tmp_path / "mm", report=lambda line: None)
    ours = mmzoo.load_model(mm).eval()
    shard = load_file(mm / "release" / "mp_rank_00" / "model.safetensors")
    decoder = {k.removeprefix("text_decoder."): v for k, v in shard.items() if k.startswith("text_decoder.")}

    model = gpt_model(ours.config)
    missing, unexpected = model.load_state_dict(decoder, strict=False)
    assert not unexpected
    assert all(k.endswith("_extra_state") for k in missing), missing

    ids = torch.tensor([text(24, seed=3)])
    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    mask = torch.triu(
        torch.ones(1, 1, ids.shape[1], ids.shape[1], dtype=torch.bool), diagonal=1
    )  # True: masked
    with torch.no_grad():
        theirs = model(ids, positions, mask)  # (B, S, V)
        expected = ours(input_ids=ids).logits
    torch.testing.assert_close(theirs, expected, atol=1e-5, rtol=1e-4)
