"""Any model, any data: a batch_loss hook, batches of any structure, streamed DataLoaders,
attention (double backward through scaled_dot_product_attention) and regression.

The numbers are checked against exact answers: dense Hessians of float64 models, the
closed-form Hessian of least squares, and the same objective built from another form of
the same data.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import sharpscope as ss
from sharpscope.errors import SharpscopeError
from sharpscope.losses import mse
from sharpscope.models import ResNet18
from sharpscope.objective import Objective, twice_differentiable


class TinyViT(nn.Module):
    """The shape of a vision transformer: patch embedding, one pre-norm attention block
    through F.scaled_dot_product_attention, an MLP, mean pooling and a linear head."""

    def __init__(self, channels=1, image=4, patch=2, dim=8, heads=2, classes=3):
        super().__init__()
        self.heads = heads
        self.embed = nn.Conv2d(channels, dim, patch, stride=patch)
        self.pos = nn.Parameter(0.1 * torch.randn(1, (image // patch) ** 2, dim))
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        b, n, d = t.shape
        q, k, v = self.qkv(self.norm1(t)).view(b, n, 3, self.heads, d // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        t = t + self.proj(a.transpose(1, 2).reshape(b, n, d))
        t = t + self.mlp(self.norm2(t))
        return self.head(t.mean(1))


class TwoInputs(nn.Module):
    """A model whose forward takes two tensors and returns a tuple."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(2, 4)

    def forward(self, a, b):
        h = torch.tanh(self.a(a) + self.b(b))
        return h, h.sum()


def dense_hessian(obj: Objective) -> torch.Tensor:
    """The exact Hessian of the objective's L at w0, written out from its batches."""

    def loss(w):
        total = 0.0
        for batch in obj.batches():
            with obj.at(w):
                value, _ = obj.batch_terms(obj.model, batch)
            total = total + value * (obj.examples_in(batch) / obj.n_examples)
        return total

    with twice_differentiable():
        return torch.autograd.functional.hessian(loss, obj.w0)


