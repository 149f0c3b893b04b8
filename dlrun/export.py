"""`dlrun export RUN_DIR`: a trained model as one ONNX or TorchScript file, with its preprocessing.

The model comes from the run directory alone (`dlrun.saved`: model.json and the weights), on
the CPU, in eval mode (no dropout). The exported graph is a pure function of its inputs: a
model that carries state between calls (the RNN's hidden state) is wrapped so that every call
starts from a zero state and leaves none behind. `model.json` is copied beside the model file:
it says how raw rows, images or text become the inputs (levels, fill values, mean/std, vocab).

Inputs and outputs, with a dynamic batch axis N everywhere:
- tables: `cat` int64 [N, n_cat] and `cont` float32 [N, n_cont] -> `logits` [N, classes], or
  `prediction` [N, 1] for regression (on the log scale with data.log_y; model.y_range's sigmoid
  is part of the model);
- images: `images` float32 [N, C, H, W], normalised as in training -> `logits` [N, classes];
- language models: `ids` int64 [N, T] -> `logits` [N, T, vocab]; the RNN's ONNX graph takes
  exactly T = the run's bptt, the Transformer's up to its context (see `text_signature`).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.export import Dim

from dlrun import report, rundir
from dlrun.errors import DlrunError, first_line, parse_args

if TYPE_CHECKING:
    from dlrun.saved import Saved

USAGE = "dlrun export RUN_DIR [--format onnx|torchscript] [-o DIR] [--weights best|last] [--opset N]"
FILES = {"onnx": "model.onnx", "torchscript": "model.pt"}
NAMES = {"onnx": "ONNX", "torchscript": "TorchScript"}
EXPORT = "export"  # RUN_DIR/export/ unless -o says otherwise
# The batch the exporters trace with. torch.export specialises sizes 0 and 1 to constants, so
# 2; the batch axis stays dynamic (the tests run another batch size through the file).
EXAMPLE_BS = 2
# torch's ONNX exporter writes opset 18 and later; for a lower one it converts the graph
# afterwards, which fails on these models and then keeps opset 18 with only a logged warning.
MIN_OPSET = 18
INSTALL = "pip install 'dlrun[export]'"


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dlrun export",
        description="Write a trained model as ONNX or TorchScript, with its preprocessing (model.json) "
        "beside it, and print its inputs and outputs.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by dlrun train")
    parser.add_argument("--format", choices=list(FILES), default="onnx", help="onnx (default) or torchscript")
    parser.add_argument(
        "-o",
        "--output",
        default=None,
        metavar="DIR",
        help=f"the folder to write into (default RUN_DIR/{EXPORT}/)",
    )
    rundir.add_weights_option(parser)
    parser.add_argument(
        "--opset", type=int, default=None, metavar="N", help="ONNX opset (default: the exporter's own)"
    )
    args = parse_args(parser, argv, USAGE)
    if args.opset is not None:
        if args.format != "onnx":
            raise DlrunError(f"--opset applies to --format onnx, not {args.format}: drop it")
        newest = newest_opset()
        if not MIN_OPSET <= args.opset <= newest:
            raise DlrunError(
                f"--opset {args.opset} is not available: torch's ONNX exporter writes opsets "
                f"{MIN_OPSET} to {newest} (leave --opset out for its default)"
            )
    return args


def newest_opset() -> int:
    """The newest opset the installed onnx package knows (onnx must be importable)."""
    require_onnx()
    import onnx

    return onnx.defs.onnx_opset_version()


def require_onnx() -> None:
    """ONNX export needs onnx and onnxscript (torch's exporter is written in it): an optional extra."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise DlrunError(f"--format onnx needs the {e.name or 'onnx'} package: {INSTALL}") from None


def main(argv: list[str]) -> None:
    """Entry point of `dlrun export`."""
    from dlrun import saved
    from dlrun.cli import verbose

    args = parse(argv)
    if args.format == "onnx":
        require_onnx()
    run_dir = Path(args.run_dir).expanduser()
    model = saved.load(run_dir, rundir.WEIGHTS[args.weights], "cpu")
    folder = Path(args.output).expanduser() if args.output else model.run_dir / EXPORT
    if folder.exists() and not folder.is_dir():
        raise DlrunError(
            f"-o {folder} is a file: give a folder; export writes {FILES[args.format]} and model.json into it"
        )
    sig = signature(model, args.format)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DlrunError(f"cannot create the folder -o {folder} ({e.strerror}): give another one") from None
    path = folder / FILES[args.format]
    try:
        what = write(sig, path, args.format, args.opset, verbose())
    except Exception as e:
        path.unlink(missing_ok=True)  # no half-written model file that looks like an export
        if isinstance(e, DlrunError) or verbose():
            raise
        other = "torchscript" if args.format == "onnx" else "onnx"
        raise DlrunError(
            f"exporting {sig.model_name} to {NAMES[args.format]} failed "
            f"({type(e).__name__}: {first_line(e)}): run again with -v for the exporter's messages, "
            f"or try --format {other}"
        ) from None
    source, copy = model.run_dir / saved.MODEL_FILE, folder / saved.MODEL_FILE
    if copy.resolve() != source.resolve():  # -o RUN_DIR: model.json is there already
        shutil.copyfile(source, copy)
    tell(sig, path, what)


# --- what the exported graph takes and returns ----------------------------------


@dataclass
class Tensor:
    """One input or output of the exported graph, as the user sees it."""

    name: str
    dtype: str  # int64 | float32
    shape: list[int | str]  # "N" is the batch, "T" a sequence length
    what: str  # what it holds


@dataclass
class Signature:
    """A model ready to export: a module that is a pure function of its inputs, an example of
    each input (EXAMPLE_BS rows), and which of their axes stay dynamic."""

    model_name: str  # for messages: "the tabular model", "the rnn model (model.cell=qrnn)"
    module: nn.Module
    inputs: list[Tensor]
    outputs: list[Tensor]
    example: tuple[torch.Tensor, ...]
    notes: list[str] = field(default_factory=list)
    max_t: int | None = None  # the longest sequence a dynamic T axis takes (a Transformer's context)
    script: bool = False  # TorchScript: torch.jit.script (control flow kept), not torch.jit.trace

    def dynamic_shapes(self) -> tuple[dict[int, Any], ...]:
        """torch.export's dynamic_shapes: one Dim per letter, shared by the inputs that name it."""
        dims = {"N": Dim("N"), "T": Dim("T", max=self.max_t)}
        return tuple({i: dims[d] for i, d in enumerate(t.shape) if isinstance(d, str)} for t in self.inputs)


def signature(model: Saved, fmt: str) -> Signature:
    """The family's inputs and outputs around the saved model."""
    if model.family == "table":
        return table_signature(model)
    if model.family == "images":
        return image_signature(model)
    return text_signature(model, fmt)


def describe(model: Saved) -> str:
    """The model, named for a message."""
    cell = model.doc["model"]["model"].get("cell")
    return f"the {model.name} model" + (f" (model.cell={cell})" if cell else "")


class TableModel(nn.Module):
    """The tabular net with two inputs instead of one (cat, cont) pair: a graph's inputs are tensors."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, cat: torch.Tensor, cont: torch.Tensor) -> torch.Tensor:
        return self.net((cat, cont))


class Stateless(nn.Module):
    """A language model as a pure function of its input: the state it carries between calls
    (the RNN's hidden state, the Transformer's generation buffer) is emptied before the call, so
    the graph starts from zeros, and after it, so that no tensor of the trace stays behind."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        self.lm.reset_state()
        logits = self.lm(ids)
        self.lm.reset_state()
        return logits


def table_signature(model: Saved) -> Signature:
    from dlrun.data.tabular import saved_prep

    prep = saved_prep(model.prep)
    cats, conts = prep.model_cats, prep.model_conts
    inputs = [
        Tensor(
            "cat", "int64", ["N", len(cats)],
            f"level codes of {', '.join(cats) or '(no columns)'}: the index in model.json's levels, "
            "0 for a level unseen in training",
        ),
        Tensor(
            "cont", "float32", ["N", len(conts)],
            f"{', '.join(conts) or '(no columns)'}: gaps filled with model.json's fill, (x - mean) / std",
        ),
    ]  # fmt: skip
    if prep.task == "classification":
        out = Tensor(
            "logits", "float32", ["N", len(prep.classes)], f"one per class ({', '.join(prep.classes)})"
        )
        notes = ["softmax(logits) gives the class probabilities"]
    else:
        target = f"log({prep.y_name})" if prep.log_y else prep.y_name
        out = Tensor("prediction", "float32", ["N", 1], f"{target}, on the scale the model was trained on")
        notes = (
            [f"exp(prediction) is {prep.y_name} (the run trained on its log, data.log_y)"]
            if prep.log_y
            else []
        )
        y_range = model.doc["model"]["model"].get("y_range")
        if y_range is not None:
            notes.append(f"the sigmoid into model.y_range={list(y_range)} is part of the exported model")
    example = (torch.zeros(EXAMPLE_BS, len(cats), dtype=torch.long), torch.zeros(EXAMPLE_BS, len(conts)))
    return Signature(describe(model), TableModel(model.model).eval(), inputs, [out], example, notes)


def image_signature(model: Saved) -> Signature:
    p = model.prep
    c, (h, w) = int(p["channels"]), (int(s) for s in p["size"])
    if p.get("pixels") == "files":
        pixels = f"the centre square of each image resized to {h}x{w} (PIL bilinear), 0-255 scaled to [0, 1]"
    else:
        pixels = f"pixels scaled to [0, 1], resized to {h}x{w} (bilinear)"
    inputs = [Tensor("images", "float32", ["N", c, h, w], f"{pixels}, then (x - mean) / std per channel")]
    classes = [str(k) for k in p["classes"]]
    shown = ", ".join(classes[:10]) + (", ..." if len(classes) > 10 else "")
    outputs = [Tensor("logits", "float32", ["N", len(classes)], f"one per class ({shown})")]
    stats = ", ".join(f"{m:.4g}/{s:.4g}" for m, s in zip(p["mean"], p["std"]))
    notes = [f"mean/std per channel {stats} (model.json)", "softmax(logits) gives the class probabilities"]
    example = (torch.zeros(EXAMPLE_BS, c, h, w),)
    return Signature(describe(model), model.model, inputs, outputs, example, notes)


def text_signature(model: Saved, fmt: str) -> Signature:
    """A language model from a zero initial state. How long a window it takes depends on the
    model and the format:
    - a Transformer's ONNX graph takes up to `context` tokens (its learned positions; in PyTorch a
      longer window is read as chunks, a branch on T that torch.export resolves for T <= context);
      its TorchScript file is scripted, branch included, and takes any T;
    - the RNN's ONNX graph takes exactly the run's bptt tokens: the exported LSTM and GRU keep the
      example's sequence length (another length fails in onnxruntime), and a QRNN's fo-pooling
      is a Python loop over time, unrolled; its TorchScript trace takes any T (LSTM, GRU), but
      cannot hold the QRNN's fo-pooling, a Python autograd function."""
    from dlrun.models.rnn import QRNNLayer

    net, bptt = model.model, int(model.prep["bptt"])
    context = getattr(net, "context", None)
    if fmt == "torchscript" and any(isinstance(m, QRNNLayer) for m in net.modules()):
        raise DlrunError(
            f"{describe(model)} cannot be written as TorchScript: its fo-pooling is a Python autograd "
            "function, which a TorchScript file cannot hold; use --format onnx"
        )
    notes = ["softmax(logits[:, t]) is the distribution of the token after position t"]
    length: int | str = "T"
    example_t = min(bptt, context or bptt)
    if context is None and fmt == "onnx":
        length = bptt
        notes.append(
            f"T is fixed at {bptt} (the run's data.bptt): the RNN's ONNX graph runs exactly that many steps; "
            f"cut the text into windows of {bptt} tokens"
        )
    elif context is not None and fmt == "onnx":
        # torch.export makes a length-1 example a constant: a one-position model keeps T = 1.
        length = "T" if context > 1 else 1
        example_t = context
        notes.append(f"T is any length from 1 to {context} (model.context: the positions it learned)")
    elif context is not None:
        notes.append(f"T is any length; past {context} (model.context) it reads windows of {context} tokens")
    else:
        notes.append("T is any length")
    vocab = model.prep["vocab"]
    inputs = [
        Tensor("ids", "int64", ["N", length], f"token ids: the {vocab['tokens']} index in model.json's vocab")
    ]
    outputs = [
        Tensor(
            "logits", "float32", ["N", length, len(vocab["itos"])],
            "the next token's logits at each position, reading the window from a zero initial state",
        )
    ]  # fmt: skip
    example = (torch.zeros(EXAMPLE_BS, example_t, dtype=torch.long),)
    module = Stateless(net).eval()
    return Signature(
        describe(model), module, inputs, outputs, example, notes, max_t=context, script=context is not None
    )


# --- writing ------------------------------------------------------------------------


@contextmanager
def quiet(verbose: bool) -> Iterator[None]:
    """Without -v, the exporters' chatter is hidden: torch.export's warnings about internals the
    user cannot change (nn.LSTM's flat weights, `_check_is_size`), the FutureWarning that
    torch.jit.trace is deprecated (it still works, and TorchScript files still load),
    torch.jit.trace's TracerWarnings (the models it traces run the same operations for any
    input), and onnxscript's log of the opset conversion it runs for --opset 26 and later (a
    conversion that fails leaves another opset, which `write_onnx` reports)."""
    if verbose:
        yield
        return
    log = logging.getLogger("onnxscript")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)


