"""MNIST, Fashion-MNIST and CIFAR-10 as whole tensors on the training device.

The files are read from `data.root` in torchvision's on-disk layout, so a folder
that torchvision filled serves dlrun too. When they are missing, torchvision
downloads them if `data.download` allows and the machine is online; otherwise the
error says which files to put where. The training split trains, the test split
validates; both are small enough (at most 60,000 images) to live on the device.
"""

from __future__ import annotations

import gzip
import pickle
import socket
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from dlrun.data import images
from dlrun.errors import DlrunError
from dlrun.family import Data
from dlrun.rules import STR, Rule

RULES = {**images.RULES, "data.root": STR, "data.download": Rule("bool", words=("auto",))}


@dataclass(frozen=True)
class Source:
    """Where one data set's files live under `data.root`, and where they come from."""

    folder: str  # under data.root
    files: tuple[str, ...]
    url: str  # what to download by hand
    torchvision_class: str
    classes: tuple[str, ...]


MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
DIGITS = tuple(str(c) for c in range(10))
SOURCES = {
    "mnist": Source(
        "MNIST/raw", MNIST_FILES, "https://ossci-datasets.s3.amazonaws.com/mnist/", "MNIST", DIGITS
    ),
    "fashion_mnist": Source(
        "FashionMNIST/raw",
        MNIST_FILES,
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "FashionMNIST",
        (
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
    ),
    "cifar10": Source(
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",),
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "CIFAR10",
        ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    ),
}
# Seconds to wait for the download server; offline machines fail at once or after this.
PROBE_TIMEOUT, DOWNLOAD_TIMEOUT = 5, 30


def build(cfg: DictConfig, device: torch.device) -> Data:
    """The named set's train split for training and test split for validation, normalised with
    per-channel statistics of the training split."""
    name = cfg.data.name
    if name not in SOURCES:
        raise DlrunError(
            f"data.name={name!r} is not a torchvision set dlrun reads: use one of {', '.join(SOURCES)}"
        )
    source = SOURCES[name]
    root = Path(cfg.data.root).expanduser().resolve()
    if missing_files(root, source):
        download(name, root, source, cfg.data.download)
    x_train, y_train, x_valid, y_valid = (
        read_cifar10(root / source.folder) if name == "cifar10" else read_mnist(root / source.folder)
    )
    # uint8 on the device, floats made there: a quarter of the host-to-device traffic.
    x = torch.from_numpy(np.concatenate([x_train, x_valid])).to(device).float().div_(255)
    y = torch.from_numpy(np.concatenate([y_train, y_valid]).astype(np.int64))
    n_classes = len(source.classes)
    if int(y.max()) >= n_classes or int(y.min()) < 0:
        raise DlrunError(
            f"the labels in {root / source.folder} are not 0..{n_classes - 1}: the files are damaged"
        )
    n_train = len(y_train)
    train_idx, valid_idx = np.arange(n_train), np.arange(n_train, len(y))
    return images.image_data(x, y, train_idx, valid_idx, cfg, device, list(source.classes))


def missing_files(root: Path, source: Source) -> list[str]:
    """The files of `source` not under `root` (MNIST files may also be gzipped)."""
    folder = root / source.folder
    return [f for f in source.files if not (folder / f).is_file() and not (folder / f"{f}.gz").is_file()]


def download(name: str, root: Path, source: Source, allowed: bool | str) -> None:
    """Let torchvision fetch the files, or explain which files to put where."""
    if allowed is False or allowed == "false":
        why = "data.download=false"
    else:
        why = online(probe_url(source))
        if why is None:
            why = fetch(name, root, source)
        if why is None and not missing_files(root, source):
            return
    folder = root / source.folder
    files = ", ".join(f"{f}(.gz)" if source.folder.endswith("raw") else f for f in source.files)
    how = f"unpack {source.url} in {root}" if name == "cifar10" else f"download them from {source.url}"
    raise DlrunError(
        f"data={name}: the files are not in {folder} and were not downloaded ({why}). "
        f"Put {files} in {folder} ({how}), or point data.root (or the DLRUN_DATA environment variable) "
        f"at the folder that holds {source.folder}/"
    )


def probe_url(source: Source) -> str:
    return source.url + MNIST_FILES[0] + ".gz" if source.url.endswith("/") else source.url


def online(url: str) -> str | None:
    """None when `url` answers within a few seconds, else why not: a quick check, so that an
    offline machine gets the message at once rather than after torchvision's retries."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=PROBE_TIMEOUT):
            return None
    except Exception as e:  # DNS, refused, timeout, HTTP error: all mean "cannot download now"
        return f"cannot reach {url}: {getattr(e, 'reason', e)}"


def fetch(name: str, root: Path, source: Source) -> str | None:
    """Download with torchvision (which checks the files' MD5); None on success, else why not."""
    import torchvision.datasets

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT)  # a stalled transfer fails instead of hanging
    try:
        getattr(torchvision.datasets, source.torchvision_class)(str(root), train=True, download=True)
        return None
    except Exception as e:
        return f"download failed: {str(e).strip().splitlines()[-1]}"
    finally:
        socket.setdefaulttimeout(previous)


# --- readers ------------------------------------------------------------------


def read_mnist(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """MNIST / Fashion-MNIST: train images [N, 1, 28, 28] uint8, labels, test images, labels."""
    parts = []
    for part in ("train", "t10k"):
        x, y = read_idx(folder, f"{part}-images-idx3-ubyte", 3), read_idx(folder, f"{part}-labels-idx1-ubyte")
        if len(x) != len(y):
            raise DlrunError(f"{folder}: {len(x)} {part} images but {len(y)} labels: the files are damaged")
        parts += [x[:, None], y]
    return tuple(parts)


def read_idx(folder: Path, name: str, ndim: int = 1) -> np.ndarray:
    """One IDX file of unsigned bytes (the MNIST format), plain or gzipped."""
    path = folder / name if (folder / name).is_file() else folder / f"{name}.gz"
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as e:
        raise DlrunError(f"cannot read {path}: {e}") from None
    # Header: two zero bytes, type code 0x08 (unsigned byte), number of dimensions, then big-endian sizes.
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08" or raw[3] != ndim:
        raise DlrunError(f"{path} is not an IDX file of {ndim}-dimensional bytes: the file is damaged")
    shape = tuple(np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).tolist())
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DlrunError(f"{path} holds {data.size} bytes where its header says {shape}: it is truncated")
    return data.reshape(shape)


class NumpyOnly(pickle.Unpickler):
    """CIFAR-10 ships as pickles: allow numpy arrays and nothing else, so a file cannot run code."""

    ALLOWED = ("_reconstruct", "ndarray", "dtype", "_frombuffer")

    def find_class(self, module: str, name: str):
        array = module.split(".")[0] == "numpy" and name in self.ALLOWED
        if array or (module, name) == ("_codecs", "encode"):  # bytes, in protocol-2 pickles from Python 3
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR-10 batch")


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch: images [N, 3, 32, 32] uint8 and labels."""
    try:
        with path.open("rb") as f:
            batch = NumpyOnly(f, encoding="latin1").load()
        x = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        y = np.asarray(batch["labels"], dtype=np.int64)
    except Exception as e:  # unpickling, missing keys, wrong sizes: all a damaged file
        raise DlrunError(f"{path} is not a CIFAR-10 python batch ({e}): the file is damaged") from None
    if len(x) != len(y):
        raise DlrunError(f"{path}: {len(x)} images but {len(y)} labels: the file is damaged")
    return x, y


def read_cifar10(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """CIFAR-10: the five training batches and the test batch."""
    train = [read_cifar_batch(folder / f"data_batch_{i}") for i in range(1, 6)]
    x_valid, y_valid = read_cifar_batch(folder / "test_batch")
    return np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]), x_valid, y_valid
