"""Your own images, one folder per class, streamed from disk.

Two layouts, as in the course:
  path/train/<class>/*.jpg and path/valid/<class>/*.jpg   (the split is yours), or
  path/<class>/*.jpg                                     (split by data.valid_pct, seeded by data.split_seed).

Worker processes decode and crop the images (PIL), the batches travel as uint8
(pinned memory on CUDA) and are normalised on the device. Augmentation draws from
a generator seeded by (seed, epoch, item), so an epoch is the same whatever the
number of workers, and a resumed epoch replays the batches an uninterrupted one saw.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms.functional import pil_to_tensor

from dlrun.data import images
from dlrun.distributed import share
from dlrun.errors import DlrunError
from dlrun.family import Data
from dlrun.losses import classification_loss
from dlrun.metrics import Accuracy
from dlrun.rules import Float, Int, Rule

RULES = {
    **images.RULES,
    "data.path": Rule("str", nullable=True),
    "data.num_workers": Int(0),
    "data.mean": Float(each=True, nullable=True),
    "data.std": Float(0, lo_open=True, each=True, nullable=True),
}

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
Item = tuple[Path, int]  # an image file and its class index


def build(cfg: DictConfig, device: torch.device) -> Data:
    """Train and valid batches from `data.path`, with train-time random resized crops and flips."""
    d = cfg.data
    train_items, valid_items, classes = find_images(d.path, d.valid_pct, d.split_seed)
    check_readable([path for path, _ in train_items + valid_items])
    size, mean, std = input_config(cfg)
    if len(mean) != 3 or len(std) != 3:
        raise DlrunError(f"data.mean={mean} and data.std={std} need 3 values each, one per RGB channel")
    workers = min(d.num_workers, os.cpu_count() or 1)  # more processes than cores only add contention
    aug = d.augment
    loader = dict(bs=d.bs, device=device, mean=mean, std=std, num_workers=workers)
    train = LoaderBatches(
        ImageFiles(train_items, size, train=True, scale_min=aug.scale_min, flip=aug.flip),
        shuffle=True,
        seed=cfg.seed,
        drop_last=True,
        split="train",
        **loader,
    )
    valid = LoaderBatches(
        ImageFiles(valid_items, size, train=False),
        shuffle=False,
        seed=cfg.seed,
        drop_last=False,
        split="valid",
        **loader,
    )
    facts = images.ImageFacts(
        n_out=len(classes),
        channels=3,
        size=(size, size),
        classes=tuple(classes),
        mean=tuple(mean),
        std=tuple(std),
    )
    return Data(
        train=train,
        valid=valid,
        loss=classification_loss,
        metrics=Accuracy,
        facts=facts,
        state={"classes.json": classes},
        unit="images",
        mixup="inputs",
        inputs=images.image_inputs(
            facts, "files", int(d.bs), {"flip": bool(aug.flip), "scale_min": float(aug.scale_min)}
        ),
    )


IMAGENET = {"size": 224, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def input_config(cfg: DictConfig) -> tuple[int, list[float], list[float]]:
    """Image size, mean and std: the config's, else the model's (`input_config(model_cfg)` of
    its module: timm's pretrained config), else ImageNet's at 224 pixels."""
    from dlrun.family import MODELS

    d = cfg.data
    model_input = getattr(MODELS.get(cfg.model.name), "input_config", None)
    default = model_input(cfg.model) if model_input is not None else IMAGENET
    size = int(d.size) if d.get("size") else int(default["size"])
    mean = [float(v) for v in d.mean] if d.get("mean") is not None else list(default["mean"])
    std = [float(v) for v in d.std] if d.get("std") is not None else list(default["std"])
    return size, mean, std


# --- finding the images -----------------------------------------------------


def find_images(path: Any, valid_pct: float, split_seed: int) -> tuple[list[Item], list[Item], list[str]]:
    """(train items, valid items, class names) from either folder layout."""
    if path is None:
        raise DlrunError(
            "data=imagefolder needs data.path=FOLDER (with <class>/ subfolders, or train/ and valid/)"
        )
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DlrunError(f"data.path={path}: no such folder")
    train_dir = root / "train"
    valid_dir = next((root / v for v in ("valid", "val") if (root / v).is_dir()), None)
    if not train_dir.is_dir():
        return split(class_images(root), valid_pct, split_seed)
    train = class_images(train_dir)
    if valid_dir is None:
        return split(train, valid_pct, split_seed)
    valid = class_images(valid_dir, need_two=False)
    unknown = sorted(set(valid) - set(train))
    if unknown:
        raise DlrunError(
            f"{valid_dir} has classes that {train_dir} lacks: {', '.join(unknown)}; "
            f"add them to train/ or remove them from {valid_dir.name}/"
        )
    classes = sorted(train)
    index = {c: i for i, c in enumerate(classes)}
    return (
        [(f, index[c]) for c in classes for f in train[c]],
        [(f, index[c]) for c in sorted(valid) for f in valid[c]],
        classes,
    )


def class_images(folder: Path, need_two: bool = True) -> dict[str, list[Path]]:
    """class name -> its image files (sorted, searched recursively) for each subfolder of `folder`."""
    subfolders = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subfolders:
        raise DlrunError(
            f"no class folders in {folder}: put each class's images in {folder}/<class>/ "
            f"(or use {folder}/train/<class>/ and {folder}/valid/<class>/)"
        )
    images = {}
    for sub in subfolders:
        files = sorted(p for p in sub.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise DlrunError(
                f"no images in {sub} (looked for {', '.join(sorted(IMAGE_SUFFIXES))}): "
                f"add images or remove the folder"
            )
        images[sub.name] = files
    if need_two and len(images) < 2:
        raise DlrunError(
            f"{folder} has one class folder ({subfolders[0].name}/): a classifier needs at least 2 classes"
        )
    return images


def split(
    images: dict[str, list[Path]], valid_pct: float, seed: int
) -> tuple[list[Item], list[Item], list[str]]:
    """Hold out `valid_pct` of each class (stratified, fixed by `seed`, not by the run's seed)."""
    rng = np.random.default_rng(seed)
    classes = sorted(images)
    train, valid = [], []
    for label, c in enumerate(classes):
        files = images[c]
        n_valid = min(len(files) - 1, max(1, round(len(files) * valid_pct)))
        held = set(rng.permutation(len(files))[:n_valid].tolist())
        for i, f in enumerate(files):
            (valid if i in held else train).append((f, label))
    if not valid:
        raise DlrunError(
            "no image left for validation: add images (at least 2 per class) or raise data.valid_pct"
        )
    return train, valid, classes


def check_readable(paths: list[Path]) -> None:
    """Open every file's header now (threads, since it is I/O), so that a broken file stops
    the run before training rather than in the middle of an epoch."""

    def problem(path: Path) -> str | None:
        try:
            with Image.open(path) as im:
                im.size  # noqa: B018 -- parsing the header is the check
            return None
        except Exception as e:  # PIL raises several types for bad files
            return f"{path} ({e})"

    with ThreadPoolExecutor(8) as pool:
        bad = [p for p in pool.map(problem, paths) if p]
    if bad:
        raise DlrunError(f"cannot read {len(bad)} image file(s), e.g. {bad[0]}: delete or replace them")


# --- reading and augmenting ---------------------------------------------------


def random_resized_box(width: int, height: int, scale_min: float, rng: random.Random) -> tuple[int, ...]:
    """A crop box (left, top, right, bottom) covering `scale_min`..1 of the image area with aspect
    ratio 3/4..4/3: torchvision's RandomResizedCrop, drawing from `rng` rather than torch's global RNG."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(scale_min, 1.0)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            return left, top, left + w, top + h
    return center_box(width, height)


def center_box(width: int, height: int) -> tuple[int, ...]:
    """The largest centred square: with a resize to size x size, torchvision's Resize + CenterCrop."""
    s = min(width, height)
    left, top = (width - s) // 2, (height - s) // 2
    return left, top, left + s, top + s


class ImageFiles(Dataset):
    """Image files as uint8 [3, size, size] tensors; keys are (index, augmentation seed)."""

    def __init__(self, items: list[Item], size: int, train: bool, scale_min: float = 1.0, flip: bool = False):
        self.items, self.size, self.train = items, size, train
        self.scale_min, self.flip = scale_min, flip

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = key
        path, label = self.items[index]
        try:
            with Image.open(path) as im:
                return pil_to_tensor(self.transform(im, random.Random(seed))), label
        except Exception as e:  # truncated or corrupt data surfaces only when decoding
            raise DlrunError(f"cannot read image {path} ({e}): delete or replace it") from None

    def transform(self, im: Image.Image, rng: random.Random) -> Image.Image:
        if not self.train:
            im.draft("RGB", (self.size, self.size))  # JPEGs decode at a reduced scale: much faster
        im = im.convert("RGB")
        box = random_resized_box(*im.size, self.scale_min, rng) if self.train else center_box(*im.size)
        im = im.resize((self.size, self.size), Image.Resampling.BILINEAR, box=box)
        if self.train and self.flip and rng.random() < 0.5:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return im


class EpochOrder(Sampler):
    """One epoch's items as (index, augmentation seed), from item `start` on: the order and the
    seeds depend only on (seed, epoch), so an epoch can be replayed or resumed."""

    def __init__(self, n: int, shuffle: bool, seed: int):
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.epoch = self.start = 0
        # `LoaderBatches.shard`: only rank `rank`'s part of each batch of `bs` positions (of the
        # first `end` positions: the whole batches, when an incomplete last one is dropped).
        self.bs, self.end, self.rank, self.world = n, n, 0, 1

    def positions(self) -> Iterator[int]:
        """This rank's positions in the epoch's order, from `start` on."""
        if self.world == 1:
            yield from range(self.start, self.n)
            return
        for first in range(self.start - self.start % self.bs, self.end, self.bs):
            part = share(min(self.bs, self.end - first), self.rank, self.world)
            yield from range(max(first + part.start, self.start), first + part.stop)

    def __len__(self) -> int:
        return self.n - self.start if self.world == 1 else sum(1 for _ in self.positions())

    def __iter__(self) -> Iterator[tuple[int, int]]:
        key = self.seed * 1_000_003 + self.epoch
        order = (
            torch.randperm(self.n, generator=torch.Generator().manual_seed(key)).tolist()
            if self.shuffle
            else range(self.n)
        )
        for pos in self.positions():
            yield order[pos], key * 1_000_003 + pos


class LoaderBatches:
    """`Batches` streamed by a DataLoader: decoded in workers, moved to the device and
    normalised there (uint8 travels: a quarter of the float32 traffic)."""

    def __init__(
        self,
        dataset: ImageFiles,
        bs: int,
        shuffle: bool,
        seed: int,
        drop_last: bool,
        device: torch.device,
        mean: list[float],
        std: list[float],
        num_workers: int,
        split: str,
    ):
        n = len(dataset)
        if drop_last and bs > n:
            raise DlrunError(
                f"data.bs={bs} is larger than the {split} split ({n} images): set data.bs to at most {n}"
            )
        self.n, self.bs, self.drop_last, self.device = n, bs, drop_last, device
        self.dataset, self.num_workers = dataset, num_workers
        self.order = EpochOrder(n, shuffle, seed)
        cuda = device.type == "cuda"
        self.loader = self.make_loader(bs)
        self.mean = torch.tensor(mean, device=device).reshape(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=device).reshape(1, 3, 1, 1) * 255
        self.memory_format = torch.channels_last if cuda else torch.contiguous_format

    def make_loader(self, bs: int) -> DataLoader:
        """The DataLoader of `bs` images a batch, in the order `self.order` yields."""
        return DataLoader(
            self.dataset,
            batch_size=bs,
            sampler=self.order,
            drop_last=self.drop_last,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator(),  # workers' seeds come from here, not from the global RNG
        )

    def __len__(self) -> int:
        return self.n // self.bs if self.drop_last else math.ceil(self.n / self.bs)

    def shard(self, rank: int, world: int) -> None:
        """Load, decode and yield only rank `rank`'s part of each batch (bs / world images)."""
        o = self.order
        o.bs, o.rank, o.world = self.bs, rank, world
        o.end = self.n // self.bs * self.bs if self.drop_last else self.n
        self.loader = self.make_loader(share(self.bs, 0, world).stop)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.order.epoch, self.order.start = epoch, min(start * self.bs, self.n)
        try:
            for x, y in self.loader:
                x = x.to(self.device, non_blocking=True)
                x = ((x.float() - self.mean) / self.std).contiguous(memory_format=self.memory_format)
                yield x, y.to(self.device, non_blocking=True)
        except DlrunError as e:
            # From a worker the message carries the worker's traceback: keep the last line, the user's part.
            raise DlrunError(str(e).strip().splitlines()[-1].split("DlrunError: ", 1)[-1]) from None
