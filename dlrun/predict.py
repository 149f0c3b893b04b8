"""`dlrun predict RUN_DIR INPUT`: apply a trained model to new data, from the run directory alone.

The model and its preprocessing come from `model.json` and `best.pt` (`dlrun.saved`); the
training data is never read. Per family:

- tables: INPUT is a CSV with the training columns (in any order; extra columns are ignored,
  the target may be there or not). One output row per input row: the `--id` column, the
  prediction under the target's name (a class, or a value on the original scale with log_y)
  and, for classes, each class's probability. With the target present the metrics are
  computed as in training. A value that cannot be read (text in a number column, a bad date)
  refuses the file, naming the row: a submission with a row missing would be wrong.
- images: `dlrun.predict_images` (files, folders and list files; --top-k, --tta).
- text: the perplexity of INPUT under the model (and bits per character for characters).

Batches are run on the auto device in fp32, in the order of the input and with the run's own
batch size, so predicting the validation rows reproduces `dlrun eval`'s metrics exactly.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from dlrun import report, rundir
from dlrun.errors import DlrunError, parse_args
from dlrun.outputs import Result, run, write_csv

USAGE = (
    "dlrun predict RUN_DIR INPUT [-o FILE] [--id COL] [--skip-rows N] [--no-probs] [--top-k K] [--tta] "
    "[--bs N] [--device D] [--weights best|last] [--json FILE]"
)
PREDICTIONS = "predictions"  # RUN_DIR/predictions/<input>.csv unless -o says otherwise


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dlrun predict",
        description="Apply a trained model to new data: a CSV table, images, or a text file.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by dlrun train")
    parser.add_argument(
        "input", metavar="INPUT", help="a CSV file (tables), an image, a folder or a list file (images), "
        "a text file (language models)"
    )  # fmt: skip
    parser.add_argument(
        "-o", "--output", default=None,
        help=f"the CSV to write (default: RUN_DIR/{PREDICTIONS}/<INPUT name>.csv)",
    )  # fmt: skip
    parser.add_argument(
        "--id", default=None, metavar="COL", help="tables: copy this column first (Kaggle's Id)"
    )
    parser.add_argument(
        "--skip-rows", type=int, default=0, metavar="N", help="tables: lines to skip above the table"
    )
    parser.add_argument(
        "--no-probs", dest="probs", action="store_false", help="tables: leave out the class probabilities"
    )
    parser.add_argument("--top-k", type=int, default=3, metavar="K", help="images: classes per image (3)")
    parser.add_argument(
        "--tta", action="store_true", help="images: average the centre crop with flipped and shifted ones"
    )
    parser.add_argument("--bs", type=int, default=None, help="batch size (default: the run's data.bs)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto")
    rundir.add_weights_option(parser)
    parser.add_argument(
        "--json", default=None, metavar="FILE", help="also write the summary (metrics...) here"
    )
    args = parse_args(parser, argv, USAGE)
    if args.bs is not None and args.bs < 1:
        raise DlrunError(f"--bs {args.bs} is not allowed: give a batch size of at least 1")
    if args.skip_rows < 0:
        raise DlrunError(f"--skip-rows {args.skip_rows} is not allowed: give 0 or more lines")
    if args.top_k < 1:
        raise DlrunError(f"--top-k {args.top_k} is not allowed: give at least 1")
    return args


def main(argv: list[str]) -> None:
    """Entry point of `dlrun predict`."""
    from dlrun import saved

    args = parse(argv)
    source = Path(args.input).expanduser()
    if not source.exists():
        raise DlrunError(f"INPUT {args.input} does not exist: give the file (or folder) to predict")
    model = saved.load(args.run_dir, rundir.WEIGHTS[args.weights], args.device)
    output = Path(args.output).expanduser() if args.output else default_output(model.run_dir, source)
    if output.exists() and output.is_dir():
        raise DlrunError(f"-o {output} is a folder: give a file name, e.g. -o {output / 'predictions.csv'}")
    if model.family != "table" and args.id is not None:
        raise DlrunError(f"--id names a column of a table, but {args.run_dir} is a {model.family} model")
    if model.family == "table":
        result = predict_table(model, source, output, args)
    elif model.family == "text":
        result = predict_text(model, source, output, args)
    else:
        from dlrun import predict_images

        result = predict_images.predict(model, source, output, args)
    tell(result)
    if args.json:
        summary = {
            "run_dir": str(model.run_dir),
            "input": str(source),
            "output": str(result.output) if result.output else None,
            "rows": result.rows,
            "metrics": result.metrics,
            "skipped": result.skipped,
            "notes": result.notes,
        }
        rundir.write_json(Path(args.json).expanduser(), summary)


def default_output(run_dir: Path, source: Path) -> Path:
    """RUN_DIR/predictions/<input name>.csv (a folder keeps its name)."""
    name = source.resolve().name or "input"
    folder = run_dir / PREDICTIONS
    folder.mkdir(exist_ok=True)
    return folder / f"{Path(name).stem if source.is_file() else name}.csv"


def tell(result: Result) -> None:
    """What was written, what was measured, and what was left out."""
    out = report.console
    for line in result.notes:
        out.print(line, markup=False, highlight=False, soft_wrap=True)
    if result.skipped:
        report.err_console.print(
            f"skipped {len(result.skipped)} input(s) that could not be read:", style="yellow", markup=False
        )
        for item in result.skipped[:20]:
            report.err_console.print(f"  {item}", markup=False, highlight=False)
        if len(result.skipped) > 20:
            report.err_console.print(f"  ... and {len(result.skipped) - 20} more", markup=False)
    if result.metrics:
        shown = ", ".join(f"{k} {report.fmt(v)}" for k, v in result.metrics.items())
        out.print(f"{shown} ({result.rows} {result.what})", markup=False, highlight=False, soft_wrap=True)
    if result.output is not None:
        out.print(f"wrote {result.output}", markup=False, highlight=False, soft_wrap=True)


# --- tables ---------------------------------------------------------------------------


def predict_table(model: Any, source: Path, output: Path, args: argparse.Namespace) -> Result:
    """One row of predictions per input row (see the module's docstring)."""
    import numpy as np
    import torch

    from dlrun.data import tabular

    prep = tabular.saved_prep(model.prep)
    if not source.is_file():
        raise DlrunError(f"INPUT {source} is not a file: a table model predicts the rows of one CSV file")
    df = tabular.read_inputs(source, prep, args.id, args.skip_rows)
    cat, cont = prep.features(df)
    has_y = prep.y_name in df.columns
    y = target_for_metrics(prep, df) if has_y else None
    bs = args.bs or int(model.prep.get("bs") or 256)
    dev = model.device
    cat_t, cont_t = torch.from_numpy(cat).to(dev), torch.from_numpy(cont).to(dev)
    y_t = torch.from_numpy(y).to(dev) if y is not None else None
    known = None
    if y_t is not None and prep.task == "classification":
        known = y_t >= 0  # rows whose class the run never saw have no score

    def batches() -> Iterator[tuple[Any, Any]]:
        for i in range(0, len(df), bs):
            sl = slice(i, i + bs)
            x = (cat_t[sl], cont_t[sl])
            yield x, (y_t[sl] if y_t is not None else None)

    loss_fn, metrics = table_scoring(prep, y)
    outs, scores = run(
        model.model,
        batches(),
        math.ceil(len(df) / bs),
        "rows",
        loss_fn,
        metrics,
        count=lambda yb: int((yb >= 0).sum()) if prep.task == "classification" else yb.shape[0],
    )
    out = torch.cat(outs) if outs else torch.zeros((0, max(len(prep.classes), 1)))
    header, columns = [], []
    if args.id is not None:
        header.append(args.id)
        columns.append(df[args.id].astype("string").fillna("").tolist())
    header.append(prep.y_name)
    if prep.task == "classification":
        probs = torch.softmax(out, -1).numpy()
        columns.append([prep.classes[i] for i in probs.argmax(1)])
        if args.probs:
            for j, c in enumerate(prep.classes):
                header.append(f"prob_{c}")
                columns.append([f"{p:.6g}" for p in probs[:, j]])
    else:
        pred = out.squeeze(-1).double().numpy()
        pred = np.exp(pred) if prep.log_y else pred
        columns.append([f"{v:.8g}" for v in pred])
    write_csv(output, header, zip(*columns))
    result = Result(output, len(df), "rows", scores)
    if known is not None and not bool(known.all()):
        unseen = int((~known).sum())
        result.notes.append(
            f"{unseen} row(s) have a {prep.y_name} the run never saw (not one of {', '.join(prep.classes)}): "
            f"they are predicted but left out of the metrics"
        )
    return result


def target_for_metrics(prep: Any, df: Any) -> Any:
    """The input's target as training encoded it; rows without a target value are an error
    (leave the column out to predict without scoring)."""
    import numpy as np

    col = df[prep.y_name]
    if col.isna().any():
        row = int(np.flatnonzero(col.isna().to_numpy())[0])
        raise DlrunError(
            f"INPUT has a {prep.y_name!r} column with a gap in data row {row + 1}: predictions are scored "
            f"against it when it is there; fill it in, or drop the column to predict without scores"
        )
    return prep.target(col)


def table_scoring(prep: Any, y: Any) -> tuple[Any, Any]:
    """The loss and metrics training uses (`tabular.scoring`), for the rows with a target (with
    classes: those whose class the run knows)."""
    from dlrun.data import tabular

    if y is None:
        return None, None
    loss, metrics = tabular.scoring(prep.task, prep.log_y, y)
    if prep.task == "classification":
        return KnownOnly(loss), KnownOnlyMetrics(metrics())
    return loss, metrics()


class KnownOnly:
    """A loss over the rows whose class the run knows (target >= 0)."""

    def __init__(self, loss: Callable[[Any, Any], Any]):
        self.loss = loss

    def __call__(self, out: Any, y: Any) -> Any:
        keep = y >= 0
        if bool(keep.all()):
            return self.loss(out, y)
        return self.loss(out[keep], y[keep]) if bool(keep.any()) else out.new_zeros(())


class KnownOnlyMetrics:
    """Metrics over the rows whose class the run knows."""

    def __init__(self, metrics: Any):
        self.metrics = metrics

    def update(self, out: Any, y: Any) -> None:
        keep = y >= 0
        self.metrics.update(out[keep], y[keep])

    def compute(self, valid_loss: float) -> dict[str, float]:
        return self.metrics.compute(valid_loss)


# --- text -----------------------------------------------------------------------------


def predict_text(model: Any, source: Path, output: Path, args: argparse.Namespace) -> Result:
    """The perplexity of a text file under a language model: its tokens read as `bs` streams in
    windows of `bptt`, with the hidden state carried, as validation reads its text."""
    from dlrun.data import text

    if not source.is_file():
        raise DlrunError(f"INPUT {source} is not a file: a language model scores one text file")
    vocab = text.vocab_from(model.prep["vocab"])
    toks = vocab.tokenize(text.read_text(source))
    ids = vocab.encode(toks).to(model.device)
    if len(ids) < 2:
        raise DlrunError(f"INPUT {source} has {len(ids)} token(s): perplexity needs at least 2")
    bs = args.bs or int(model.prep.get("bs") or 1)
    bs = bs if len(ids) >= bs + 1 else 1
    bptt = int(model.prep["bptt"])
    stream = text.StreamBatches(ids, bs, bptt, "input")
    model.model.reset_state()
    _, scores = run(
        model.model,
        stream.epoch(0),
        len(stream),
        "windows",
        text.lm_loss,
        text.LanguageModelMetrics(chars=vocab.tokens == "char"),
        count=lambda y: y.numel(),
        keep=False,
    )
    scored = bs * stream.row_len
    unknown = float((ids == 0).float().mean())
    row = {"file": str(source), "tokens": scored, "unknown": round(unknown, 6), **scores}
    write_csv(output, list(row), [list(row.values())])
    what = "characters" if vocab.tokens == "char" else "tokens"
    result = Result(output, scored, f"{what} scored", scores)
    if len(ids) - 1 > scored:
        result.notes.append(
            f"{len(ids) - 1 - scored} token(s) at the end fall outside {bs} equal streams and are not scored"
        )
    if unknown > 0.05:
        result.notes.append(f"{unknown:.1%} of the tokens are not in the model's vocabulary (<unk>)")
    return result