def write(sig: Signature, path: Path, fmt: str, opset: int | None, verbose: bool) -> str:
    """Write the model file; returns what it is ("ONNX opset 20", "TorchScript")."""
    with quiet(verbose):
        if fmt == "onnx":
            return f"ONNX opset {write_onnx(sig, path, opset, verbose)}"
        write_torchscript(sig, path)
    return "TorchScript"


def write_onnx(sig: Signature, path: Path, opset: int | None, verbose: bool) -> int:
    """Export with torch.export (`dynamo=True`), and return the opset written.

    The legacy TorchScript-based exporter (dynamo=False) is deprecated and gets the QRNN
    wrong: its fo-pooling writes each step into a slice of one tensor (`out=`), which that
    exporter does not follow (outputs off by 0.8). It also drops an unused input (a table
    without categorical or continuous columns), so the graph's inputs would depend on the
    table. torch.export handles every model here; it is slower (2-10 s) and prints progress
    lines, which `verbose=False` turns off (-v turns them back on)."""
    import onnx

    program = torch.onnx.export(
        sig.module,
        sig.example,
        dynamo=True,
        input_names=[t.name for t in sig.inputs],
        output_names=[t.name for t in sig.outputs],
        dynamic_shapes=sig.dynamic_shapes(),
        opset_version=opset,
        verbose=None if verbose else False,  # None: its progress lines; True would add its debug log
    )
    program.save(str(path))  # one file: weights go to a separate one only past 2 GB
    written = next(
        o.version for o in onnx.load(str(path), load_external_data=False).opset_import if o.domain == ""
    )
    if opset is not None and written != opset:
        raise DlrunError(
            f"the exporter wrote opset {written} for {sig.model_name}, not --opset {opset}: "
            "leave --opset out, or pick the opset it wrote"
        )
    return written


