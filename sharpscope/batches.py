"""Batches of any structure, and the data an objective passes over.

A *batch* is whatever a user's data loader yields: a tensor, a tuple or list such as
``(inputs, targets)``, a dict such as ``{"input_ids": ..., "attention_mask": ...,
"labels": ...}``, a Hugging Face ``BatchEncoding``, or nestings of these. sharpscope
never looks inside a batch beyond three structural operations: moving its tensors to a
device, counting its examples (the first dimension of its first tensor, unless the user
says otherwise) and, for data held in memory, slicing and joining along that dimension.

*Data* is a fixed set of examples passed over many times (every HVP and every landscape
point is one pass), so L(w) must be the same function on every pass:

- an ``(inputs, targets)`` pair of tensors, or a dict of tensors with one first
  dimension: the set in memory, cut into batches of ``batch_size`` in order;
- a list or tuple of batches: used as given;
- any other re-iterable, such as a ``torch.utils.data.DataLoader``: streamed, one batch
  at a time moved to the device and let go. A loader that shuffles, or a data set with
  random augmentation (detected by comparing the first batch of two passes), is refused:
  each pass would be another function. An iterator (consumed by one pass) is refused.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

from .errors import SharpscopeError

ExamplesIn = Callable[[Any], int]


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor moved to ``device`` (the same structure)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        moved = {k: to_device(v, device) for k, v in batch.items()}
        return moved if type(batch) is dict else _rebuild(batch, moved)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, list | tuple):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def _rebuild(mapping: Mapping, items: dict) -> Any:
    """A mapping of ``mapping``'s own type holding ``items`` (a BatchEncoding stays one,
    so that ``model(**batch)`` still works); a plain dict if the type cannot be rebuilt."""
    try:
        return type(mapping)(items)
    except Exception:
        return items


def first_tensor(batch: Any) -> torch.Tensor | None:
    """The first tensor in ``batch``, depth first (dict values in their order)."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Mapping):
        children: Iterable = batch.values()
    elif isinstance(batch, list | tuple):
        children = batch
    else:
        return None
    for child in children:
        found = first_tensor(child)
        if found is not None:
            return found
    return None


def count_examples(batch: Any) -> int:
    """Examples in ``batch``: the length of the first dimension of its first tensor."""
    t = first_tensor(batch)
    if t is None or t.dim() == 0:
        raise SharpscopeError(
            f"cannot count the examples of a batch of type {type(batch).__name__}: it holds "
            "no tensor with a first (example) dimension; pass examples_in=<batch -> int>"
        )
    return int(t.shape[0])


def slice_batch(batch: Any, start: int, stop: int, n: int) -> Any:
    """Examples ``start:stop`` of a batch of ``n`` examples: every tensor whose first
    dimension is ``n`` is sliced, everything else kept."""
    if isinstance(batch, torch.Tensor):
        return batch[start:stop] if batch.dim() > 0 and batch.shape[0] == n else batch
    if isinstance(batch, Mapping):
        items = {k: slice_batch(v, start, stop, n) for k, v in batch.items()}
        return items if type(batch) is dict else _rebuild(batch, items)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(slice_batch(v, start, stop, n) for v in batch))
    if isinstance(batch, list | tuple):
        return type(batch)(slice_batch(v, start, stop, n) for v in batch)
    return batch


def join_batches(batches: Sequence[Any]) -> Any:
    """One batch holding the examples of ``batches`` in order (tensors concatenated
    along the first dimension; 0-d tensors and other values taken from the first batch,
    as :func:`slice_batch` keeps them); the batches must have one structure."""
    first = batches[0]
    try:
        if isinstance(first, torch.Tensor):
            return first if first.dim() == 0 else torch.cat(list(batches))
        if isinstance(first, Mapping):
            items = {k: join_batches([b[k] for b in batches]) for k in first}
            return items if type(first) is dict else _rebuild(first, items)
        if isinstance(first, list | tuple):
            parts = [join_batches([b[i] for b in batches]) for i in range(len(first))]
            if hasattr(first, "_fields"):
                return type(first)(*parts)
            return type(first)(parts)
    except (RuntimeError, KeyError, IndexError, TypeError) as exc:
        raise SharpscopeError(
            "the batches cannot be joined into one (different structures or shapes, e.g. "
            f"padded to different lengths): {exc}"
        ) from None
    return first


