import os
import pickle

import numpy as np
import pytest
import torch

from sharpscope.data import augment_batch, data_spec, load_dataset
from sharpscope.errors import SharpscopeError


def test_digits_fixed_split():
    a, b = load_dataset("digits"), load_dataset("digits")
    assert a.train_x.shape == (1347, 1, 8, 8) and a.test_x.shape == (450, 1, 8, 8)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert 0.0 <= a.train_x.min() and a.train_x.max() <= 1.0


def test_mnist1d_is_the_papers_4000_1000_split():
    ds = load_dataset("mnist1d")
    assert ds.train_x.shape == (4000, 1, 40) and ds.test_x.shape == (1000, 1, 40)
    assert ds.num_classes == 10


def test_synthetic_is_seeded_and_configurable():
    spec = data_spec("synthetic", synthetic={"n_train": 50, "dim": 3, "seed": 5})
    a, b = load_dataset(spec), load_dataset(spec)
    assert a.train_x.shape == (50, 3) and torch.equal(a.train_x, b.train_x)
    other = load_dataset(data_spec("synthetic", synthetic={"n_train": 50, "dim": 3, "seed": 6}))
    assert not torch.equal(a.train_x, other.train_x)


def test_train_subset_and_examples_are_fixed_subsets():
    ds = load_dataset(data_spec("digits", train_subset=100))
    assert ds.train_x.shape[0] == 100
    x1, y1 = ds.examples("test", 30, seed=0)
    x2, y2 = ds.examples("test", 30, seed=0)
    assert torch.equal(x1, x2) and len(y1) == 30
    assert ds.examples("test", 10_000)[0].shape[0] == 450  # all when fewer
    with pytest.raises(SharpscopeError, match="exceeds"):
        load_dataset(data_spec("digits", train_subset=10**6))
    with pytest.raises(SharpscopeError, match="positive"):
        ds.examples("train", 0)


def test_unknown_names_are_refused():
    with pytest.raises(SharpscopeError, match="unknown data set"):
        load_dataset("imagenet")
    with pytest.raises(SharpscopeError, match="unknown split"):
        load_dataset("digits").split("valid")


def test_crop_flip_takes_windows_of_the_zero_padded_image():
    x = torch.arange(4 * 2 * 5 * 5, dtype=torch.float32).reshape(4, 2, 5, 5) + 1
    out = augment_batch(x, "crop_flip", torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(4):
        candidates = [
            win
            for dy in range(9)
            for dx in range(9)
            for win in (padded[i, :, dy : dy + 5, dx : dx + 5],)
            for win in (win, win.flip(-1))
        ]
        assert any(torch.equal(out[i], c) for c in candidates)
    again = augment_batch(x, "crop_flip", torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def write_fake_cifar10(root, n_per_batch=4):
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {
            b"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
            b"labels": [int(v) for v in rng.integers(0, 10, n_per_batch)],
        }
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(batch, f, protocol=2)
    return folder


def test_cifar10_reads_the_python_release_format(tmp_path):
    folder = write_fake_cifar10(tmp_path)
    ds = load_dataset(data_spec("cifar10", data_dir=str(tmp_path)))
    assert ds.train_x.shape == (20, 3, 32, 32) and ds.test_x.shape == (4, 3, 32, 32)
    assert ds.augment == "crop_flip" and ds.num_classes == 10
    with open(os.path.join(folder, "test_batch"), "rb") as f:
        raw = pickle.load(f)
    first = torch.tensor(raw[b"data"][0].reshape(3, 32, 32), dtype=torch.float32) / 255
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(3, 1, 1)
    torch.testing.assert_close(ds.test_x[0], (first - mean) / std)
    assert ds.test_y.tolist() == raw[b"labels"]


def test_cifar_folder_missing_without_download(tmp_path):
    with pytest.raises(SharpscopeError, match="--download"):
        load_dataset(data_spec("cifar10", data_dir=str(tmp_path)))
    with pytest.raises(SharpscopeError, match="--data-dir"):
        load_dataset("cifar100")


def test_cifar_batch_with_code_in_it_is_refused(tmp_path):
    folder = write_fake_cifar10(tmp_path)

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch /tmp/sharpscope-cifar-pwned",))

    with open(os.path.join(folder, "data_batch_3"), "wb") as f:
        pickle.dump({b"data": Payload(), b"labels": []}, f)
    with pytest.raises(SharpscopeError, match="not a CIFAR batch"):
        load_dataset(data_spec("cifar10", data_dir=str(tmp_path)))
    assert not os.path.exists("/tmp/sharpscope-cifar-pwned")


# -- label noise ----------------------------------------------------------------------------


def test_label_noise_replaces_a_fixed_fraction_of_training_labels_by_other_classes():
    from sharpscope.data import data_spec, load_dataset

    clean = load_dataset("digits")
    noisy = load_dataset(data_spec("digits", label_noise=0.2))
    changed = noisy.train_y != clean.train_y
    assert changed.sum().item() == round(0.2 * len(clean.train_y))  # every chosen one moved
    assert torch.equal(noisy.test_y, clean.test_y) and torch.equal(noisy.train_x, clean.train_x)
    again = load_dataset(data_spec("digits", label_noise=0.2))
    assert torch.equal(again.train_y, noisy.train_y)  # one draw, whatever the run's seed
    assert data_spec("digits") == {"name": "digits", "train_subset": None}  # 0: not recorded


def test_label_noise_from_a_file_is_checked():
    from sharpscope.data import data_spec_from_file

    spec = data_spec_from_file({"name": "digits", "label_noise": 0.4}, "ckpt.pt")
    assert spec["label_noise"] == 0.4
    for bad in (1.0, -0.1, "0.2", float("nan"), True):
        with pytest.raises(SharpscopeError, match="label_noise"):
            data_spec_from_file({"name": "digits", "label_noise": bad}, "ckpt.pt")


def test_a_run_with_label_noise_records_it_and_is_measured_on_its_noisy_labels(tmp_path):
    from sharpscope.checkpoint import load_model_and_data, read_checkpoint
    from sharpscope.data import data_spec, load_dataset
    from sharpscope.train import train
    from sharpscope.train_config import TrainConfig

    train(TrainConfig(label_noise=0.3, steps=2, batch_size=64), str(tmp_path / "run"), quiet=True)
    ckpt = read_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert ckpt["data"]["label_noise"] == 0.3
    _, dataset, _ = load_model_and_data(str(tmp_path / "run" / "checkpoint.pt"))
    assert torch.equal(dataset.train_y, load_dataset(data_spec("digits", label_noise=0.3)).train_y)
    with pytest.raises(SharpscopeError, match="label-noise"):
        TrainConfig(label_noise=1.0)


def test_the_noisy_examples_are_not_the_first_examples_a_measurement_draws():
    """The noise is drawn apart from Dataset.examples' permutations: the examples measured
    (seed 0) hold about the noise fraction of noisy labels, not only noisy ones."""
    from sharpscope.data import data_spec, load_dataset

    clean = load_dataset("digits")
    noisy = load_dataset(data_spec("digits", label_noise=0.2))
    for seed in (0, 1):
        _, y_clean = clean.examples("train", 512, seed=seed)
        _, y_noisy = noisy.examples("train", 512, seed=seed)
        assert 0.12 < (y_clean != y_noisy).float().mean().item() < 0.28
