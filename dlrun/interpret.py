"""`dlrun interpret RUN_DIR`: where a trained model goes wrong on its validation split, as
fastai's `ClassificationInterpretation` shows it.

The validation split is rebuilt from the run's saved config as `dlrun eval` rebuilds it, and
each item's output, target and loss are collected in one pass. Then, in `RUN_DIR/interpret/`:

- classification (images, tables): the confusion matrix (`confusion.csv`, `confusion.png`),
  the most confused pairs (`most_confused.csv`, and printed), and the top losses: for images a
  grid of the worst images (`top_losses.png`, titled prediction/actual/loss/probability of the
  prediction, as fastai's `plot_top_losses`), for tables the worst rows as the file holds them
  (`top_losses.csv`);
- regression tables: predictions against targets on the original scale (`pred_vs_actual.png`),
  the residuals by the categorical column with the most levels (`residuals.png`,
  `residuals.csv`) and the worst rows (`top_losses.csv`).

Language models are not classifiers: `dlrun predict RUN_DIR FILE` gives their perplexity.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dlrun import report, rundir
from dlrun.errors import DlrunError, parse_args
from dlrun.outputs import BAR_AFTER, write_csv

USAGE = "dlrun interpret RUN_DIR [-o DIR] [--top N] [--weights best|last] [--device D]"
FOLDER = "interpret"  # RUN_DIR/interpret/ unless -o says otherwise
MAX_CLASSES = 20  # a confusion matrix larger than this is unreadable: the most confused classes only
MAX_LEVELS = 20  # residuals.png shows this many of the most frequent levels
MAX_GRID = 64  # top_losses.png shows at most this many images (top_losses.csv lists them all)
MAX_POINTS = 20_000  # pred_vs_actual.png draws a fixed sample of this many rows at most
SHOW_PAIRS = 10  # most confused pairs printed (most_confused.csv has them all)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dlrun interpret",
        description="Confusion matrix, most confused classes and top losses of a run's validation split "
        "(regression tables: predicted vs actual and residuals).",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by dlrun train")
    parser.add_argument(
        "-o", "--output", default=None, metavar="DIR", help=f"the folder to write (default: RUN_DIR/{FOLDER})"
    )
    parser.add_argument(
        "--top", type=int, default=9, metavar="N", help="the N worst validation items to show (9)"
    )
    rundir.add_weights_option(parser)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default=None)
    args = parse_args(parser, argv, USAGE)
    if args.top < 1:
        raise DlrunError(f"--top {args.top} is not allowed: show at least 1 item")
    return args


def main(argv: list[str]) -> None:
    """Entry point of `dlrun interpret`."""
    from dlrun.config import load_saved
    from dlrun.evaluate import rebuild

    args = parse(argv)
    weights = rundir.WEIGHTS[args.weights]
    path = rundir.existing_run(args.run_dir, need=weights)
    cfg = load_saved(path)
    if cfg.data.get("family") == "text":
        raise DlrunError(
            f"{args.run_dir} is a language model: it predicts the next token, there are no classes to "
            f"confuse; `dlrun predict {args.run_dir} FILE.txt` gives its perplexity on a text"
        )
    out_dir = Path(args.output).expanduser() if args.output else path / FOLDER
    if out_dir.exists() and not out_dir.is_dir():
        raise DlrunError(f"-o {out_dir} is a file: give a folder to write the plots and tables into")
    learner = rebuild(str(path), weights, args.device)
    family = learner.data.inputs.get("family")
    if family not in ("images", "table"):
        raise DlrunError(
            f"{args.run_dir} trained on data.kind={cfg.data.kind}: dlrun interpret knows image and table runs"
        )
    table = family == "table"
    task = learner.data.facts.task if table else "classification"
    items = collect(learner, task, 0 if table else args.top)
    out_dir.mkdir(parents=True, exist_ok=True)
    if task == "classification":
        written = classification(items, learner.data, out_dir, args.top, cfg.data if table else None)
    else:
        written = regression(items, learner.data, out_dir, args.top, cfg.data)
    report.console.print(
        f"wrote {', '.join(written)} in {out_dir}", markup=False, highlight=False, soft_wrap=True
    )


# --- one pass over the validation split ---------------------------------------------


@dataclass
class Items:
    """Each validation item's output, target and loss (CPU, float32 outputs), and the inputs of
    the worst `keep` items (images: what `top_losses.png` shows)."""

    out: Any  # [N, n_out]
    y: Any  # [N]
    loss: Any  # [N]
    worst: Any = None  # [keep] positions in the split, worst first
    worst_x: Any = None  # their inputs, as the model saw them


def collect(learner: Any, task: str, keep: int) -> Items:
    """Run the validation split through the model as `dlrun eval` does (eval mode, the run's
    precision), keeping each item's loss (reduction='none') and the inputs of the `keep` worst."""
    import torch
    import torch.nn.functional as F

    def item_loss(out: Any, y: Any) -> Any:
        if task == "classification":
            return F.cross_entropy(out, y, reduction="none")
        return (out.squeeze(-1) - y.float()).square()  # the run's MSE, per row

    valid = learner.data.valid
    learner.model.eval()
    learner.reset_state()
    outs, ys, losses = [], [], []
    worst, worst_loss, worst_x = torch.zeros(0, dtype=torch.long), torch.zeros(0), None
    seen = 0
    bar = report.bar(len(valid) if len(valid) >= BAR_AFTER else 0, "validation batches")
    with bar as advance, torch.no_grad():
        for x, y in valid.epoch(0):
            with learner.autocast():
                out = learner.model(x)
            out = out.float()
            loss = item_loss(out, y).cpu()
            outs.append(out.cpu())
            ys.append(y.cpu())
            losses.append(loss)
            if keep:
                # Keep only the worst `keep` so far: the whole split's images need not fit in memory.
                pos = torch.cat([worst, torch.arange(seen, seen + len(loss))])
                cand = torch.cat([worst_loss, loss])
                xs = x.float().cpu() if worst_x is None else torch.cat([worst_x, x.float().cpu()])
                top = cand.topk(min(keep, len(cand))).indices
                worst, worst_loss, worst_x = pos[top], cand[top], xs[top]
            seen += len(loss)
            advance()
    return Items(torch.cat(outs), torch.cat(ys), torch.cat(losses), worst, worst_x)


