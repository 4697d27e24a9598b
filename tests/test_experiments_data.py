"""The experiments' data loaders: IDX files, MNIST-format directories, digits, binarization."""

import gzip
from pathlib import Path

import pytest
import torch
from sklearn.datasets import load_digits

from pyro_relax.experiments import data
from pyro_relax.experiments.data import (
    IDX_FILES,
    IDXFormatError,
    MissingDatasetError,
    batches,
    binarize,
    load_digits_dataset,
    load_fashion_mnist,
    load_idx_dataset,
    load_mnist,
    read_idx,
    write_idx,
)

PROJECT_MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"


def _tiny_dataset(directory, train=5, test=3, side=4, seed=0):
    """Writes the four IDX files of a tiny MNIST-format data set; returns its arrays."""
    generator = torch.Generator().manual_seed(seed)
    arrays = {}
    for (split, kind), name in IDX_FILES.items():
        count = train if split == "train" else test
        if kind == "images":
            array = torch.randint(0, 256, (count, side, side), generator=generator)
        else:
            array = torch.randint(0, 10, (count,), generator=generator)
        arrays[split, kind] = array.to(torch.uint8)
        write_idx(Path(directory) / name, arrays[split, kind])
    return arrays


@pytest.mark.parametrize(
    "tensor",
    [
        torch.arange(24, dtype=torch.uint8).view(2, 3, 4),
        torch.tensor([-5, 0, 70000], dtype=torch.int32),
        torch.tensor([[1.5, -2.25]], dtype=torch.float32),
        torch.tensor([1e300], dtype=torch.float64),
    ],
    ids=["uint8-3d", "int32", "float32", "float64"],
)
@pytest.mark.parametrize("suffix", [".gz", ""])
def test_idx_round_trip(tmp_path, tensor, suffix):
    path = tmp_path / f"x{suffix}"
    write_idx(path, tensor)
    back = read_idx(path)
    assert back.dtype == tensor.dtype and torch.equal(back, tensor)


def test_idx_header_is_the_standard_one(tmp_path):
    write_idx(tmp_path / "images.gz", torch.zeros(2, 28, 28, dtype=torch.uint8))
    raw = gzip.decompress((tmp_path / "images.gz").read_bytes())
    assert raw[:4] == (2051).to_bytes(4, "big")  # MNIST's image magic number
    assert [int.from_bytes(raw[i : i + 4], "big") for i in (4, 8, 12)] == [2, 28, 28]
    assert len(raw) == 16 + 2 * 28 * 28


