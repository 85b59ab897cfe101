"""Hugging Face transformers built from tiny configs (no download), measured through the
batch_loss hook with the model's own loss: ``lambda m, b: m(**b).loss``.

Both models attend through scaled_dot_product_attention (transformers' default "sdpa"),
whose fused kernels have no double backward: the Hessian numbers below only exist
because second-order passes run under the math kernel.
"""

from __future__ import annotations

import math

import pytest
import torch

import sharpscope as ss
from sharpscope.objective import Objective

transformers = pytest.importorskip("transformers")


def batch_loss(model, batch):
    return model(**batch).loss


def gpt2():
    config = transformers.GPT2Config(
        n_embd=8, n_layer=1, n_head=2, vocab_size=16, n_positions=8, eos_token_id=0, bos_token_id=0
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(16, (12, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    data = [
        {"input_ids": ids[i : i + 4], "attention_mask": mask[i : i + 4], "labels": ids[i : i + 4]}
        for i in range(0, 12, 4)
    ]
    return model, data


def bert():
    config = transformers.BertConfig(
        vocab_size=16,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=8,
        num_labels=3,
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(16, (12, 8), generator=g)
    encoding = transformers.BatchEncoding(
        {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": torch.randint(3, (12,), generator=g),
        }
    )
    return model, encoding  # the whole set as one encoding, cut into batches of 4


@pytest.mark.parametrize("build", [gpt2, bert], ids=["gpt2", "bert"])
def test_a_transformer_through_every_analyzer(build):
    model, data = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    training = model.training
    options = {"batch_loss": batch_loss, "batch_size": 4}
    obj = Objective(model, data, **options)
    assert obj.n_examples == 12
    # L is the example-weighted mean of the model's own batch losses.
    batches = (
        data
        if isinstance(data, list)
        else [{k: v[i : i + 4] for k, v in data.items()} for i in range(0, 12, 4)]
    )
    with torch.no_grad():
        model.eval()
        direct = sum(model(**b).loss.item() for b in batches) / len(batches)
        model.train(training)
    assert obj.value() == pytest.approx(direct, rel=1e-6)

    assert ss.sharpness(model, data, rho=0.05, steps=3, **options).value >= 0
    top = ss.hessian_eigenvalues(model, data, k=2, return_eigenvectors=True, **options)
    for value, vector in zip(top.eigenvalues, top.eigenvectors, strict=True):
        residual = obj.hvp(vector) - value * vector.to(obj.dtype)
        assert residual.norm().item() <= 1e-3 * abs(value)  # a true eigenpair of H
    trace = ss.hessian_trace(model, data, samples=4, **options)
    assert math.isfinite(trace.value) and trace.stderr > 0 and trace.samples == 4
    surface = ss.landscape(model, data, dim=2, points=3, **options)
    assert surface.loss[1, 1] == pytest.approx(obj.value(), rel=1e-6)
    assert surface.settings["loss_function"].startswith("batch_loss")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training == training