# --- classification -------------------------------------------------------------------


def classification(items: Items, data: Any, out_dir: Path, top: int, table_cfg: Any) -> list[str]:
    """Confusion matrix, most confused pairs and top losses (`table_cfg`: a table's data config,
    None for images); returns the files written."""
    classes = list(data.facts.classes)
    probs = items.out.softmax(-1)
    pred = probs.argmax(-1).numpy()
    actual = items.y.numpy()
    cm = confusion(actual, pred, len(classes))
    write_csv(out_dir / "confusion.csv", ["actual \\ predicted", *classes], (
        [c, *row] for c, row in zip(classes, cm.tolist())
    ))  # fmt: skip
    plot_confusion(cm, classes, out_dir / "confusion.png")
    pairs = most_confused(cm, classes)
    write_csv(out_dir / "most_confused.csv", ["actual", "predicted", "count"], pairs)
    tell_confusion(cm, pairs, "rows" if table_cfg is not None else data.unit)
    written = ["confusion.csv", "confusion.png", "most_confused.csv"]
    order = items.loss.argsort(descending=True, stable=True)[:top].numpy()
    worst = {
        "actual": [classes[i] for i in actual[order]],
        "predicted": [classes[i] for i in pred[order]],
        "loss": items.loss.numpy()[order],
        "probability": probs.max(-1).values.numpy()[order],  # of the prediction, as fastai shows it
    }
    if table_cfg is not None:
        write_table_rows(valid_rows(table_cfg, len(actual)), order, worst, out_dir / "top_losses.csv")
        return [*written, "top_losses.csv"]
    files = valid_files(data.valid)
    header = ["item", *(["file"] if files else []), *worst]
    write_csv(out_dir / "top_losses.csv", header, (
        [int(i), *([files[i]] if files else []), a, p, f"{loss:.6g}", f"{prob:.6g}"]
        for i, a, p, loss, prob in zip(order, *worst.values())
    ))  # fmt: skip
    plot_top_images(
        items, data.facts, classes, probs, out_dir / "top_losses.png", min(len(items.worst), MAX_GRID)
    )
    if len(order) > MAX_GRID:
        report.console.print(
            f"top_losses.png shows the {MAX_GRID} worst images; top_losses.csv lists all {len(order)}",
            markup=False,
        )
    return [*written, "top_losses.png", "top_losses.csv"]


def tell_confusion(cm: Any, pairs: list[list[Any]], what: str) -> None:
    """The accuracy, and the most confused pairs as a table."""
    import numpy as np

    n, right = int(cm.sum()), int(np.trace(cm))
    out = report.console
    out.print(
        f"accuracy {report.fmt(right / max(n, 1))} on {n} validation {what}", markup=False, highlight=False
    )
    if pairs:
        out.print(
            report.table(
                f"most confused ({n - right} mistakes)", ["actual", "predicted", "count"], pairs[:SHOW_PAIRS]
            )
        )
    else:
        out.print("no validation item is misclassified", markup=False)


def confusion(actual: Any, pred: Any, n_classes: int) -> Any:
    """Counts [actual, predicted]."""
    import numpy as np

    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (actual, pred), 1)
    return cm


