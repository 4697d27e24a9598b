"""Image data sets for the experiments: MNIST and Fashion-MNIST from IDX files, scikit-learn's
digits, binarization and shuffled batches.

The loaders read the four standard gzipped IDX files themselves (no torchvision, no download):

- MNIST from a directory given as an argument, else ``$PYRO_RELAX_MNIST`` (the package looks
  nowhere else: it may be installed far from any checkout);
- Fashion-MNIST from an argument, else ``$PYRO_RELAX_FASHION_MNIST``, else Debian's
  ``/usr/share/datasets/fashion-mnist/`` (``apt-get install dataset-fashion-mnist``);
- scikit-learn's 8x8 digits (bundled with scikit-learn, so always there) with a fixed split.

Images are float32 gray levels in ``[0, 1]``, flattened to one row per image. The models see
binary images: :func:`binarize` thresholds them (``"fixed"``) or draws a fresh Bernoulli image
from the gray levels (``"dynamic"``) for every batch that :func:`batches` yields.
"""

import dataclasses
import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from pyro_relax.experiments.common import CorruptFileError, ExperimentError

__all__ = [
    "BINARIZATIONS",
    "DATASETS",
    "DIGITS_TEST_SIZE",
    "FASHION_MNIST_APT_PACKAGE",
    "FASHION_MNIST_DEBIAN_DIR",
    "IDX_FILES",
    "IDXFormatError",
    "ImageDataset",
    "MissingDatasetError",
    "batches",
    "binarize",
    "load_dataset",
    "load_digits_dataset",
    "load_fashion_mnist",
    "load_idx_dataset",
    "load_mnist",
    "read_idx",
    "write_idx",
]

# The four files of an MNIST-format data set: (split, kind) -> file name.
IDX_FILES = {
    ("train", "images"): "train-images-idx3-ubyte.gz",
    ("train", "labels"): "train-labels-idx1-ubyte.gz",
    ("test", "images"): "t10k-images-idx3-ubyte.gz",
    ("test", "labels"): "t10k-labels-idx1-ubyte.gz",
}
MNIST_ENV = "PYRO_RELAX_MNIST"
FASHION_MNIST_ENV = "PYRO_RELAX_FASHION_MNIST"
FASHION_MNIST_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_APT_PACKAGE = "dataset-fashion-mnist"
# scikit-learn's digits: 1797 images, the last 297 (after a fixed shuffle) for testing.
DIGITS_TEST_SIZE = 297
_DIGITS_SPLIT_SEED = 0
DATASETS = ("mnist", "fashion-mnist", "digits")
BINARIZATIONS = ("dynamic", "fixed")

# IDX type codes (third byte of the magic number): numpy dtype, big-endian.
_IDX_TYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_CODES = {dtype.newbyteorder("="): code for code, dtype in _IDX_TYPES.items()}
# The magic numbers of the standard files: unsigned bytes, 3 dimensions (images) or 1 (labels).
_IMAGES_MAGIC, _LABELS_MAGIC = 0x0803, 0x0801


class IDXFormatError(CorruptFileError, ValueError):
    """A file is not a valid IDX file (bad magic number, truncated, or corrupt gzip); the
    message names the file and says to download it again."""


class MissingDatasetError(ExperimentError, FileNotFoundError):
    """The files of a data set are not where the loader looked; the message says where to put
    them (or which environment variable or package provides them)."""


def _damaged(path, problem: str) -> IDXFormatError:
    return IDXFormatError(f"{path}: {problem}; download this file again")