def test_idx_magic_number_is_checked(tmp_path):
    write_idx(tmp_path / "labels.gz", torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(IDXFormatError, match="magic number 0x00000801.*expected 0x00000803"):
        read_idx(tmp_path / "labels.gz", expected_magic=0x0803)
    (tmp_path / "bad.gz").write_bytes(gzip.compress(b"\x12\x34\x08\x01" + bytes(8)))
    with pytest.raises(IDXFormatError, match="bad magic number"):
        read_idx(tmp_path / "bad.gz")


@pytest.mark.parametrize(
    "content, message",
    [
        (gzip.compress(b"\x00\x00\x08\x01" + (4).to_bytes(4, "big") + bytes(3)), "3 bytes"),
        (gzip.compress(b"\x00\x00\x08\x03" + (4).to_bytes(4, "big")), "truncated header"),
        (b"not gzip at all", "not a readable"),
        (gzip.compress(b"\x00\x00\x08\x01" + bytes(100))[:-12], "not a readable"),
    ],
    ids=["short-data", "short-header", "not-gzip", "truncated-gzip"],
)
def test_corrupt_idx_files_raise_a_clear_error(tmp_path, content, message):
    path = tmp_path / "corrupt.gz"
    path.write_bytes(content)
    with pytest.raises(IDXFormatError, match=message) as error:
        read_idx(path)
    assert str(path) in str(error.value)


def test_load_idx_dataset_scales_and_flattens(tmp_path):
    arrays = _tiny_dataset(tmp_path)
    dataset = load_idx_dataset(tmp_path, "tiny")
    assert dataset.image_shape == (4, 4) and dataset.num_pixels == 16
    assert dataset.train_images.shape == (5, 16) and dataset.test_images.shape == (3, 16)
    assert dataset.train_images.dtype == torch.float32
    expected = arrays["train", "images"].flatten(1).float() / 255
    assert torch.equal(dataset.train_images, expected)
    assert torch.equal(dataset.test_labels, arrays["test", "labels"].long())


def test_images_and_labels_must_agree(tmp_path):
    _tiny_dataset(tmp_path)
    write_idx(tmp_path / IDX_FILES["test", "labels"], torch.zeros(2, dtype=torch.uint8))
    with pytest.raises(IDXFormatError, match="3 test images but 2 labels"):
        load_idx_dataset(tmp_path)


def test_labels_in_place_of_images_are_rejected(tmp_path):
    _tiny_dataset(tmp_path)
    write_idx(tmp_path / IDX_FILES["train", "images"], torch.zeros(5, dtype=torch.uint8))
    with pytest.raises(IDXFormatError, match="magic number"):
        load_idx_dataset(tmp_path)


def test_missing_mnist_names_the_files_the_directory_and_the_variable(tmp_path, monkeypatch):
    _tiny_dataset(tmp_path)
    (tmp_path / IDX_FILES["test", "images"]).unlink()
    with pytest.raises(MissingDatasetError) as error:
        load_mnist(tmp_path)
    assert isinstance(error.value, FileNotFoundError)
    message = str(error.value)
    assert str(tmp_path) in message and "$PYRO_RELAX_MNIST" in message
    assert all(name in message for name in IDX_FILES.values())
    assert "given as an argument" in message

    monkeypatch.setenv("PYRO_RELAX_MNIST", str(tmp_path / "nowhere"))
    with pytest.raises(MissingDatasetError, match=r"nowhere \(from \$PYRO_RELAX_MNIST\)"):
        load_mnist()


def test_mnist_without_a_directory_says_how_to_give_one(monkeypatch):
    # The package does not guess a path relative to a checkout it may not be installed from.
    monkeypatch.delenv("PYRO_RELAX_MNIST", raising=False)
    with pytest.raises(MissingDatasetError, match=r"--data-dir.*\$PYRO_RELAX_MNIST"):
        load_mnist()


def test_mnist_directory_from_the_environment(tmp_path, monkeypatch):
    _tiny_dataset(tmp_path, train=7)
    monkeypatch.setenv("PYRO_RELAX_MNIST", str(tmp_path))
    assert load_mnist().train_images.shape == (7, 16)


def test_missing_fashion_mnist_names_the_apt_package(tmp_path, monkeypatch):
    with pytest.raises(MissingDatasetError) as error:
        load_fashion_mnist(tmp_path)
    assert "apt-get install dataset-fashion-mnist" in str(error.value)
    assert "$PYRO_RELAX_FASHION_MNIST" in str(error.value)
    _tiny_dataset(tmp_path, test=4)
    monkeypatch.setenv("PYRO_RELAX_FASHION_MNIST", str(tmp_path))
    fashion = load_fashion_mnist()
    assert fashion.name == "Fashion-MNIST" and fashion.test_images.shape == (4, 16)


def test_fashion_mnist_default_is_debians_directory(monkeypatch):
    monkeypatch.delenv("PYRO_RELAX_FASHION_MNIST", raising=False)
    directory, origin = data._resolve(None, data.FASHION_MNIST_ENV, data.FASHION_MNIST_DEBIAN_DIR)
    assert directory == Path("/usr/share/datasets/fashion-mnist") and "default" in origin


@pytest.mark.skipif(not PROJECT_MNIST.is_dir(), reason="the project's MNIST copy is not here")
def test_the_real_mnist_has_the_standard_shapes():
    mnist = load_mnist(PROJECT_MNIST)
    assert mnist.train_images.shape == (60000, 784) and mnist.test_images.shape == (10000, 784)
    assert mnist.train_labels.shape == (60000,) and mnist.image_shape == (28, 28)
    assert 0.0 <= float(mnist.train_images.min()) and float(mnist.train_images.max()) == 1.0


def test_digits_split_is_fixed_and_disjoint():
    first, second = load_digits_dataset(), load_digits_dataset()
    assert torch.equal(first.train_images, second.train_images)
    assert first.train_images.shape == (1500, 64) and first.test_images.shape == (297, 64)
    assert float(first.train_images.min()) == 0.0 and float(first.train_images.max()) == 1.0
    every = torch.cat([first.train_images, first.test_images])
    original = torch.as_tensor(load_digits().data, dtype=torch.float32) / 16
    assert torch.equal(every.sort(0).values, original.sort(0).values)  # a split, nothing lost


def test_load_dataset_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown data set"):
        data.load_dataset("cifar")


def test_fixed_binarization_thresholds_at_one_half():
    images = torch.tensor([[0.0, 0.49, 0.5, 0.51, 1.0]])
    assert binarize(images, "fixed").tolist() == [[0.0, 0.0, 0.0, 1.0, 1.0]]


def test_dynamic_binarization_draws_bernoulli_pixels():
    gray = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0]).repeat(40_000, 1)
    generator = torch.Generator().manual_seed(0)
    first = binarize(gray, "dynamic", generator)
    assert set(first.unique().tolist()) <= {0.0, 1.0}
    mean = first.mean(0)
    tolerance = 5 * torch.sqrt(gray[0] * (1 - gray[0]) / len(gray))  # five standard errors
    assert torch.all((mean - gray[0]).abs() <= tolerance + 1e-12)
    assert mean[0] == 0 and mean[-1] == 1
    second = binarize(gray, "dynamic", generator)  # a fresh draw: about half the 0.5s differ
    assert 0.45 < float((first[:, 2] != second[:, 2]).float().mean()) < 0.55
    again = binarize(gray, "dynamic", torch.Generator().manual_seed(0))
    assert torch.equal(first, again)