def most_confused(cm: Any, classes: list[str]) -> list[list[Any]]:
    """(actual, predicted, count) of every pair of different classes confused at least once,
    most often first (fastai's `most_confused(min_val=1)`)."""
    pairs = [
        [classes[a], classes[p], int(cm[a, p])]
        for a in range(len(classes))
        for p in range(len(classes))
        if a != p and cm[a, p] > 0
    ]
    return sorted(pairs, key=lambda r: -r[2])


def shown_classes(cm: Any) -> list[int]:
    """The classes confusion.png shows: all of them up to MAX_CLASSES, else the MAX_CLASSES with
    the most mistakes (as actual or as predicted), in class order."""
    import numpy as np

    n = len(cm)
    if n <= MAX_CLASSES:
        return list(range(n))
    off = cm - np.diag(np.diag(cm))
    mistakes = off.sum(0) + off.sum(1)
    return sorted(np.argsort(-mistakes, kind="stable")[:MAX_CLASSES].tolist())


def plot_confusion(cm: Any, classes: list[str], path: Path) -> None:
    """confusion.png: counts, actual classes down, predicted across, as fastai plots them."""
    plt = report.pyplot()
    keep = shown_classes(cm)
    sub = cm[keep][:, keep]
    names = [short(classes[i]) for i in keep]
    side = max(4.0, 0.45 * len(keep) + 2)
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(sub, cmap="Blues")
    ticks = range(len(keep))
    ax.set_xticks(ticks, names, rotation=90 if max(map(len, names)) > 3 else 0)
    ax.set_yticks(ticks, names)
    high = sub.max() / 2 if sub.size else 0
    for i in ticks:
        for j in ticks:
            ax.text(j, i, str(sub[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if sub[i, j] > high else "black")  # fmt: skip
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    title = "confusion matrix"
    if len(keep) < len(classes):
        title += f" ({len(keep)} most confused of {len(classes)} classes)"
    ax.set_title(title)
    report.save_figure(fig, path)


def plot_top_images(items: Items, facts: Any, classes: list[str], probs: Any, path: Path, n: int) -> None:
    """top_losses.png: the `n` worst validation images, denormalised with the run's mean and std,
    each titled prediction/actual, then loss / probability of the prediction (fastai's layout)."""
    import torch

    plt = report.pyplot()
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.7 * rows), squeeze=False)
    mean = torch.tensor(facts.mean).reshape(-1, 1, 1)
    std = torch.tensor(facts.std).reshape(-1, 1, 1)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= n:
            continue
        i = int(items.worst[k])
        img = (items.worst_x[k] * std + mean).clamp(0, 1)
        p = int(probs[i].argmax())
        if img.shape[0] == 1:
            ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        else:
            ax.imshow(img.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(
            f"{short(classes[p])}/{short(classes[int(items.y[i])])}\n"
            f"{float(items.loss[i]):.2f} / {float(probs[i, p]):.2f}",
            fontsize=8,
        )
    fig.suptitle("prediction/actual\nloss / probability", fontsize=10)
    report.save_figure(fig, path)


def valid_files(valid: Any) -> list[str] | None:
    """The validation split's image files, in batch order, when it is read from files
    (data=imagefolder); None for images held as tensors."""
    dataset = getattr(getattr(valid, "loader", None), "dataset", None)
    found = getattr(dataset, "items", None)
    return [str(f) for f, _ in found] if found is not None else None


# --- tables ------------------------------------------------------------------------------


def valid_rows(dcfg: Any, n_valid: int) -> Any:
    """The validation rows as the file holds them (`tabular.valid_frame`), in batch order."""
    from dlrun.data.tabular import valid_frame

    frame = valid_frame(dcfg)
    if len(frame) != n_valid:  # the file changed after the run rebuilt its split from it
        raise DlrunError(
            f"{dcfg.get('path')} now has {len(frame)} validation rows, the run's split {n_valid}: "
            "the file changed while interpret read it; run it again"
        )
    return frame


def write_table_rows(frame: Any, order: Any, added: dict[str, Any], path: Path) -> None:
    """top_losses.csv: the validation rows at `order` as the file holds them (`row` counts the
    file's data rows from 1, as dlrun's messages do), then the columns in `added`."""
    worst = frame.iloc[order].copy()
    worst.insert(0, "row", worst.index + 1)
    for name, values in added.items():
        worst[name] = [v if isinstance(v, str) else f"{float(v):.6g}" for v in values]
    rundir.write_atomic(path, lambda f: worst.to_csv(f, index=False, lineterminator="\n"))


def regression(items: Items, data: Any, out_dir: Path, top: int, dcfg: Any) -> list[str]:
    """Predicted vs actual, residuals by the largest categorical column, the worst rows."""
    import numpy as np

    from dlrun.data.tabular import MISSING, as_levels, saved_prep

    prep = saved_prep(data.inputs)
    pred = items.out.squeeze(-1).double().numpy()
    actual = items.y.double().numpy()
    if prep.log_y:
        pred, actual = np.exp(pred), np.exp(actual)
    residual = actual - pred
    out = report.console
    rmse, mae = float(np.sqrt(np.mean(residual**2))), float(np.mean(np.abs(residual)))
    out.print(
        f"rmse {report.fmt(rmse)}, mae {report.fmt(mae)} on {len(actual)} validation rows",
        markup=False,
        highlight=False,
    )
    plot_pred_vs_actual(actual, pred, prep.y_name, prep.log_y, out_dir / "pred_vs_actual.png")
    written = ["pred_vs_actual.png"]
    frame = valid_rows(dcfg, len(actual))
    if prep.cat_names:
        column = max(prep.cat_names, key=lambda c: len(prep.levels[c]))
        levels = as_levels(frame[column]).fillna(MISSING).to_numpy()
        rows = residuals_by_level(levels, residual)
        write_csv(out_dir / "residuals.csv", [column, "count", "mean_residual", "rmse"], (
            [lv, k, f"{m:.6g}", f"{r:.6g}"] for lv, k, m, r in rows
        ))  # fmt: skip
        plot_residuals(levels, residual, rows, column, prep.y_name, out_dir / "residuals.png")
        written += ["residuals.png", "residuals.csv"]
    else:
        out.print("no categorical column: no residuals by level", markup=False)
    order = items.loss.argsort(descending=True, stable=True)[:top].numpy()
    added = {"actual": actual[order], "predicted": pred[order], "loss": items.loss.numpy()[order]}
    write_table_rows(frame, order, added, out_dir / "top_losses.csv")
    return [*written, "top_losses.csv"]


def residuals_by_level(levels: Any, residual: Any) -> list[tuple[str, int, float, float]]:
    """(level, rows, mean residual, rmse) of each level, most frequent first."""
    import pandas as pd

    frame = pd.DataFrame({"level": levels, "r": residual})
    groups = frame.groupby("level", sort=False)["r"]
    stats = pd.DataFrame({"count": groups.size(), "mean": groups.mean(), "rmse": groups.apply(
        lambda r: float((r**2).mean() ** 0.5)
    )})  # fmt: skip
    stats = stats.reset_index().sort_values(["count", "level"], ascending=[False, True], kind="stable")
    return [(str(lv), int(k), float(m), float(r)) for lv, k, m, r in stats.itertuples(index=False)]


def plot_pred_vs_actual(actual: Any, pred: Any, y_name: str, log_y: bool, path: Path) -> None:
    """pred_vs_actual.png: one point per validation row (a fixed sample of a large split) on the
    target's own scale, and the diagonal where a perfect model's points would lie."""
    import numpy as np

    plt = report.pyplot()
    if len(actual) > MAX_POINTS:
        pick = np.random.default_rng(0).choice(len(actual), MAX_POINTS, replace=False)
        actual, pred = actual[pick], pred[pick]
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    ax.scatter(actual, pred, s=8, alpha=0.4, linewidths=0, rasterized=True)
    lo, hi = float(min(actual.min(), pred.min())), float(max(actual.max(), pred.max()))
    ax.plot([lo, hi], [lo, hi], color="black", linewidth=1, label="predicted = actual")
    ax.set_xlabel(f"actual {y_name}")
    ax.set_ylabel(f"predicted {y_name}")
    ax.set_title(f"validation rows ({'exp of the log-scale prediction' if log_y else 'original scale'})")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    report.save_figure(fig, path)


def plot_residuals(
    levels: Any, residual: Any, rows: list[tuple], column: str, y_name: str, path: Path
) -> None:
    """residuals.png: the residuals (actual - predicted) of the MAX_LEVELS most frequent levels of
    `column` (`rows`: `residuals_by_level`), one box each, the mean marked."""
    plt = report.pyplot()
    shown = rows[:MAX_LEVELS]
    groups = [residual[levels == lv] for lv, *_ in shown]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.4 * len(shown) + 2), 5))
    ax.boxplot(groups, showmeans=True, flierprops={"markersize": 2})
    ax.set_xticks(range(1, len(shown) + 1), [f"{short(lv)} ({k})" for lv, k, *_ in shown], rotation=90)
    ax.axhline(0, color="black", linewidth=1)
    ax.set_ylabel(f"actual - predicted {y_name}")
    ax.set_xlabel(f"{column} (validation rows)")
    more = f"\n(the {len(shown)} most frequent of {len(rows)} levels)" if len(rows) > len(shown) else ""
    ax.set_title(f"residuals by {column}{more}")
    ax.grid(axis="y", alpha=0.3)
    report.save_figure(fig, path)


# --- plotting -------------------------------------------------------------------------


def short(name: str, width: int = 15) -> str:
    """A class or level name cut to fit a tick label or a title."""
    return name if len(name) <= width else name[: width - 1] + "…"
