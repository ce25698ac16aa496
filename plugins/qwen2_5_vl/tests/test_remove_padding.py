"""Remove-padding end to end on the tiny Qwen2.5-VL: a packed row trains exactly like the padded batch.

With the ``per_token`` reduction the loss is a plain sum over target tokens divided by their
count, so the packed row (``cu_seqlens``, no padding) and the right-padded batch must give the
same loss and the same gradient for every parameter. (test_data_pipeline.py checks the logits of
a packed row against each sample alone, and the same gradient equality with images and video.)
"""

from __future__ import annotations

import pytest
import torch

import mmzoo
import mmzoo_kernels
from mmzoo.config import DataConfig
from mmzoo.data.collate import Sample, collate_packed, collate_padded
from mmzoo.loss import IGNORE_INDEX, LossReduction, batch_target_counts


def text_sample(length: int, vocab: int, gen: torch.Generator) -> Sample:
    ids = torch.randint(10, vocab, (length,), generator=gen)
    labels = ids.clone()
    labels[: length // 3] = IGNORE_INDEX  # a prompt without loss
    positions = torch.arange(length).expand(3, -1).clone()  # M-RoPE rows of text
    return Sample(input_ids=ids, labels=labels, position_ids=positions)


@pytest.fixture(autouse=True)
def _kernel_choices_reset():
    yield
    mmzoo_kernels.registry.reset()


def test_packed_and_padded_give_equal_per_token_loss_and_gradients():
    assert DataConfig().packing  # packed rows are the default training layout
    assert mmzoo_kernels.configure(device="cpu")["cross_entropy"] == "chunked"  # the default loss
    torch.manual_seed(0)
    model = mmzoo.build_model("qwen2_5_vl", "tiny").train()
    vocab = model.text_decoder.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    samples = [text_sample(n, min(vocab, 1000), gen) for n in (7, 12, 3, 9)]
    runs = []
    for batch in (collate_packed(samples), collate_padded(samples, pad_token_id=0)):
        tokens, count = batch_target_counts(batch)
        reduction = LossReduction("per_token", total_tokens=tokens, total_samples=count)
        model.zero_grad()
        out = model(**batch, loss_reduction=reduction, return_logits=False)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        runs.append((out.loss.detach(), grads, tokens))
    (loss_packed, grads_packed, n_packed), (loss_padded, grads_padded, n_padded) = runs
    assert n_packed == n_padded == sum(n - n // 3 for n in (7, 12, 3, 9))
    torch.testing.assert_close(loss_packed, loss_padded)
    assert grads_packed.keys() == grads_padded.keys() and len(grads_packed) > 10
    for name, grad in grads_packed.items():
        torch.testing.assert_close(grad, grads_padded[name], msg=lambda m, name=name: f"{name}: {m}")
    assert any(g.abs().sum() > 0 for g in grads_packed.values())