def params_of(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_untouched(model, before, training):
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training == training


def images(n=12, channels=1, size=4, classes=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, size, size, generator=g, dtype=dtype)
    return x, torch.randint(classes, (n,), generator=g)


# -- attention: double backward through scaled_dot_product_attention ---------------------


def test_the_fused_attention_kernel_has_no_double_backward():
    """Why HVPs run under the math kernel: without it the second derivative fails."""
    q = torch.randn(2, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(F.scaled_dot_product_attention(q, q, q).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(g.pow(2).sum(), q)


def test_attention_model_eigenvalues_and_trace_equal_the_dense_hessian():
    torch.manual_seed(0)
    model = TinyViT().double()
    data = images()
    obj = Objective(model, data, batch_size=5)
    evals = torch.linalg.eigvalsh(dense_hessian(obj))
    result = ss.hessian_eigenvalues(model, data, k=3, batch_size=5, tol=1e-8)
    for got, want in zip(result.eigenvalues, evals.flip(0)[:3], strict=True):
        assert got == pytest.approx(want.item(), rel=1e-4)
    # Hutchinson with more probes than parameters is not exact, but its mean is within
    # a few standard errors of the dense trace.
    trace = ss.hessian_trace(model, data, samples=200, batch_size=5)
    assert abs(trace.value - evals.sum().item()) < 4 * trace.stderr
    # Sharpness and a 2-D landscape of the same model: first order, the fast kernels.
    rise = ss.sharpness(model, data, rho=0.05, steps=5, batch_size=5)
    assert rise.value >= 0 and rise.eps_norm <= 0.05 * (1 + 1e-9)
    surface = ss.landscape(model, data, dim=2, points=3, batch_size=5)
    assert surface.loss[1, 1] == pytest.approx(obj.value(), rel=1e-12)


def test_gradients_keep_the_fast_attention_kernel():
    """Only second-order passes switch kernels: a gradient is computed unchanged."""
    torch.manual_seed(0)
    model = TinyViT()
    x, y = images(dtype=torch.float32)
    obj = Objective(model, (x, y))
    _, grad = obj.value_and_grad()
    params = list(model.parameters())
    direct = torch.autograd.grad(F.cross_entropy(model.eval()(x), y), params)
    assert torch.allclose(grad, torch.cat([g.reshape(-1) for g in direct]), atol=1e-6)


# -- batches of any structure ---------------------------------------------------------------


def test_dict_batches_with_batch_loss_equal_the_pair_form():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    g = torch.Generator().manual_seed(1)
    x, y = (
        torch.randn(20, 5, generator=g, dtype=torch.float64),
        torch.randint(3, (20,), generator=g),
    )
    pair = Objective(model, (x, y), batch_size=6)
    dicts = [{"inputs": x[i : i + 6], "labels": y[i : i + 6]} for i in range(0, 20, 6)]
    hook = Objective(
        model, dicts, batch_loss=lambda m, b: F.cross_entropy(m(b["inputs"]), b["labels"])
    )
    v = torch.randn(pair.numel, generator=g, dtype=torch.float64)
    assert hook.n_examples == 20
    assert hook.value() == pytest.approx(pair.value(), rel=1e-14)
    assert torch.allclose(hook.grad(), pair.grad(), rtol=1e-12, atol=1e-15)
    assert torch.allclose(hook.hvp(v), pair.hvp(v), rtol=1e-12, atol=1e-15)
    assert hook.evaluate()["accuracy"] is None  # a batch_loss gives no outputs to score
    assert pair.evaluate()["accuracy"] is not None


def test_a_model_with_two_inputs_and_a_tuple_output():
    torch.manual_seed(0)
    model = TwoInputs().double()
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(10, 3, generator=g, dtype=torch.float64), torch.randn(10, 2, generator=g)
    t = torch.randn(10, 4, generator=g, dtype=torch.float64)

    def batch_loss(m, batch):
        (a, b), t = batch
        return F.mse_loss(m(a, b.double())[0], t)

    data = [((a[:6], b[:6]), t[:6]), ((a[6:], b[6:]), t[6:])]
    before = params_of(model)
    obj = Objective(model, data, batch_loss=batch_loss)
    evals = torch.linalg.eigvalsh(dense_hessian(obj))
    top = ss.hessian_eigenvalues(model, data, k=2, batch_loss=batch_loss, tol=1e-8)
    assert list(top.eigenvalues) == pytest.approx(evals.flip(0)[:2].tolist(), rel=1e-6)
    assert ss.sharpness(model, data, rho=0.05, batch_loss=batch_loss, steps=5).value >= 0
    assert_untouched(model, before, True)


def test_batches_of_another_form_without_batch_loss_are_refused_in_one_line():
    model = nn.Linear(3, 2)
    batches = [{"x": torch.randn(4, 3), "y": torch.zeros(4, dtype=torch.long)}]
    with pytest.raises(SharpscopeError, match="batch_loss"):
        Objective(model, batches).value()
    with pytest.raises(SharpscopeError, match="not both"):
        Objective(model, batches, F.cross_entropy, batch_loss=lambda m, b: m(b["x"]).sum())
    with pytest.raises(SharpscopeError, match="one-element tensor"):
        Objective(model, batches, batch_loss=lambda m, b: m(b["x"])).value()


def test_examples_in_overrides_the_count():
    """Two batches weighted by what examples_in says, not by their first tensor."""
    model = nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(1.0)
    batches = [torch.ones(1, 2, dtype=torch.float64), 2 * torch.ones(1, 2, dtype=torch.float64)]
    weights = {1.0: 3, 2.0: 1}  # the first batch "holds" three examples

    def batch_loss(m, batch):
        return m(batch).sum()

    obj = Objective(
        model, batches, batch_loss=batch_loss, examples_in=lambda b: weights[b[0, 0].item()]
    )
    assert obj.n_examples == 4
    assert obj.value() == pytest.approx((3 * 2.0 + 1 * 4.0) / 4)


# -- streamed data --------------------------------------------------------------------------


def test_a_dataloader_gives_the_numbers_of_the_same_batches_in_memory():
    torch.manual_seed(0)
    model = ResNet18((3, 8, 8), 4, width=4).double()
    x, y = images(n=10, channels=3, size=8, classes=4)
    loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=False)
    held = Objective(model, (x, y), batch_size=4)
    streamed = Objective(model, loader)
    assert not streamed.source.in_memory and streamed.n_examples == 10
    v = torch.randn(held.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert streamed.value() == held.value()
    assert torch.equal(streamed.grad(), held.grad())
    assert torch.equal(streamed.hvp(v), held.hvp(v))


def test_a_resnet_on_a_dataloader_through_every_analyzer():
    torch.manual_seed(0)
    model = ResNet18((3, 8, 8), 4, width=4)
    x, y = images(n=16, channels=3, size=8, classes=4, dtype=torch.float32)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    before, training = params_of(model), model.training
    assert ss.sharpness(model, loader, rho=0.05, steps=3).value >= 0
    top = ss.hessian_eigenvalues(model, loader, k=2, tol=1e-2)
    assert top.eigenvalues[0] >= top.eigenvalues[1]
    assert ss.hessian_trace(model, loader, samples=3).value == pytest.approx(
        ss.hessian_trace(model, (x, y), samples=3, batch_size=8).value, rel=1e-4
    )
    surface = ss.landscape(model, loader, dim=2, points=3)
    assert surface.loss.shape == (3, 3)
    assert surface.loss[1, 1] == pytest.approx(Objective(model, loader).value(), rel=1e-6)
    assert_untouched(model, before, training)


def test_a_shuffling_loader_is_refused():
    data = TensorDataset(torch.randn(8, 3), torch.zeros(8, dtype=torch.long))
    with pytest.raises(SharpscopeError, match="shuffle=False"):
        Objective(nn.Linear(3, 2), DataLoader(data, batch_size=4, shuffle=True))


class Jittered(Dataset):
    """Random augmentation: each read of an example adds fresh noise."""

    def __len__(self):
        return 6

    def __getitem__(self, i):
        return torch.randn(3), 0


def test_random_augmentation_is_refused():
    with pytest.raises(SharpscopeError, match="augmentation"):
        Objective(nn.Linear(3, 2), DataLoader(Jittered(), batch_size=3))


def test_an_iterator_is_refused():
    batches = iter([(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))])
    with pytest.raises(SharpscopeError, match="iterator"):
        Objective(nn.Linear(3, 2), batches)


def test_a_dataset_of_single_examples_is_refused_with_the_fix():
    with pytest.raises(SharpscopeError, match="DataLoader"):
        Objective(nn.Linear(3, 2), TensorDataset(torch.randn(4, 3), torch.zeros(4)))


def test_a_loader_of_unknown_length_is_counted():
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            g = torch.Generator().manual_seed(0)
            for _ in range(5):
                yield torch.randn(3, generator=g), 1

    obj = Objective(nn.Linear(3, 2), DataLoader(Stream(), batch_size=2))
    assert obj.n_examples == 5 and obj.source.total is None


# -- regression -----------------------------------------------------------------------------


def least_squares(n=30, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = X @ torch.randn(d, generator=g, dtype=torch.float64) + 0.1 * torch.randn(
        n, generator=g, dtype=torch.float64
    )
    model = nn.Linear(d, 1).double()
    return model, X, y


def test_regression_hessian_is_the_closed_form_and_reports_no_accuracy():
    """L = 0.5 mean (x.w + b - y)^2 (the mse convention): H = A^T A / n with A = [X 1]."""
    model, X, y = least_squares()
    A = torch.cat([X, torch.ones(len(X), 1, dtype=torch.float64)], dim=1)
    H = A.T @ A / len(X)
    exact = torch.linalg.eigvalsh(H).flip(0)
    result = ss.hessian_eigenvalues(model, (X, y), k=2, loss_fn=mse, tol=1e-10)
    assert list(result.eigenvalues) == pytest.approx(exact[:2].tolist(), rel=1e-8)
    assert ss.hessian_trace(model, (X, y), loss_fn=mse, samples=400).value == pytest.approx(
        torch.trace(H).item(), rel=0.2
    )
    doc = ss.measure(model, (X, y), loss_fn=mse, test_data=(X[:10], y[:10]), samples=None, eigs=2)
    assert doc["accuracy"] == {"train": None, "test": None}
    assert doc["hessian"]["eigenvalues"] == pytest.approx(exact[:2].tolist(), rel=1e-4)
    assert ss.landscape(model, (X, y), loss_fn=mse, dim=2, points=3).loss.shape == (3, 3)


def test_cross_entropy_refuses_float_targets():
    """A one-output model under cross-entropy has loss 0 for any float target: refused."""
    model, X, y = least_squares()
    with pytest.raises(SharpscopeError, match="mse"):
        ss.sharpness(model, (X, y.unsqueeze(1)))
    with pytest.raises(SharpscopeError, match="class indices"):
        Objective(model, (X, y)).value()


# -- the in-memory landscape ----------------------------------------------------------------


def test_landscape_of_a_model_in_memory_records_its_settings():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 4, generator=g), torch.randint(3, (40,), generator=g)
    surface = ss.landscape(model, (x, y), dim=1, points=5, range=(-1, 1), seed=3)
    assert surface.loss[2] == pytest.approx(Objective(model, (x, y)).value(), rel=1e-6)
    assert surface.settings["seed"] == 3 and surface.settings["n_examples"] == 40
    assert surface.settings["model"]["class"].endswith("Sequential")
    again = ss.landscape(
        model, DataLoader(TensorDataset(x, y), batch_size=512), dim=1, points=5, seed=3
    )
    assert again.loss.tolist() == pytest.approx(surface.loss.tolist(), rel=1e-6)
    with pytest.raises(SharpscopeError, match="sharpscope.landscape"):
        ss.surface_1d(model, torch.zeros(1), [0.0])
    with pytest.raises(SharpscopeError, match="bn_data"):
        ss.landscape(model, (x, y), bn_recalibrate=True)


def test_pyhessian_is_refused_with_a_batch_loss():
    model = nn.Linear(3, 2)
    data = [{"x": torch.randn(4, 3), "y": torch.zeros(4, dtype=torch.long)}]
    with pytest.raises(SharpscopeError, match="PyHessian"):
        ss.hessian_eigenvalues(
            model,
            data,
            batch_loss=lambda m, b: F.cross_entropy(m(b["x"]), b["y"]),
            method="pyhessian",
        )


# -- the third-party models of the README, where their packages import ----------------------


def _package(name):
    """The package, or a skip: torchvision from the registry fails to import beside a CPU
    torch of another build (a RuntimeError, not an ImportError), and timm needs it."""
    try:
        return __import__(name)
    except Exception as exc:  # noqa: BLE001 - any failure to import means "not here"
        pytest.skip(f"{name} does not import here: {str(exc).splitlines()[0][:80]}")


def test_torchvision_resnet18_on_a_dataloader():
    torchvision = _package("torchvision")
    model = torchvision.models.resnet18(num_classes=4)
    x, y = images(n=4, channels=3, size=32, classes=4, dtype=torch.float32)
    loader = DataLoader(TensorDataset(x, y), batch_size=2)
    top = ss.hessian_eigenvalues(model, loader, k=1, tol=1e-2)
    assert top.eigenvalues[0] > 0
    assert ss.landscape(model, loader, dim=2, points=2).loss.shape == (2, 2)


def test_timm_vit_through_the_hessian():
    timm = _package("timm")
    model = timm.create_model(
        "vit_tiny_patch16_224", num_classes=3, img_size=8, patch_size=4, depth=1, embed_dim=16
    )
    x, y = images(n=4, channels=3, size=8, classes=3, dtype=torch.float32)
    obj = Objective(model, (x, y))
    top = ss.hessian_eigenvalues(obj, k=1, return_eigenvectors=True, tol=1e-3)
    v = top.eigenvectors[0]
    assert (obj.hvp(v) - top.eigenvalues[0] * v).norm() <= 1e-2 * abs(top.eigenvalues[0])


# -- what a review with real models found ---------------------------------------------------


def test_targets_per_token_have_no_per_example_accuracy():
    """A language model's (n, T) targets: hits per token over n sequences would exceed 1."""
    model = nn.Sequential(nn.Embedding(7, 5), nn.Linear(5, 7))
    ids = torch.randint(7, (6, 4), generator=torch.Generator().manual_seed(0))

    def per_token(out, y):
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))

    assert Objective(model, (ids, ids), per_token).evaluate()["accuracy"] is None


