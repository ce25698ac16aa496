"""The text decoder built from megatron-core's blocks (``model.text_backend: megatron``).

:class:`MegatronTextDecoder` has :class:`mmzoo.nn.TextDecoder`'s interface and parameter names:
megatron-core's ``LanguageModelEmbedding``, the ``TransformerLayer`` modules of its local layer spec (whose
names are the mm names: ``input_layernorm``, ``self_attention.linear_qkv``, ...) and a
``ColumnParallelLinear`` output layer. megatron-core is imported when one is built
(``pip install mmzoo[megatron]``).

In one process it sets up a gloo group of one and Megatron's model-parallel state of size 1.
Under ``torchrun`` Megatron's state splits the ranks like :class:`mmzoo.distributed.mesh.TrainMesh`
(tensor parallel over consecutive ranks) and its column/row-parallel layers hold each rank's
shard (:mod:`mmzoo.distributed.megatron_parallel`). Packed rows use a block-diagonal causal mask
through Megatron's ``DotProductAttention`` (its ``PackedSeqParams`` / THD path needs
TransformerEngine); rotary angles are computed per token from the position ids, so positions
restart in every sample.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmzoo.errors import MmzooError
from mmzoo.nn.decoder import DecoderConfig, TextDecoder
from mmzoo.nn.recompute import LayerStack

INSTALL_HINT = "model.text_backend=megatron needs megatron-core: pip install mmzoo[megatron]"


def _megatron() -> Any:
    """``megatron.core``, or a one-line error saying how to install it."""
    try:
        with warnings.catch_warnings():
            # Without TransformerEngine and Apex it uses its PyTorch fallbacks: what runs here.
            warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex) (and Apex )?(is|are) not")
            from megatron import core
    except ImportError as exc:
        raise MmzooError(f"{INSTALL_HINT} ({exc})") from exc
    return core


@contextlib.contextmanager
def cuda_calls_on_cpu(active: bool = True) -> Iterator[None]:
    """Point ``torch.cuda.current_device`` at the CPU while ``active``: megatron-core allocates its
    buffers (rotary frequencies, the attention scores' workspace) on the current CUDA device."""
    if not active:
        yield
        return
    saved = torch.cuda.current_device
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment,return-value]
    try:
        yield
    finally:
        torch.cuda.current_device = saved  # type: ignore[assignment]


def model_parallel(tp: int = 1) -> None:
    """Megatron's model-parallel state: tensor parallel over groups of ``tp`` consecutive ranks
    (the innermost dimension of :class:`~mmzoo.distributed.mesh.TrainMesh`), no pipeline.

    Without a process group of several ranks it runs in one process: a gloo group of one (a
    group left by another run, already closed, is replaced) and a state of size 1.
    """
    import torch.distributed as dist

    core = _megatron()
    state = core.parallel_state
    from megatron.core.tensor_parallel import random as mp_random

    if dist.is_initialized() and dist.get_world_size() > 1:
        if state.model_parallel_is_initialized() and state.get_tensor_model_parallel_world_size() != tp:
            state.destroy_model_parallel()
    else:
        if tp != 1:
            raise MmzooError(f"parallel.tp={tp} needs {tp} ranks: start them with torchrun")
        if not dist.is_initialized():
            if state.model_parallel_is_initialized():
                state.destroy_model_parallel()  # its groups belonged to a closed process group
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if not state.model_parallel_is_initialized():
        state.initialize_model_parallel(tp, 1)
    # Dropout is off, so the model-parallel RNG streams are never drawn from: a no-op tracker.
    mp_random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)


def transformer_config(config: DecoderConfig, tp: int = 1) -> Any:
    """Megatron's ``TransformerConfig`` for ``config`` split over ``tp`` ranks: GQA, SwiGLU,
    RMSNorm, no dropout, no fusions."""
    from megatron.core.transformer import TransformerConfig

    settings = dict(
        num_layers=config.num_layers,
        hidden_size=config.hidden_size,
        ffn_hidden_size=config.ffn_hidden_size,
        num_attention_heads=config.num_heads,
        num_query_groups=config.num_kv_heads,
        kv_channels=config.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=config.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=config.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        perform_initialization=False,  # weights come from mmzoo's init or a checkpoint
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        params_dtype=torch.float32,
        tensor_model_parallel_size=tp,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="full scope is deprecated")  # megatron-core's own default
        return TransformerConfig(**settings)


def packed_causal_mask(cu_seqlens: torch.Tensor, tokens: int) -> torch.Tensor:
    """``(1, 1, T, T)`` bool, True where attention is masked: causal within each sample of a packed
    row, nothing across samples."""
    index = torch.arange(tokens, device=cu_seqlens.device)
    sample = torch.repeat_interleave(
        torch.arange(len(cu_seqlens) - 1, device=cu_seqlens.device), cu_seqlens.diff()
    )
    allowed = (sample[:, None] == sample[None, :]) & (index[None, :] <= index[:, None])
    return ~allowed[None, None]


def _drop_extra_state(module: nn.Module, state: dict[str, Any], prefix: str, metadata: Any) -> None:
    """Megatron's linears add an empty ``_extra_state`` (for TransformerEngine checkpoints): drop it so
    the names are :class:`mmzoo.nn.TextDecoder`'s."""
    for key in [k for k in state if k.startswith(prefix) and k.endswith("_extra_state")]:
        del state[key]


