"""The structural operations on batches: move, count, slice, join, compare."""

from collections import namedtuple

import pytest
import torch

from sharpscope.batches import (
    batches_equal,
    count_examples,
    join_batches,
    make_source,
    slice_batch,
    split_parts,
    to_device,
)
from sharpscope.errors import SharpscopeError

Pair = namedtuple("Pair", "inputs targets")


class Encoding(dict):
    """A mapping type of its own, as a tokenizer's BatchEncoding is."""


def nested(n=5):
    return {
        "pair": Pair(torch.arange(n * 2.0).view(n, 2), torch.arange(n)),
        "enc": Encoding(ids=torch.ones(n, 3, dtype=torch.long)),
        "list": [torch.zeros(n), "a tag", 7],
        "scale": torch.tensor(2.0),  # 0-d: not sliced
    }


def test_to_device_keeps_the_structure_and_its_types():
    moved = to_device(nested(), torch.device("cpu"))
    assert isinstance(moved["pair"], Pair) and isinstance(moved["enc"], Encoding)
    assert moved["list"][1:] == ["a tag", 7]
    assert batches_equal(moved, nested())


def test_count_slice_and_join_agree():
    batch = nested(5)
    assert count_examples(batch) == 5  # the first tensor, depth first: pair.inputs
    parts = [slice_batch(batch, a, b, 5) for a, b in ((0, 2), (2, 5))]
    assert [count_examples(p) for p in parts] == [2, 3]
    assert parts[1]["scale"].dim() == 0 and parts[1]["list"][1] == "a tag"
    joined = join_batches(parts)
    assert isinstance(joined["pair"], Pair)
    assert torch.equal(joined["pair"].inputs, batch["pair"].inputs)
    assert torch.equal(joined["enc"]["ids"], batch["enc"]["ids"])


def test_a_batch_without_an_example_dimension_cannot_be_counted():
    with pytest.raises(SharpscopeError, match="examples_in"):
        count_examples({"tag": "none"})
    with pytest.raises(SharpscopeError, match="examples_in"):
        count_examples(torch.tensor(1.0))


def test_batches_padded_to_different_lengths_cannot_be_joined():
    with pytest.raises(SharpscopeError, match="cannot be joined"):
        join_batches([{"ids": torch.ones(2, 3)}, {"ids": torch.ones(2, 4)}])


def test_equality_treats_nan_as_equal_and_sees_every_difference():
    a = torch.tensor([1.0, float("nan"), 3.0])
    assert batches_equal((a, 1), (a.clone(), 1))
    assert not batches_equal((a, 1), (a, 2))
    assert not batches_equal(a, torch.tensor([1.0, float("nan"), 4.0]))
    assert not batches_equal(a, a.double())
    assert not batches_equal({"x": a}, {"y": a})


@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_of_held_data_cover_every_example_once(world):
    """Contiguous ranges cut at the batch boundaries of one process: the shards' batches,
    rank after rank, are one process's examples in order."""
    x, y = torch.arange(11.0).view(11, 1), torch.arange(11)
    seen = []
    for rank in range(world):
        source = make_source((x, y), 4, count_examples, rank=rank, world=world)
        batches = list(source)
        assert source.examples == sum(len(b[1]) for b in batches)
        assert all(len(b[1]) <= 4 for b in batches)
        seen += [int(v) for b in batches for v in b[1]]
    assert seen == list(range(11))


def test_parts_of_tensors_lists_and_loaders_are_disjoint_and_cover_what_they_take():
    """split_parts: tensors cut into equal blocks of one seeded permutation (the
    remainder left out), a list of batches into blocks of its batches, a DataLoader dealt
    out batch by batch; parts of one form stay in that form and never share an example."""
    from torch.utils.data import DataLoader, TensorDataset

    x = torch.arange(11.0).reshape(11, 1)
    y = torch.arange(11)
    parts = split_parts((x, y), 3, seed=4)
    assert [len(p[1]) for p in parts] == [3, 3, 3]
    seen = [set(p[1].tolist()) for p in parts]
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    assert all(torch.equal(p[0].reshape(-1), p[1].float()) for p in parts)  # rows kept paired
    assert [p[1].tolist() for p in split_parts((x, y), 3, seed=4)] == [sorted(s) for s in seen]
    as_dict = split_parts({"x": x, "y": y}, 3, seed=4)
    assert [d["y"].tolist() for d in as_dict] == [p[1].tolist() for p in parts]
    batches = [(x[i : i + 2], y[i : i + 2]) for i in range(0, 10, 2)]  # 5 batches
    held = split_parts(batches, 2, seed=0)
    assert [len(p) for p in held] == [2, 2]
    ids = [id(b) for p in held for b in p]
    assert len(set(ids)) == 4 and set(ids) <= {id(b) for b in batches}
    loader = DataLoader(TensorDataset(x, y), batch_size=2)
    dealt = split_parts(loader, 2)
    assert [len(p) for p in dealt] == [3, 3]
    assert [b[1].tolist() for b in dealt[0]] == [[0, 1], [4, 5], [8, 9]]
    assert [b[1].tolist() for b in dealt[1]] == [[2, 3], [6, 7], [10]]
    assert [b[1].tolist() for b in dealt[1]] == [[2, 3], [6, 7], [10]]  # on every pass
    for bad, message in [
        ((x, y[:5]), "differ in their number of examples"),
        ((x[:2], y[:2]), "cannot be split into 3"),
        (iter(batches), "iterator"),
        (DataLoader(TensorDataset(x, y), batch_size=2, shuffle=True), "at random"),
    ]:
        with pytest.raises(SharpscopeError, match=message):
            split_parts(bad, 3)