@dataclasses.dataclass(frozen=True)
class ImageDataset:
    """A data set of gray-level images in ``[0, 1]``, one flattened image per row.

    Example:
        >>> data = load_digits_dataset()
        >>> data.train_images.shape, data.test_images.shape, data.image_shape
        (torch.Size([1500, 64]), torch.Size([297, 64]), (8, 8))
    """

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    image_shape: tuple

    @property
    def num_pixels(self) -> int:
        """The number of pixels of one image."""
        return math.prod(self.image_shape)


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path, expected_magic=None) -> torch.Tensor:
    """Reads an IDX file (gzipped if its name ends in ``.gz``) into a tensor.

    The magic number is two zero bytes, a type code and the number of dimensions; the sizes
    follow as big-endian 32-bit integers, then the data. ``expected_magic`` (e.g. ``0x0803``
    for unsigned-byte images with 3 dimensions) is checked when given. Anything malformed raises
    :class:`IDXFormatError`, whose message names the file and says to download it again.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     write_idx(f"{tmp}/x.gz", torch.arange(6, dtype=torch.uint8).view(2, 3))
        ...     read_idx(f"{tmp}/x.gz", expected_magic=0x0802)
        tensor([[0, 1, 2],
                [3, 4, 5]], dtype=torch.uint8)
    """
    path = Path(path)
    try:
        with _open(path) as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as error:
        if isinstance(error, FileNotFoundError):
            raise
        raise _damaged(path, f"not a readable (gzipped) IDX file: {error}") from None
    if len(raw) < 4:
        raise _damaged(path, f"{len(raw)} bytes, too short for an IDX header")
    magic = int.from_bytes(raw[:4], "big")
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise _damaged(path, f"bad magic number 0x{magic:08x}, not an IDX file")
    if expected_magic is not None and magic != expected_magic:
        raise _damaged(
            path,
            f"magic number 0x{magic:08x} ({magic}), expected 0x{expected_magic:08x} "
            f"({expected_magic})",
        )
    dtype, ndim = _IDX_TYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise _damaged(path, f"truncated header ({ndim} dimensions announced)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) - header != expected:
        raise _damaged(
            path, f"{len(raw) - header} bytes of data, expected {expected} for shape {shape}"
        )
    array = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return torch.from_numpy(array.astype(dtype.newbyteorder("=")))


def write_idx(path, tensor: torch.Tensor) -> None:
    """Writes ``tensor`` as an IDX file (gzipped if the name ends in ``.gz``); the inverse of
    :func:`read_idx`, used to build small test files.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     write_idx(f"{tmp}/labels.gz", torch.tensor([7, 2], dtype=torch.uint8))
        ...     read_idx(f"{tmp}/labels.gz", expected_magic=0x0801).tolist()
        [7, 2]
    """
    array = tensor.detach().cpu().numpy()
    code = _IDX_CODES.get(array.dtype)
    if code is None:
        raise ValueError(f"IDX has no type code for {array.dtype}")
    header = bytes([0, 0, code, array.ndim]) + b"".join(
        int(size).to_bytes(4, "big") for size in array.shape
    )
    data = header + array.astype(_IDX_TYPES[code]).tobytes()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") if path.suffix == ".gz" else open(path, "wb") as f:
        f.write(data)


def _missing_message(name, directory, origin, env, hint) -> str:
    files = ", ".join(IDX_FILES.values())
    lines = [
        f"{name} not found in {directory} ({origin}).",
        f"Expected the four gzipped IDX files {files}.",
        f"Pass the directory that holds them (--data-dir) or set ${env}.",
    ]
    if hint:
        lines.append(hint)
    return " ".join(lines)


def load_idx_dataset(directory, name: str = "MNIST", *, origin="given", env=None, hint=None):
    """Loads an MNIST-format data set from the four standard gzipped IDX files in ``directory``.

    Missing files raise :class:`MissingDatasetError` naming the files, the directory, how it
    was chosen (``origin``), the environment variable ``env`` and an install ``hint``. Labels
    and images must agree in number.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     for (split, kind), file in IDX_FILES.items():
        ...         shape = (3, 2, 2) if kind == "images" else (3,)
        ...         write_idx(f"{tmp}/{file}", torch.full(shape, 255, dtype=torch.uint8))
        ...     data = load_idx_dataset(tmp, "tiny")
        >>> data.train_images.tolist(), data.image_shape
        ([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]], (2, 2))
    """
    directory = Path(directory)
    paths = {key: directory / file for key, file in IDX_FILES.items()}
    if not all(path.is_file() for path in paths.values()):
        raise MissingDatasetError(_missing_message(name, directory, origin, env, hint))
    arrays = {}
    for (split, kind), path in paths.items():
        magic = _IMAGES_MAGIC if kind == "images" else _LABELS_MAGIC
        arrays[split, kind] = read_idx(path, expected_magic=magic)
    for split in ("train", "test"):
        images, labels = arrays[split, "images"], arrays[split, "labels"]
        if len(images) != len(labels):
            raise IDXFormatError(
                f"{directory}: {len(images)} {split} images but {len(labels)} labels; "
                "download the files again"
            )
    image_shape = tuple(arrays["train", "images"].shape[1:])
    if tuple(arrays["test", "images"].shape[1:]) != image_shape:
        raise IDXFormatError(
            f"{directory}: training and test images differ in shape; download the files again"
        )

    def pixels(split):
        return arrays[split, "images"].flatten(1).float() / 255.0

    return ImageDataset(
        name,
        pixels("train"),
        arrays["train", "labels"].long(),
        pixels("test"),
        arrays["test", "labels"].long(),
        image_shape,
    )


def _resolve(directory, env, default):
    """The directory to read and how it was chosen: the argument, the variable, the default."""
    if directory is not None:
        return Path(directory), "given as an argument"
    if os.environ.get(env):
        return Path(os.environ[env]), f"from ${env}"
    return Path(default), f"the default; ${env} is not set"


def load_mnist(directory=None) -> ImageDataset:
    """MNIST (60000 training and 10000 test images of 28x28) from the IDX files in
    ``directory``, else ``$PYRO_RELAX_MNIST``.

    Example:
        >>> try:
        ...     load_mnist("/nonexistent")
        ... except MissingDatasetError as error:
        ...     print(str(error).split(" (")[0])
        MNIST not found in /nonexistent
    """
    if directory is None and not os.environ.get(MNIST_ENV):
        raise MissingDatasetError(
            f"MNIST: no directory given; pass it (--data-dir DIR, DIR holding the four gzipped "
            f"IDX files {', '.join(IDX_FILES.values())}) or set ${MNIST_ENV}"
        )
    directory, origin = _resolve(directory, MNIST_ENV, None)
    return load_idx_dataset(directory, "MNIST", origin=origin, env=MNIST_ENV)


def load_fashion_mnist(directory=None) -> ImageDataset:
    """Fashion-MNIST (same format and sizes as MNIST) from ``directory``, else
    ``$PYRO_RELAX_FASHION_MNIST``, else Debian's ``/usr/share/datasets/fashion-mnist/``,
    which ``apt-get install dataset-fashion-mnist`` fills.

    Example:
        >>> try:
        ...     load_fashion_mnist("/nonexistent")
        ... except MissingDatasetError as error:
        ...     print(FASHION_MNIST_APT_PACKAGE in str(error))
        True
    """
    directory, origin = _resolve(directory, FASHION_MNIST_ENV, FASHION_MNIST_DEBIAN_DIR)
    hint = (
        f"On Debian or Ubuntu, `apt-get install {FASHION_MNIST_APT_PACKAGE}` puts them in "
        f"{FASHION_MNIST_DEBIAN_DIR}."
    )
    return load_idx_dataset(
        directory, "Fashion-MNIST", origin=origin, env=FASHION_MNIST_ENV, hint=hint
    )


def load_digits_dataset() -> ImageDataset:
    """scikit-learn's 1797 handwritten digits of 8x8 pixels, scaled to ``[0, 1]``, split once
    and for all into 1500 training and 297 test images by a fixed shuffle.

    Example:
        >>> data = load_digits_dataset()
        >>> float(data.train_images.max()), data.train_labels[:5].tolist()
        (1.0, [6, 5, 5, 7, 9])
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = torch.as_tensor(digits.data, dtype=torch.float32) / 16.0
    labels = torch.as_tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(pixels), generator=torch.Generator().manual_seed(_DIGITS_SPLIT_SEED))
    train, test = order[:-DIGITS_TEST_SIZE], order[-DIGITS_TEST_SIZE:]
    return ImageDataset("digits", pixels[train], labels[train], pixels[test], labels[test], (8, 8))


def load_dataset(name: str, directory=None) -> ImageDataset:
    """The data set ``name`` (``"mnist"``, ``"fashion-mnist"`` or ``"digits"``); ``directory``
    overrides where MNIST-format files are read from (ignored for the digits).

    Example:
        >>> load_dataset("digits").name
        'digits'
    """
    if name == "mnist":
        return load_mnist(directory)
    if name == "fashion-mnist":
        return load_fashion_mnist(directory)
    if name == "digits":
        return load_digits_dataset()
    raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")


def binarize(images: torch.Tensor, binarization: str, generator=None) -> torch.Tensor:
    """Binary images from gray levels in ``[0, 1]``.

    ``"fixed"``: 1 where the gray level exceeds 0.5 (deterministic). ``"dynamic"``: each pixel
    a fresh Bernoulli draw with its gray level as probability, from ``generator`` (a
    ``torch.Generator`` on the images' device; the global one if ``None``), so every epoch
    sees a new binary image.

    Example:
        >>> binarize(torch.tensor([0.2, 0.5, 0.7]), "fixed")
        tensor([0., 0., 1.])
        >>> binarize(torch.tensor([0.0, 1.0]), "dynamic", torch.Generator().manual_seed(0))
        tensor([0., 1.])
    """
    if binarization == "fixed":
        return (images > 0.5).to(images.dtype)
    if binarization == "dynamic":
        return torch.bernoulli(images, generator=generator)
    raise ValueError(
        f"unknown binarization {binarization!r}; choose one of {', '.join(BINARIZATIONS)}"
    )


def batches(
    images: torch.Tensor,
    batch_size: int,
    *,
    generator: torch.Generator,
    binarization: str = "dynamic",
    shuffle: bool = True,
    drop_last: bool = True,
):
    """Yields binarized batches of ``images`` in an order shuffled by ``generator``.

    The same ``generator`` draws the order and the dynamic binarization, so a run that saves
    and restores its state (``generator.get_state()``) sees the same batches. With
    ``drop_last`` an incomplete last batch is left out (every step sees ``batch_size`` images,
    which a baseline with one value per position needs).

    Example:
        >>> images = torch.linspace(0, 1, 10).unsqueeze(-1)
        >>> generator = torch.Generator().manual_seed(0)
        >>> [b.shape for b in batches(images, 4, generator=generator, binarization="fixed")]
        [torch.Size([4, 1]), torch.Size([4, 1])]
    """
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be positive, got {batch_size}")
    count = len(images)
    if shuffle:
        order = torch.randperm(count, generator=generator, device=generator.device)
    else:
        order = torch.arange(count)
    stop = count - count % batch_size if drop_last else count
    for start in range(0, stop, batch_size):
        index = order[start : start + batch_size].to(images.device)
        yield binarize(images[index], binarization, generator)
