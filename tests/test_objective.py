import pytest
import torch
from torch.func import functional_call

from sharpscope.errors import SharpscopeError
from sharpscope.losses import mse
from sharpscope.objective import Objective, make_objective, select_parameters


def dense_hessian(objective: Objective, x, y, loss_fn=torch.nn.functional.cross_entropy):
    model = objective.model
    was_training = model.training
    model.eval()

    def loss(w):
        return loss_fn(functional_call(model, objective.state(w), (x,)), y)

    H = torch.autograd.functional.hessian(loss, objective.w0)
    model.train(was_training)
    return H


def test_value_and_grad_match_direct_autograd(tiny_mlp, tiny_data):
    x, y = tiny_data
    obj = Objective(tiny_mlp, (x, y), batch_size=5)  # uneven batches: 5,5,5,5,3
    loss = torch.nn.functional.cross_entropy(tiny_mlp(x), y)
    grads = torch.autograd.grad(loss, list(tiny_mlp.parameters()))
    value, grad = obj.value_and_grad()
    assert value == pytest.approx(loss.item(), rel=1e-13)
    torch.testing.assert_close(
        grad, torch.cat([g.reshape(-1) for g in grads]), rtol=1e-12, atol=1e-14
    )


@pytest.mark.parametrize("loss_fn", [torch.nn.functional.cross_entropy, mse])
def test_hvp_matches_dense_hessian_of_tiny_float64_mlp(tiny_mlp, tiny_data, loss_fn):
    x, y = tiny_data
    obj = Objective(tiny_mlp, (x, y), loss_fn, batch_size=7)
    H = dense_hessian(obj, x, y, loss_fn)
    v = torch.randn(obj.numel, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(obj.hvp(v), H @ v, rtol=1e-10, atol=1e-12)
    assert obj.hvp_count == 1


def test_hvp_of_batchnorm_cnn_uses_running_statistics(tiny_bn_cnn, tiny_image_data):
    x, y = tiny_image_data
    obj = Objective(tiny_bn_cnn, (x, y), batch_size=6)
    H = dense_hessian(obj, x, y)  # eval mode: BN is an affine map with running stats
    v = torch.randn(obj.numel, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(obj.hvp(v), H @ v, rtol=1e-10, atol=1e-12)


def test_model_is_left_exactly_as_it_was(tiny_bn_cnn, tiny_image_data):
    before = {k: v.clone() for k, v in tiny_bn_cnn.state_dict().items()}
    tiny_bn_cnn.train()
    tiny_bn_cnn[1].eval()  # a mixed-mode model keeps its per-module flags
    obj = Objective(tiny_bn_cnn, tiny_image_data)
    obj.value_and_grad(obj.w0 + 0.1)
    obj.hvp(torch.ones(obj.numel, dtype=torch.float64))
    for k, v in tiny_bn_cnn.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert tiny_bn_cnn.training and not tiny_bn_cnn[1].training and tiny_bn_cnn[0].training


def test_float64_model_stays_float64_and_float32_can_accumulate_in_float64(tiny_mlp, tiny_data):
    x, y = tiny_data
    assert Objective(tiny_mlp, (x, y)).grad().dtype == torch.float64
    model32 = tiny_mlp.float()
    obj = Objective(model32, (x.float(), y), accumulate_dtype=torch.float64)
    assert obj.dtype == torch.float32 and obj.grad().dtype == torch.float64


def test_weights_filter_leaves_out_biases_and_norm_layers(tiny_bn_cnn, tiny_image_data):
    names = select_parameters(tiny_bn_cnn, "weights")
    assert names == ["0.weight", "4.weight"]
    obj = Objective(tiny_bn_cnn, tiny_image_data, param_filter="weights")
    assert obj.numel == 3 * 9 + 3 * 48
    # Parameters outside the filter stay fixed at their values: L(w0) is the model's loss.
    full = Objective(tiny_bn_cnn, tiny_image_data)
    assert obj.value() == pytest.approx(full.value(), rel=1e-14)


def test_layout_round_trip(tiny_bn_cnn, tiny_image_data):
    obj = Objective(tiny_bn_cnn, tiny_image_data)
    w = torch.arange(obj.numel, dtype=torch.float64)
    assert torch.equal(obj.layout.flatten(obj.layout.unflatten(w)), w)


def test_iterable_of_batches_equals_pair(tiny_mlp, tiny_data):
    x, y = tiny_data
    batches = [(x[:10], y[:10]), (x[10:], y[10:])]
    a, b = Objective(tiny_mlp, batches), Objective(tiny_mlp, (x, y))
    assert a.value() == pytest.approx(b.value(), rel=1e-14)
    assert a.evaluate()["accuracy"] == b.evaluate()["accuracy"]


def test_empty_data_is_refused(tiny_mlp):
    with pytest.raises(SharpscopeError, match="empty"):
        Objective(tiny_mlp, (torch.zeros(0, 4, dtype=torch.float64), torch.zeros(0).long()))


def test_nan_loss_is_refused(tiny_mlp, tiny_data):
    obj = Objective(tiny_mlp, tiny_data)
    with pytest.raises(SharpscopeError, match="nan"):
        obj.check_finite(torch.full_like(obj.w0, float("nan")))


def test_make_objective_passes_an_objective_through(tiny_mlp, tiny_data):
    obj = Objective(tiny_mlp, tiny_data)
    assert make_objective(obj) is obj
    with pytest.raises(SharpscopeError, match="no data"):
        make_objective(tiny_mlp)


def test_gradients_and_hvps_work_inside_no_grad(tiny_mlp, tiny_data):
    obj = Objective(tiny_mlp, tiny_data)
    v = torch.ones(obj.numel, dtype=torch.float64)
    expected = (obj.grad(), obj.hvp(v))
    with torch.no_grad():
        torch.testing.assert_close(obj.grad(), expected[0])
        torch.testing.assert_close(obj.hvp(v), expected[1])


@pytest.mark.parametrize(
    "analyzer",
    ["sharpness", "average_sharpness", "hessian_eigenvalues", "hessian_trace", "hessian_density"],
)
def test_every_analyzer_refuses_options_beside_an_objective(tiny_mlp, tiny_data, analyzer):
    import sharpscope

    obj = Objective(tiny_mlp, tiny_data)
    with pytest.raises(SharpscopeError, match="an Objective was given: set batch_size"):
        getattr(sharpscope, analyzer)(obj, batch_size=4)
    with pytest.raises(SharpscopeError, match="set data"):
        getattr(sharpscope, analyzer)(obj, tiny_data)
