"""Image data beyond digits (torchvision sets, image folders) and the resnet model.

Everything runs on files the tests write into tmp_path in the formats users have
on disk: MNIST IDX files, CIFAR-10 python pickles, folders of JPEGs, torchvision
state dicts. No test touches the network (`data.download=false` where it matters).
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import SHARED_DATA, dlrun, summary, train
from conftest import compose as config
from PIL import Image

from dlrun.data.images import ImageFacts
from dlrun.errors import DlrunError
from dlrun.family import Data, save_state

CPU = torch.device("cpu")


def build_data(*overrides: str) -> Data:
    from dlrun.family import build_data

    return build_data(config(*overrides), CPU)


# --- fake torchvision files ---------------------------------------------------


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> None:
    """An IDX file of unsigned bytes, as MNIST ships it."""
    header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    raw = header + array.astype(np.uint8).tobytes()
    if gz:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)


def write_mnist(root: Path, folder: str = "MNIST/raw", n_train: int = 150, n_test: int = 40) -> Path:
    """Fake MNIST in torchvision's layout: the label is written into the image's brightness, so it
    can be learnt; the train files gzipped (as downloaded), the test files unpacked."""
    raw = root / folder
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for part, n, gz in (("train", n_train, True), ("t10k", n_test, False)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 40, (n, 28, 28)) + (labels * 20)[:, None, None]
        write_idx(raw / f"{part}-images-idx3-ubyte", images, gz)
        write_idx(raw / f"{part}-labels-idx1-ubyte", labels, gz)
    return raw


def write_cifar10(root: Path, n_per_batch: int = 20) -> Path:
    """Fake CIFAR-10 python batches (dicts with 'data' [N, 3072] uint8 and 'labels')."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            "data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
            "labels": rng.integers(0, 10, n_per_batch).tolist(),
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    return folder


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST/raw"), ("fashion_mnist", "FashionMNIST/raw")])
def test_mnist_sets_are_read_from_data_root(tmp_path, name, folder):
    write_mnist(tmp_path, folder)
    data = build_data(f"data={name}", f"data.root={tmp_path}", "data.download=false", "data.bs=32")
    assert len(data.train) == 150 // 32 and len(data.valid) == 2  # train drops its last partial batch
    x, y = next(data.train.epoch(0))
    assert x.shape == (32, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.long
    assert data.facts.n_out == 10 and data.facts.channels == 1
    assert tuple(data.facts.size) == (28, 28)
    # Normalised with the training split's statistics, which are stored for the model and eval.
    valid_x = torch.cat([x for x, _ in data.valid.epoch(0)])
    assert len(valid_x) == 40 and abs(valid_x.mean().item()) < 0.5
    assert 0 < data.facts.mean[0] < 1 and 0 < data.facts.std[0] < 1


def test_cifar10_is_read_from_python_batches(tmp_path):
    write_cifar10(tmp_path)
    data = build_data("data=cifar10", f"data.root={tmp_path}", "data.download=false", "data.bs=16")
    assert len(data.train) == 100 // 16 and len(data.valid) == 2
    x, _ = next(data.train.epoch(0))
    assert x.shape == (16, 3, 32, 32)
    assert data.facts.channels == 3 and len(data.facts.mean) == 3


def test_torchvision_sets_env_var_sets_the_root(tmp_path, monkeypatch):
    write_mnist(tmp_path)
    monkeypatch.setenv("DLRUN_DATA", str(tmp_path))
    assert config("data=mnist").data.root == str(tmp_path)
    assert len(build_data("data=mnist", "data.download=false").valid) == 1


@pytest.mark.parametrize(
    "name,expected",
    [
        (
            "mnist",
            [
                "MNIST/raw",
                "train-images-idx3-ubyte(.gz)",
                "t10k-labels-idx1-ubyte(.gz)",
                "ossci-datasets.s3.amazonaws.com/mnist",
            ],
        ),
        ("fashion_mnist", ["FashionMNIST/raw", "train-labels-idx1-ubyte(.gz)"]),
        ("cifar10", ["cifar-10-batches-py", "data_batch_1", "test_batch", "cifar-10-python.tar.gz"]),
    ],
)
def test_missing_files_say_what_to_put_where(tmp_path, name, expected):
    with pytest.raises(DlrunError) as err:
        build_data(f"data={name}", f"data.root={tmp_path / 'nowhere'}", "data.download=false")
    message = str(err.value)
    for words in expected + [str(tmp_path / "nowhere"), "data.root", "DLRUN_DATA", "data.download=false"]:
        assert words in message


def test_damaged_files_are_named(tmp_path):
    raw = write_mnist(tmp_path)
    (raw / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 20)
    with pytest.raises(DlrunError, match="t10k-images-idx3-ubyte.*truncated"):
        build_data("data=mnist", f"data.root={tmp_path}", "data.download=false")


def test_cifar_pickle_cannot_run_code(tmp_path):
    folder = write_cifar10(tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (folder / "data_batch_3").write_bytes(pickle.dumps({"data": Evil(), "labels": []}))
    with pytest.raises(DlrunError, match="data_batch_3 is not a CIFAR-10 python batch"):
        build_data("data=cifar10", f"data.root={tmp_path}", "data.download=false")
    assert not marker.exists()


def test_bad_download_value_is_refused():
    with pytest.raises(DlrunError, match="data.download.*true or false or 'auto'"):
        config("data=mnist", "data.download=sometimes")


# --- image folders --------------------------------------------------------------

COLOURS = {"red": (200, 30, 30), "blue": (30, 30, 200)}


def write_images(folder: Path, n: int, colour: tuple[int, int, int], seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        pixels = np.clip(rng.normal(colour, 25, (32, 40, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:03d}.jpg")


def image_folder(root: Path, layout: str = "one", n: int = 12) -> Path:
    """2 classes of `n` 40x32 JPEGs: in one folder (`one`), or in train/ + valid/ (`split`)."""
    for k, (name, colour) in enumerate(COLOURS.items()):
        if layout == "one":
            write_images(root / name, n, colour, seed=k)
        else:
            write_images(root / "train" / name, n, colour, seed=k)
            write_images(root / "valid" / name, n // 3, colour, seed=10 + k)
    return root


def folder_data(path: Path, *overrides: str) -> Data:
    return build_data(
        "data=imagefolder", f"data.path={path}", "data.size=32", "data.num_workers=0", "data.bs=8", *overrides
    )


def test_image_folder_split_by_valid_pct(tmp_path):
    data = folder_data(image_folder(tmp_path), "data.valid_pct=0.25")
    # 12 per class, 3 of each held out: 18 train (2 batches of 8), 6 valid (1 batch).
    assert len(data.train) == 2 and len(data.valid) == 1
    x, y = next(data.train.epoch(0))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.long
    assert list(data.facts.classes) == ["blue", "red"] and data.facts.n_out == 2
    vx, vy = next(data.valid.epoch(0))
    assert sorted(vy.tolist()) == [0, 0, 0, 1, 1, 1]
    # ImageNet normalisation: red images are positive in the red channel, blue ones negative.
    red = vx[vy == 1]
    assert red[:, 0].mean() > 1 and red[:, 2].mean() < -1


def test_image_folder_train_valid_layout(tmp_path):
    data = folder_data(image_folder(tmp_path, "split"))
    assert len(data.train) == 24 // 8 and len(data.valid) == 1
    assert sum(len(y) for _, y in data.valid.epoch(0)) == 8
    save_state(data, tmp_path)
    assert (tmp_path / "classes.json").read_text().split() == ["[", '"blue",', '"red"', "]"]


def test_image_folder_epochs_replay_and_resume(tmp_path):
    data = folder_data(image_folder(tmp_path), "data.bs=4")
    first = list(data.train.epoch(3))
    again = list(data.train.epoch(3))
    resumed = list(data.train.epoch(3, start=2))
    other = list(data.train.epoch(4))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert len(resumed) == len(first) - 2
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first[2:], resumed))
    assert not torch.equal(first[0][0], other[0][0])  # another epoch: another order and other crops


def test_image_folder_workers_give_the_same_batches(tmp_path):
    path = image_folder(tmp_path)
    alone = list(folder_data(path).train.epoch(1))
    workers = folder_data(path, "data.num_workers=2").train
    for _ in range(2):  # persistent workers: the second epoch must replay too
        batches = list(workers.epoch(1))
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(alone, batches))


def test_image_folder_mistakes(tmp_path):
    def error(path: Path | str, *overrides: str) -> str:
        with pytest.raises(DlrunError) as err:
            folder_data(path, *overrides)
        return str(err.value)

    assert "needs data.path=FOLDER" in error("null")
    assert "no such folder" in error(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    assert "no class folders in" in error(tmp_path / "empty")
    write_images(tmp_path / "one" / "cat", 4, (0, 0, 0))
    assert "at least 2 classes" in error(tmp_path / "one")
    (tmp_path / "one" / "dog").mkdir()
    (tmp_path / "one" / "dog" / "notes.txt").write_text("no images here")
    assert f"no images in {tmp_path / 'one' / 'dog'}" in error(tmp_path / "one")

    split = image_folder(tmp_path / "split", "split")
    write_images(split / "valid" / "green", 2, (0, 200, 0))
    assert "valid has classes that" in error(split) and "green" in error(split)

    broken = image_folder(tmp_path / "broken")
    (broken / "red" / "005.jpg").write_bytes(b"not a jpeg")
    assert f"{broken / 'red' / '005.jpg'}" in error(broken)
    assert "data.bs=100 is larger than the train split" in error(image_folder(tmp_path / "ok"), "data.bs=100")


def test_truncated_image_is_named_when_read(tmp_path):
    path = image_folder(tmp_path)
    jpeg = path / "blue" / "004.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:-100])  # the header parses; the pixels are cut short
    data = folder_data(path, "data.num_workers=1")
    with pytest.raises(DlrunError) as err:
        list(data.train.epoch(0))
        list(data.valid.epoch(0))
    assert str(err.value).startswith(f"cannot read image {jpeg}")
    assert "Traceback" not in str(err.value)


# --- resnet -----------------------------------------------------------------------


def fake_data(in_channels: int, size: int, n_classes: int = 7) -> ImageFacts:
    """The facts of `n_classes` classes of in_channels x size x size images."""
    classes = tuple(str(c) for c in range(n_classes))
    return ImageFacts(
        n_out=n_classes, channels=in_channels, size=(size, size), classes=classes, mean=(), std=()
    )


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50"])
@pytest.mark.parametrize("in_channels,size", [(1, 8), (3, 32)])
def test_resnet_fits_small_inputs_and_channels(arch, in_channels, size):
    from dlrun.models.resnet import build

    model = build(config("model=resnet", f"model.arch={arch}"), fake_data(in_channels, size)).eval()
    out = model(torch.randn(2, in_channels, size, size))
    assert out.shape == (2, 7)
    assert isinstance(model.fc[0], torch.nn.Dropout) and model.fc[0].p == 0.25
    assert model.conv1.kernel_size == (3, 3)  # small inputs get the 3x3 stride-1 stem


def test_resnet_keeps_imagenet_stem_for_large_inputs():
    from dlrun.models.resnet import build

    model = build(config("model=resnet", "regularization=none"), fake_data(3, 64)).eval()
    assert model.conv1.kernel_size == (7, 7) and model(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    assert model.fc[0].p == 0.0


def test_resnet_pretrained_weights_missing_say_where_to_put_them(tmp_path, monkeypatch):
    import urllib.error

    from dlrun.models import resnet
    from dlrun.models.resnet import build

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(type(resnet.WEIGHTS["resnet18"]), "get_state_dict", offline)  # never the network
    with pytest.raises(DlrunError) as err:
        build(config("model=resnet", "model.pretrained=true"), fake_data(3, 32))
    message = str(err.value)
    assert "cannot be fetched (offline?)" in message
    assert str(tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in message
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert "model.weights_path" in message and "model.pretrained=false" in message
    with pytest.raises(DlrunError, match="model.weights_path=.*no such file"):
        build(
            config("model=resnet", "model.pretrained=true", f"model.weights_path={tmp_path}/x.pth"),
            fake_data(3, 32),
        )


def test_resnet_fetches_missing_weights_through_torchvision(tmp_path, monkeypatch):
    """Online, torchvision's weights API downloads the file into the hub cache (faked here: it
    writes a random-init state dict where torch.hub would), and the model loads it from there."""
    from dlrun.models import resnet

    state = torchvision.models.resnet18(num_classes=1000).state_dict()
    cache = tmp_path / "hub" / "checkpoints"

    def fetch(self, progress=True, check_hash=False):
        cache.mkdir(parents=True, exist_ok=True)
        torch.save(state, cache / self.url.rsplit("/", 1)[-1])
        return state

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(type(resnet.WEIGHTS["resnet18"]), "get_state_dict", fetch)
    model = resnet.build(config("model=resnet", "model.pretrained=true"), fake_data(3, 32))
    assert torch.equal(model.layer2[0].conv1.weight, state["layer2.0.conv1.weight"])


def test_resnet_loads_local_weights(tmp_path, monkeypatch):
    from dlrun.models.resnet import build

    reference = torchvision.models.resnet18(num_classes=1000)
    state = reference.state_dict()
    torch.save(state, tmp_path / "mine.pth")
    cfg = config("model=resnet", "model.pretrained=true", f"model.weights_path={tmp_path / 'mine.pth'}")
    grey = build(cfg, fake_data(1, 96))
    assert torch.equal(grey.layer3[1].conv2.weight, state["layer3.1.conv2.weight"])
    # A grey image sees the RGB filters summed: the same response as a grey RGB image.
    assert torch.allclose(grey.conv1.weight, state["conv1.weight"].sum(1, keepdim=True))
    assert grey.fc[1].out_features == 7

    # The same file in the torch hub cache, under torchvision's name, is found without weights_path.
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(state, tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    rgb = build(config("model=resnet", "model.pretrained=true"), fake_data(3, 32))
    assert torch.equal(rgb.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])

    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "other.pth")
    with pytest.raises(DlrunError, match="other.pth does not fit"):
        build(
            config("model=resnet", "model.pretrained=true", f"model.weights_path={tmp_path / 'other.pth'}"),
            fake_data(3, 32),
        )


# --- cnn ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "in_channels,size,grid",
    [
        (1, 8, (1, 1)),  # digits: each last feature sees the whole image, so pool globally
        (1, 28, (7, 7)),  # MNIST: keep the 7x7 map
        (3, 32, (4, 4)),  # CIFAR-10: the 8x8 map pooled to at most 7 wide
        (3, 224, (7, 7)),  # an image folder: strided stem and max-pool, 14x14 pooled to 7x7
    ],
)
def test_cnn_keeps_the_map_its_features_cannot_see_whole(in_channels, size, grid):
    from dlrun.models.cnn import build

    model = build(config(), fake_data(in_channels, size)).eval()
    features = model.features(torch.randn(2, in_channels, size, size))
    assert model.head(features).shape == (2, 7)
    assert model.head[1](model.head[0](features)).shape == (2, 64 * grid[0] * grid[1])


def test_cnn_grid_1_pools_globally_and_blocks_set_the_depth():
    from dlrun.models.cnn import build

    model = build(config("model.grid=1", "model.blocks=3"), fake_data(1, 28))
    assert model.head[0].output_size == (1, 1) and model.head[-1].in_features == 64
    convs = [m for m in model.features.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.stride[0] for c in convs] == [1, 2, 1, 1, 2, 1, 1]
    one_stage = build(config("model.channels=8"), fake_data(1, 8))  # one number: one stage
    assert one_stage(torch.randn(2, 1, 8, 8)).shape == (2, 7)


@pytest.mark.parametrize("key", ["model.blocks", "model.grid"])
def test_cnn_blocks_and_grid_must_be_positive(key):
    with pytest.raises(DlrunError, match=f"{key}=0 is not allowed: {key} must be an integer >= 1"):
        config(f"{key}=0")


# --- end to end, as a user runs it ------------------------------------------------


def test_train_cnn_on_an_image_folder(tmp_path):
    path = image_folder(tmp_path / "pics")
    run = dlrun(
        "train",
        "model=cnn",
        "data=imagefolder",
        f"data.path={path}",
        "data.size=32",
        "data.num_workers=0",
        "data.bs=8",
        "trainer.epochs=1",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "run" / "metrics.csv").is_file()
    assert (tmp_path / "run" / "classes.json").is_file()


@pytest.mark.slow  # a ResNet step takes seconds on a small CPU
def test_train_resnet_on_fake_mnist(tmp_path):
    write_mnist(tmp_path / "data")
    run = dlrun(
        "train",
        "model=resnet",
        "data=mnist",
        f"data.root={tmp_path / 'data'}",
        "data.download=false",
        "data.size=8",
        "data.bs=16",
        "trainer.epochs=1",
        "trainer.limit_batches=2",
        "trainer.checkpoint=false",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "run" / "metrics.csv").is_file()


def test_lr_find_on_mnist(tmp_path):
    write_mnist(tmp_path / "data")
    run = dlrun(
        "lr-find",
        "data=mnist",
        f"data.root={tmp_path / 'data'}",
        "data.download=false",
        "data.bs=16",
        "lr_find.num_it=20",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert run.returncode == 0, run.stderr
    assert json.loads((tmp_path / "run" / "lr_find.json").read_text())["lr"] > 0


@pytest.mark.slow  # make test-slow: the fast suite stays under 10 minutes on 2 cores
@pytest.mark.skipif(
    not (SHARED_DATA / "mnist" / "MNIST" / "raw").is_dir(), reason="needs MNIST in ../shared/data/mnist"
)
def test_default_cnn_learns_real_mnist_in_100_batches(tmp_path):
    # The CNN before the head kept the map (global average pooling) reached 0.67 here.
    run = tmp_path / "run"
    train(
        run,
        "data=mnist",
        f"data.root={SHARED_DATA / 'mnist'}",
        "data.download=false",
        "trainer.epochs=1",
        "trainer.limit_batches=100",
        "trainer.checkpoint=false",
    )
    assert summary(run)["best"]["accuracy"] >= 0.93


def test_cli_says_where_mnist_goes(tmp_path):
    run = dlrun(
        "train", "data=mnist", "data.download=false", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path
    )
    assert run.returncode == 2
    assert str(tmp_path / "data" / "MNIST" / "raw") in run.stderr + run.stdout
    assert "Traceback" not in run.stderr


def test_a_weights_file_that_is_not_one_is_a_user_error(tmp_path):
    from dlrun.models.resnet import load_pretrained

    garbage = tmp_path / "weights.pth"
    garbage.write_bytes(b"not a zip archive at all")
    with pytest.raises(DlrunError, match="not a PyTorch weights file") as e:
        load_pretrained(torchvision.models.resnet18(), garbage)
    assert "weights_only" not in str(e.value)