def test_m_sharpness_groups_rows_whatever_examples_in_weighs():
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    x = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    weighed = ss.sharpness(model, batches, m=3, steps=3, examples_in=lambda b: 5 * len(b[1]))
    plain = ss.sharpness(model, batches, m=3, steps=3)
    assert len(weighed.per_batch) == len(plain.per_batch) == 2
    assert weighed.per_batch == pytest.approx(plain.per_batch, rel=1e-12)


def test_examples_in_is_honoured_for_tensors_held_in_memory():
    model = nn.Linear(3, 2).double()
    x = torch.randn(9, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = torch.randint(2, (9,), generator=torch.Generator().manual_seed(3))
    doubled = Objective(model, (x, y), batch_size=4, examples_in=lambda b: 2 * len(b[1]))
    assert doubled.n_examples == 18
    assert doubled.value() == pytest.approx(
        Objective(model, (x, y), batch_size=4).value(), rel=1e-14
    )


class MixedPrecision(nn.Module):
    """Parameters of two dtypes, the model casting between them itself (as a bf16 model
    with float32 norms does)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 5).double()
        self.b = nn.Linear(5, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x.double())).float())


def test_parameters_of_two_dtypes_keep_their_own():
    torch.manual_seed(0)
    model = MixedPrecision()
    x, y = torch.randn(8, 4), torch.randint(3, (8,))
    obj = Objective(model, (x, y))
    assert obj.w0.dtype == torch.float64
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert obj.value() == pytest.approx(loss.item(), rel=1e-6)
    direct = torch.cat([g.double().reshape(-1) for g in grads])
    assert torch.allclose(obj.grad(), direct, rtol=1e-5, atol=1e-7)
    assert ss.hessian_eigenvalues(obj, k=1, tol=1e-3).converged


class Counting(nn.Module):
    """A forward pass that updates a buffer in place."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return self.lin(x)


def test_a_buffer_updated_by_the_forward_pass_stays_the_users():
    model = Counting()
    Objective(model, (torch.randn(4, 3), torch.zeros(4, dtype=torch.long))).value()
    assert model.calls.item() == 0


def test_a_batch_loss_without_a_graph_is_refused_in_one_line():
    model = nn.Linear(3, 2)
    data = [{"x": torch.randn(4, 3), "y": torch.zeros(4, dtype=torch.long)}]

    def detached(m, b):
        with torch.no_grad():
            return F.cross_entropy(m(b["x"]), b["y"])

    with pytest.raises(SharpscopeError, match="does not depend on the weights"):
        ss.hessian_eigenvalues(model, data, batch_loss=detached)