def test_unknown_binarization_is_rejected():
    with pytest.raises(ValueError, match="unknown binarization"):
        binarize(torch.zeros(3), "otsu")


def _order(seed, count=10, batch_size=4, drop_last=True):
    images = torch.eye(count)  # image i is one-hot at i, so a batch says which images it holds
    generator = torch.Generator().manual_seed(seed)
    chunks = batches(
        images, batch_size, generator=generator, binarization="fixed", drop_last=drop_last
    )
    return [row.argmax().item() for chunk in chunks for row in chunk]


def test_batches_are_shuffled_by_the_seeded_generator():
    assert _order(0) == _order(0) and _order(0) != _order(1)
    assert len(_order(0)) == 8 and len(set(_order(0))) == 8  # the incomplete batch is dropped
    assert sorted(_order(0, drop_last=False)) == list(range(10))
    generator = torch.Generator().manual_seed(0)
    epochs = [
        [row.argmax().item() for b in batches(torch.eye(10), 5, generator=generator) for row in b]
        for _ in range(2)
    ]
    assert epochs[0] != epochs[1]  # every epoch its own order


def test_dynamic_batches_resume_from_the_generator_state():
    gray = torch.full((20, 8), 0.5)
    generator = torch.Generator().manual_seed(3)
    list(batches(gray, 5, generator=generator))
    state = generator.get_state()
    expected = list(batches(gray, 5, generator=generator))
    generator.set_state(state)
    resumed = batches(gray, 5, generator=generator)
    assert all(torch.equal(a, b) for a, b in zip(expected, resumed, strict=True))