def write_torchscript(sig: Signature, path: Path) -> None:
    """`torch.jit.trace` records the tensor operations of one call on the example, shapes kept
    symbolic: right for every model that runs the same operations whatever its input (the CNN,
    ResNet, tabular net and RNN in eval mode; `torch.jit.script` cannot compile the RNN, whose
    layers take `*args` through torch.func). The Transformer branches on the window's length,
    which a trace would freeze: it is scripted."""
    with torch.no_grad():
        compiled = torch.jit.script(sig.module) if sig.script else torch.jit.trace(sig.module, sig.example)
    compiled.save(str(path))


def tell(sig: Signature, path: Path, what: str) -> None:
    """What was written, and the graph's inputs and outputs."""
    lines = [f"wrote {path} ({what}) and model.json (the preprocessing) beside it"]
    width = max(len(t.name) for t in sig.inputs + sig.outputs)
    for kind, tensors in (("input ", sig.inputs), ("output", sig.outputs)):
        for t in tensors:
            shape = "[" + ", ".join(str(d) for d in t.shape) + "]"
            lines.append(f"  {kind} {t.name:<{width}}  {t.dtype:<7}  {shape:<14}  {t.what}")
    lines += [f"  {note}" for note in ["N is any batch size", *sig.notes]]
    for line in lines:
        report.console.print(line, markup=False, highlight=False, soft_wrap=True)