def batches_equal(a: Any, b: Any) -> bool:
    """Whether two batches hold equal tensors in one structure (NaN equal to NaN)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if torch.equal(a, b):
            return True
        if a.is_floating_point() or a.is_complex():  # NaN != NaN; no mask indexing (8x memory)
            return bool(((a == b) | (a.isnan() & b.isnan())).all())
        return False
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return list(a) == list(b) and all(batches_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(batches_equal(x, y) for x, y in zip(a, b, strict=True))
    try:
        return bool(a == b)
    except Exception:
        return False


def _is_tensor_pair(data: Any) -> bool:
    return (
        isinstance(data, tuple)
        and len(data) == 2
        and all(isinstance(t, torch.Tensor) for t in data)
        and not hasattr(data, "_fields")
    )


def _is_tensor_dict(data: Any) -> bool:
    return (
        isinstance(data, Mapping)
        and len(data) > 0
        and all(isinstance(v, torch.Tensor) for v in data.values())
    )


class Source:
    """The batches of one fixed data set, not yet on any device; iterate for a pass.

    ``examples`` is the number of examples this process passes over (its shard under a
    process group), None when only the whole set's size ``total`` is known (a streamed
    set of known length); ``in_memory`` whether the batches are held (lists, tensors)
    rather than streamed; ``n_batches`` the batches per pass when known.
    """

    def __init__(
        self,
        batches: Callable[[], Iterator[Any]],
        examples: int | None,
        *,
        in_memory: bool,
        n_batches: int | None,
        total: int | None = None,
    ):
        self._batches = batches
        self.examples = examples
        self.in_memory = in_memory
        self.n_batches = n_batches
        self.total = total

    def __iter__(self) -> Iterator[Any]:
        return self._batches()


def make_source(
    data: Any,
    batch_size: int,
    examples_in: ExamplesIn,
    *,
    rank: int = 0,
    world: int = 1,
    counted: bool = True,
) -> Source:
    """The :class:`Source` for ``data`` (see the module docstring), this process's shard
    of it when ``world`` > 1: a contiguous range of the examples for data in memory (cut
    at batch boundaries, shards differing by at most one example), every ``world``-th
    batch for streamed data."""
    if batch_size <= 0:
        raise SharpscopeError(f"batch size must be positive, got {batch_size}")
    if _is_tensor_pair(data) or _is_tensor_dict(data):
        return _sliced(data, batch_size, examples_in, rank, world)
    if isinstance(data, Sequence) and not isinstance(data, str | bytes):
        return _held(list(data), examples_in, rank, world)
    if isinstance(data, Iterable):
        return _streamed(data, examples_in, rank, world, counted)
    if hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        raise SharpscopeError(
            f"data of type {type(data).__name__} is a data set of single examples: wrap it in "
            "DataLoader(dataset, batch_size=..., shuffle=False)"
        )
    raise SharpscopeError(
        f"data of type {type(data).__name__} is not a data set: pass (inputs, targets) "
        "tensors, a list of batches or a DataLoader"
    )


def split_parts(data: Any, parts: int, seed: int = 0) -> list[Any]:
    """``parts`` disjoint parts of ``data`` (any form :func:`make_source` takes), each in
    the same form, for the sampling error of a measurement: tensors (a pair, a dict) are
    cut into equal blocks of one permutation of their examples drawn from ``seed`` (the
    remainder left out); a list of batches into equal blocks of a permutation of its
    batches; streamed data (a DataLoader) deals its batches out, batch i to part
    i mod ``parts``, each part streamed on its own passes."""
    if not isinstance(parts, int) or parts < 2:
        raise SharpscopeError(f"parts must be a whole number >= 2, got {parts!r}")
    g = torch.Generator().manual_seed(seed)
    if _is_tensor_pair(data) or _is_tensor_dict(data):
        n = make_source(data, 2**31, count_examples).examples  # the tensors agree in length
        blocks = _blocks(n, parts, g, "examples")
        if isinstance(data, tuple):
            return [tuple(t[b.to(t.device)] for t in data) for b in blocks]
        return [{k: v[b.to(v.device)] for k, v in data.items()} for b in blocks]
    if isinstance(data, Sequence) and not isinstance(data, str | bytes):
        batches = list(data)
        blocks = _blocks(len(batches), parts, g, "batches")
        return [[batches[i] for i in b.tolist()] for b in blocks]
    if isinstance(data, Iterable) and iter(data) is not data:
        _refuse_random_order(data)
        return [_Dealt(data, part, parts) for part in range(parts)]
    make_source(data, 1, count_examples)  # says what is wrong with the data
    raise SharpscopeError("data cannot be split into parts")


def _blocks(n: int, parts: int, g: torch.Generator, what: str) -> list[torch.Tensor]:
    size = n // parts
    if size == 0:
        raise SharpscopeError(f"{n} {what} cannot be split into {parts} disjoint parts")
    perm = torch.randperm(n, generator=g)
    return [perm[i * size : (i + 1) * size].sort().values for i in range(parts)]


class _Dealt:
    """Part ``part`` of ``parts`` of a re-iterable: its batches ``part``, ``part + parts``,
    ... on every pass."""

    def __init__(self, data: Iterable, part: int, parts: int):
        self.data, self.part, self.parts = data, part, parts

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.data), self.part, None, self.parts)

    def __len__(self) -> int:
        return len(range(self.part, len(self.data), self.parts))  # type: ignore[arg-type]


def _sliced(data: Any, batch_size: int, examples_in: ExamplesIn, rank: int, world: int) -> Source:
    tensors = list(data) if isinstance(data, tuple) else list(data.values())
    lengths = {int(t.shape[0]) if t.dim() else -1 for t in tensors}
    if len(lengths) != 1 or -1 in lengths:
        what = "inputs and targets" if isinstance(data, tuple) else "the tensors of the dict"
        sizes = " and ".join(str(t.shape[0]) if t.dim() else "0-d" for t in tensors)
        raise SharpscopeError(f"{what} differ in their number of examples ({sizes})")
    (n,) = lengths
    lo, hi = n * rank // world, n * (rank + 1) // world
    # The batches of one process, cut at this rank's range: the same batches as one
    # process forms, so the shards' sums add up to its sum.
    cuts = [
        (max(start, lo), min(start + batch_size, hi))
        for start in range(0, n, batch_size)
        if min(start + batch_size, hi) > max(start, lo)
    ]

    def batches() -> Iterator[Any]:
        for a, b in cuts:
            yield slice_batch(data, a, b, n)

    examples = hi - lo if examples_in is count_examples else sum(map(examples_in, batches()))
    return Source(batches, examples, in_memory=True, n_batches=len(cuts))


def _held(batches: list[Any], examples_in: ExamplesIn, rank: int, world: int) -> Source:
    """Batches held as given; under a process group cut into contiguous ranges of rows
    (the first dimension: what slicing cuts, whatever ``examples_in`` weighs)."""
    rows = [count_examples(b) for b in batches] if world > 1 else []
    mine = batches
    if world > 1:
        total = sum(rows)
        lo, hi = total * rank // world, total * (rank + 1) // world
        mine, start = [], 0
        for batch, k in zip(batches, rows, strict=True):
            a, b = max(lo - start, 0), min(hi - start, k)
            if b > a:
                mine.append(batch if (a, b) == (0, k) else slice_batch(batch, a, b, k))
            start += k
    examples = sum(examples_in(b) for b in mine)
    return Source(lambda: iter(mine), examples, in_memory=True, n_batches=len(mine))


def _streamed(
    data: Iterable, examples_in: ExamplesIn, rank: int, world: int, counted: bool
) -> Source:
    if iter(data) is data:
        raise SharpscopeError(
            "data is an iterator, used up by one pass; L(w) takes many passes: pass a "
            "list of batches or a DataLoader"
        )
    _refuse_random_order(data)

    def batches() -> Iterator[Any]:
        return itertools.islice(iter(data), rank, None, world)

    _refuse_changing(data)
    n_batches = total = examples = None
    try:
        n_batches = len(range(rank, len(data), world))  # type: ignore[arg-type]
    except TypeError:
        pass
    total = _known_size(data) if counted else None
    if total is None:
        examples = sum(examples_in(b) for b in batches())  # one pass to count, nothing kept
    return Source(batches, examples, in_memory=False, n_batches=n_batches, total=total)


def _known_size(data: Iterable) -> int | None:
    """The examples a DataLoader passes over, without a pass: its data set's length, when
    it visits every example once in order (a SequentialSampler, drop_last off)."""
    batch_sampler = getattr(data, "batch_sampler", None)
    dataset = getattr(data, "dataset", None)
    if type(getattr(batch_sampler, "sampler", None)).__name__ != "SequentialSampler":
        return None
    if type(batch_sampler).__name__ != "BatchSampler" or batch_sampler.drop_last:
        return None
    try:
        return len(dataset)  # type: ignore[arg-type]
    except TypeError:
        return None


_RANDOM_SAMPLERS = (
    "RandomSampler",
    "SubsetRandomSampler",
    "WeightedRandomSampler",
)


def _refuse_random_order(data: Iterable) -> None:
    """Refuse a DataLoader whose sampler draws another order (or subset) on every pass."""
    sampler = getattr(data, "sampler", None)
    batch_sampler = getattr(data, "batch_sampler", None)
    for s in (sampler, getattr(batch_sampler, "sampler", None)):
        name = type(s).__name__
        if name in _RANDOM_SAMPLERS or (name == "DistributedSampler" and s.shuffle):
            raise SharpscopeError(
                f"the DataLoader draws its examples at random ({name}): every pass would "
                "see other batches, and L(w) must be one fixed function. Build it with "
                "shuffle=False (and no random augmentation) for sharpscope"
            )


def _refuse_changing(data: Iterable) -> None:
    """Refuse data whose first batch differs between two passes (random augmentation,
    a shuffling sampler of another kind)."""
    first = [next(iter(data), None) for _ in range(2)]
    if first[0] is None:
        return
    if not batches_equal(first[0], first[1]):
        raise SharpscopeError(
            "the data gives another first batch on each pass (random augmentation or "
            "shuffling?): L(w) must be one fixed function; turn random transforms and "
            "shuffling off for sharpscope"
        )