class _Rotary(nn.Module):
    """Megatron's rotary angles ``(T, 1, 1, head_dim)`` for position ids ``(rows, T)``: its
    ``MultimodalRotaryEmbedding`` with ``mrope_section`` (3 rows), else its ``RotaryEmbedding``
    table read at each token's position."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        from megatron.core.models.common.embeddings.rotary_pos_embedding import (
            MultimodalRotaryEmbedding,
            RotaryEmbedding,
        )

        self.mrope_section = list(config.mrope_section) if config.mrope_section else None
        base: Any = config.rope_theta  # typed int in megatron-core; a float computes the same frequencies
        self.rope = (
            MultimodalRotaryEmbedding(config.head_dim, 1.0, rotary_base=base)
            if self.mrope_section
            else RotaryEmbedding(config.head_dim, 1.0, rotary_base=base, use_cpu_initialization=True)
        )

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        if self.mrope_section is not None:
            if position_ids.shape[0] != 3:
                raise ValueError(f"M-RoPE needs 3 position rows (t, h, w), got {position_ids.shape[0]}")
            emb = self.rope(position_ids[:, None], self.mrope_section)  # (T, 1, 1, D)
        else:
            positions = position_ids[0]
            table = self.rope(int(positions.max()) + 1)  # (P, 1, 1, D)
            emb = table[positions.to(table.device)]
        return emb.to(position_ids.device)


class MegatronTextDecoder(nn.Module):
    """:class:`mmzoo.nn.TextDecoder` built from megatron-core (``embedding.word_embeddings``,
    ``decoder.layers.N.*``, ``decoder.final_layernorm``, ``output_layer``; tied: no output layer).
    ``decoder`` is a :class:`~mmzoo.nn.recompute.LayerStack` of Megatron's ``TransformerLayer`` modules.

    ``forward(embeds (T, H), position_ids (rows, T), cu_seqlens)`` -> hidden ``(T, H)``; packed
    samples attend within themselves (a block-diagonal causal mask). With ``tp`` > 1 each rank
    holds its shards and the hidden states are the same on every rank (no sequence parallel:
    megatron-core's local layers refuse it without TransformerEngine). Parameters are left
    uninitialised (load a state dict: :func:`mmzoo.build.use_text_backend` copies the native
    decoder's). No KV cache: generation uses :class:`mmzoo.nn.TextDecoder` on the same weights.
    """

    split_when_built = True  # over the tensor-parallel ranks: mmzoo.distributed.parallelize skips it

    def __init__(self, config: DecoderConfig, tp: int = 1) -> None:
        super().__init__()
        model_parallel(tp)
        from megatron.core import tensor_parallel
        from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
        from megatron.core.transformer.transformer_block import TransformerBlock

        self.config, self.tp = config, tp
        mcore = transformer_config(config, tp)
        with cuda_calls_on_cpu(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Apex is not installed")  # torch's RMSNorm is used
            from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

            spec = get_gpt_layer_local_spec(normalization="RMSNorm")
            self.embedding = LanguageModelEmbedding(
                mcore, config.vocab_size, 0, position_embedding_type="rope"
            )
            block = TransformerBlock(mcore, spec, post_layer_norm=True)
            # Its layers and final norm in mmzoo's stack: the same names, and pipeline stages
            # (mmzoo.distributed.pipeline) take their share of it as of the native decoder's.
            self.decoder = LayerStack(list(block.layers), final_layernorm=block.final_layernorm)
            self.output_layer = (
                None
                if config.tie_word_embeddings
                else tensor_parallel.ColumnParallelLinear(
                    config.hidden_size,
                    config.vocab_size,
                    config=mcore,
                    init_method=mcore.init_method,
                    bias=False,
                    gather_output=False,
                )
            )
            self.rotary = _Rotary(config)
        self.register_state_dict_post_hook(_drop_extra_state)

    @classmethod
    def empty_like(cls, native: TextDecoder, tp: int = 1) -> MegatronTextDecoder:
        """A decoder of ``native``'s config split ``tp`` ways, on
        its device and dtype, weights not copied (on the meta device nothing is allocated)."""
        weight = native.output_weight
        with torch.device("meta") if weight.is_meta else contextlib.nullcontext():
            decoder = cls(native.config, tp)
        return decoder.to(device=weight.device, dtype=weight.dtype)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding.word_embeddings(input_ids)

    def forward(
        self, embeds: torch.Tensor, position_ids: torch.Tensor, cu_seqlens: torch.Tensor
    ) -> torch.Tensor:
        """Hidden states ``(T, H)`` after the final norm."""
        on_cpu = embeds.device.type == "cpu"
        if on_cpu:  # no advice on CUDA_DEVICE_MAX_CONNECTIONS (overlapping CUDA all-reduces)
            from megatron.core.tensor_parallel import layers

            layers.linear_with_grad_accumulation_and_async_allreduce.warned = True
        with cuda_calls_on_cpu(on_cpu):
            rotary = self.rotary(position_ids)
            mask = packed_causal_mask(cu_seqlens.to(embeds.device), embeds.shape[0])

            def layer(index: int, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
                return module(x, attention_mask=mask, rotary_pos_emb=rotary)[0]

            # (T, 1, H): Megatron's (sequence, batch, hidden)
            hidden = self.decoder.run(embeds[:, None], layer)
        return hidden[:, 0]

    @property
    def output_weight(self) -> torch.Tensor:
        """``(V, H)``: the output layer, or the embedding when tied."""
        layer = self.embedding.word_embeddings if self.output_layer is None else self.output_layer
        return layer.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.output_weight.t()
