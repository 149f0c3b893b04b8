"""`dlrun predict` for image runs: classes for an image, a folder of images or a list of them.

INPUT is an image file, a folder (searched recursively, in sorted order), or a list file
(`.txt` or `.csv`, one path per line, relative paths read from the list file's folder). Each
image is read as the run's validation read its images, op for op, so that the validation
images give back `dlrun eval`'s numbers exactly:

- `tensor` runs (digits, MNIST, Fashion-MNIST, CIFAR-10): grey ("L") or RGB pixels as floats
  in [0, 1], resized bilinearly to the run's size when they have another, then normalised with
  the run's mean and std;
- `files` runs (imagefolder): `ImageFiles`' validation transform (the centre square resized to
  size x size), normalised on the device as the loader does.

When every image of a folder sits under a folder named after one of the run's classes, that
folder is its label: the CSV gets a `label` column and the accuracy and loss are measured.
`--tta` averages the class probabilities of the centre view, its mirror image (if the run
trained with flips) and four shifted views, as fastai's `learn.tta` does.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torchvision.transforms.functional import pil_to_tensor

from dlrun import outputs
from dlrun.data.imagefolder import IMAGE_SUFFIXES, ImageFiles
from dlrun.errors import DlrunError, first_line
from dlrun.losses import classification_loss
from dlrun.metrics import Accuracy

LIST_SUFFIXES = {".txt", ".csv"}
CORNER = 0.9  # files --tta: the corner crops cover this much of the centre square's side
READERS = 4  # threads decoding images (PIL releases the GIL while it decodes)


def predict(model: Any, source: Path, output: Path, args: argparse.Namespace) -> outputs.Result:
    """One CSV row per image read (see the module's docstring); unreadable files are skipped
    and named in `Result.skipped`."""
    prep = model.prep
    classes = list(prep["classes"])
    paths, skipped, kind = find_inputs(source)
    labels = folder_labels(source, paths, classes) if kind == "folder" else None
    pixels = (FilePixels if prep["pixels"] == "files" else TensorPixels)(prep, model.device, args.tta)
    bs = args.bs or int(prep["bs"])
    done: list[tuple[Path, int | None]] = []  # the images read, in order
    ys: list[Any] = []
    with ThreadPoolExecutor(min(READERS, os.cpu_count() or 1)) as pool:
        batches = read_batches(paths, labels, pixels, bs, pool, done, ys, skipped)
        net = TTA(model.model) if args.tta else (lambda views: model.model(views[0]))
        loss, metrics = (classification_loss, Accuracy()) if labels is not None else (None, None)
        outs, scores = outputs.run(net, batches, math.ceil(len(paths) / bs), "images", loss, metrics)
    if not done:
        raise DlrunError(
            f"none of the {len(skipped)} image(s) in {source} could be read, e.g. {skipped[0]}: "
            f"give image files PIL can open ({', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    probs = torch.softmax(torch.cat(outs), -1)
    k = min(args.top_k, len(classes))
    write_predictions(output, done, probs, classes, k, labels is not None)
    result = outputs.Result(output, len(done), "images", scores, skipped)
    if args.tta:
        describe_tta(result, net, pixels, ys, labels is not None)
    if kind == "folder" and labels is None and any(len(p.relative_to(source).parts) > 1 for p in paths):
        result.notes.append(
            f"no accuracy: it is measured when every image is in a folder named after a class "
            f"({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''})"
        )
    if kind == "image":
        p = probs[0]
        result.notes.append(f"{done[0][0]}: {classes[int(p.argmax())]} (probability {float(p.max()):.4f})")
    return result


# --- finding the images ---------------------------------------------------------------


def find_inputs(source: Path) -> tuple[list[Path], list[str], str]:
    """(image paths, those named but missing, kind: image | folder | list) for INPUT."""
    if source.is_dir():
        paths = sorted(
            p
            for p in source.rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES
            and p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(source).parts)
        )
        if not paths:
            raise DlrunError(
                f"no images in {source} (looked for {', '.join(sorted(IMAGE_SUFFIXES))}, in subfolders "
                f"too): give a folder of images, an image, or a list file of image paths"
            )
        return paths, [], "folder"
    suffix = source.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return [source], [], "image"
    if suffix not in LIST_SUFFIXES:
        raise DlrunError(
            f"INPUT {source} is neither an image ({', '.join(sorted(IMAGE_SUFFIXES))}) nor a list of "
            f"image paths (.txt or .csv, one path per line): an image run predicts images"
        )
    named = list_file(source)
    if not named:
        raise DlrunError(f"{source} names no images: write one image path per line")
    paths = [p for p, _ in named if p.is_file()]
    missing = [f"{p} (no such file, line {line} of {source})" for p, line in named if not p.is_file()]
    return paths, missing, "list"


def list_file(source: Path) -> list[tuple[Path, int]]:
    """(path, line number) for each path a list file names: the first column of a .csv (a first
    row that is no image's name is its header), the whole line of a .txt."""
    import csv

    try:
        with source.open(newline="", encoding="utf-8-sig") as f:
            if source.suffix.lower() == ".csv":
                rows = [(row[0].strip() if row else "") for row in csv.reader(f)]
                if rows and Path(rows[0]).suffix.lower() not in IMAGE_SUFFIXES:
                    rows[0] = ""  # the header (`path`, as `dlrun predict` writes it)
            else:
                rows = [line.strip() for line in f]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DlrunError(f"cannot read the list file {source} ({first_line(e)})") from None
    folder = source.parent
    return [(folder / Path(name).expanduser(), i + 1) for i, name in enumerate(rows) if name]


def folder_labels(source: Path, paths: list[Path], classes: list[str]) -> list[int] | None:
    """Each image's class when every image is under a folder of INPUT named after a class (a
    class with a slash, Fashion-MNIST's `T-shirt/top`, is a folder in a folder)."""
    folders = {tuple(c.split("/")): i for i, c in enumerate(classes)}
    labels = []
    for path in paths:
        parts = path.relative_to(source).parts
        label = next((folders[parts[:n]] for n in range(1, len(parts)) if parts[:n] in folders), None)
        if label is None:
            return None
        labels.append(label)
    return labels


# --- reading pixels as validation did ---------------------------------------------------


def read_batches(
    paths: list[Path],
    labels: list[int] | None,
    pixels: Any,
    bs: int,
    pool: ThreadPoolExecutor,
    done: list[tuple[Path, int | None]],
    ys: list[Any],
    skipped: list[str],
) -> Iterator[tuple[list[torch.Tensor], Any]]:
    """Batches of `bs` images in input order as (views, labels or None); the images read go to
    `done`, the labels to `ys`, the files that cannot be read to `skipped`."""

    def read(path: Path) -> list[torch.Tensor] | str:
        try:
            return pixels.read(path)
        except UnidentifiedImageError:
            return f"{path} (not an image file PIL can read)"
        except Exception as e:  # PIL raises several types for broken or truncated files
            return f"{path} ({first_line(e)})"

    for start in range(0, len(paths), bs):
        good, kept = [], []
        for i, got in enumerate(pool.map(read, paths[start : start + bs]), start):
            if isinstance(got, str):
                skipped.append(got)
            else:
                good.append(got)
                kept.append(i)
        if not good:
            continue
        done.extend((paths[i], labels[i] if labels is not None else None) for i in kept)
        y = torch.tensor([labels[i] for i in kept], device=pixels.device) if labels is not None else None
        ys.append(y)
        yield pixels.batch(good), y


class FilePixels:
    """imagefolder runs: `ImageFiles`' validation transform, uint8 normalised on the device as
    `LoaderBatches` does. With TTA each image is also read at size / CORNER, for its corners."""

    def __init__(self, prep: dict[str, Any], device: torch.device, tta: bool):
        size = int(prep["size"][0])
        self.device, self.size = device, size
        self.centre = ImageFiles([], size, train=False)
        self.large = ImageFiles([], round(size / CORNER), train=False) if tta else None
        self.flip = bool(prep["augment"].get("flip", False))
        self.mean = torch.tensor(prep["mean"], device=device).reshape(1, 3, 1, 1) * 255
        self.std = torch.tensor(prep["std"], device=device).reshape(1, 3, 1, 1) * 255
        self.memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format

    def read(self, path: Path) -> list[torch.Tensor]:
        """The centre view as uint8 [3, size, size] (and the larger one for TTA)."""
        out = []
        for files in (self.centre, self.large) if self.large is not None else (self.centre,):
            with Image.open(path) as im:  # opened again: a JPEG's draft scale is set before loading
                out.append(pil_to_tensor(files.transform(im, None)))  # validation draws nothing
        return out

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return ((x.float() - self.mean) / self.std).contiguous(memory_format=self.memory_format)

    def batch(self, images: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        """The model's inputs: the centre view, then the TTA views."""
        centre = self.normalise(torch.stack([v[0] for v in images]))
        if self.large is None:
            return [centre]
        large, s = self.normalise(torch.stack([v[1] for v in images])), self.size
        corners = [large[..., :s, :s], large[..., :s, -s:], large[..., -s:, :s], large[..., -s:, -s:]]
        return [centre] + ([centre.flip(-1)] if self.flip else []) + corners

    def describe(self) -> str:
        return f"{'mirrored, ' if self.flip else ''}4 corner crops of {CORNER:.0%} of the side"


class TensorPixels:
    """Runs on whole tensors (digits, MNIST, CIFAR-10): floats in [0, 1], resized bilinearly to
    the run's size when needed, normalised; TTA shifts fill the border with a black pixel."""

    def __init__(self, prep: dict[str, Any], device: torch.device, tta: bool):
        self.device, self.tta = device, tta
        self.mode = "L" if int(prep["channels"]) == 1 else "RGB"
        self.size = tuple(int(v) for v in prep["size"])
        self.mean = torch.tensor(prep["mean"], dtype=torch.float32, device=device).reshape(1, -1, 1, 1)
        self.std = torch.tensor(prep["std"], dtype=torch.float32, device=device).reshape(1, -1, 1, 1)
        self.black = (0.0 - self.mean) / self.std  # as training pads its random crops
        augment = prep.get("augment") or {}
        self.flip = bool(augment.get("flip", False))
        self.shift = max(1, int(augment.get("crop_pad", 0)))
        self.memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format

    def read(self, path: Path) -> list[torch.Tensor]:
        with Image.open(path) as im:
            return [pil_to_tensor(im.convert(self.mode))]

    def pixels(self, x: torch.Tensor) -> torch.Tensor:
        """One image as training saw it before normalising: [0, 1], at the run's size."""
        x = x.to(self.device).float().div_(255)
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x[None], size=self.size, mode="bilinear", align_corners=False)[0]
        return x

    def batch(self, images: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        x = torch.stack([self.pixels(v[0]) for v in images])
        x = ((x - self.mean) / self.std).contiguous(memory_format=self.memory_format)
        if not self.tta:
            return [x]
        p, (h, w) = self.shift, x.shape[-2:]
        padded = F.pad(x - self.black, (p, p, p, p)) + self.black
        shifted = [padded[..., i : i + h, j : j + w] for i in (0, 2 * p) for j in (0, 2 * p)]
        return [x] + ([x.flip(-1)] if self.flip else []) + shifted

    def describe(self) -> str:
        return f"{'mirrored, ' if self.flip else ''}4 diagonal shifts of {self.shift} pixel(s)"


# --- test-time augmentation --------------------------------------------------------------


class TTA:
    """The model over all views of a batch: the log of the mean class probabilities (so the
    loss is the cross-entropy of the averaged probabilities). The centre view's outputs are
    kept, to say what TTA changed."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.views = 0
        self.centre: list[torch.Tensor] = []

    def __call__(self, views: list[torch.Tensor]) -> torch.Tensor:
        outs = [self.model(v).float() for v in views]
        self.views = len(outs)
        self.centre.append(outs[0])
        probs = torch.stack([o.softmax(-1) for o in outs]).mean(0)
        return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()


def describe_tta(result: outputs.Result, net: TTA, pixels: Any, ys: list[Any], labelled: bool) -> None:
    """Say which views were averaged and, with labels, the metrics without TTA beside them."""
    views = f"TTA: {net.views} views per image (centre, {pixels.describe()})"
    if not labelled:
        result.notes.append(views)
        return
    _, plain = outputs.run(lambda out: out, zip(net.centre, ys), 0, "images", classification_loss, Accuracy())
    tta = dict(result.metrics)
    result.metrics.update({f"{k}_no_tta": v for k, v in plain.items()})
    change = tta["accuracy"] - plain["accuracy"]
    result.notes.append(
        f"{views}: accuracy {plain['accuracy']:.4f} without, {tta['accuracy']:.4f} with ({change:+.4f}); "
        f"valid_loss {plain['valid_loss']:.4f} without, {tta['valid_loss']:.4f} with"
    )


# --- writing ------------------------------------------------------------------------------


def write_predictions(
    output: Path,
    done: list[tuple[Path, int | None]],
    probs: torch.Tensor,
    classes: list[str],
    k: int,
    labelled: bool,
) -> None:
    """path, prediction, probability, class_2, prob_2 ... class_k, prob_k (and label)."""
    top_p, top_i = probs.topk(k, -1)
    header = ["path", "prediction", "probability"]
    for j in range(2, k + 1):
        header += [f"class_{j}", f"prob_{j}"]
    header += ["label"] if labelled else []

    def rows() -> Iterator[list[Any]]:
        for (path, label), ps, ids in zip(done, top_p.tolist(), top_i.tolist()):
            row: list[Any] = [str(path)]
            for p, i in zip(ps, ids):
                row += [classes[i], f"{p:.6g}"]
            yield row + ([classes[label]] if labelled else [])

    outputs.write_csv(output, header, rows())
