"""RNN language-model training speed (tokens/s) on the bundled corpus, in one process:

1. dlrun's loop against a plain PyTorch loop over the same AWD-LSTM model and batches
   (what the loop costs);
2. dlrun with regularization off against a plain `nn.LSTM` language model of the same
   sizes (what dlrun's model costs: functional weight-drop, per-layer modules);
3. QRNN against LSTM, both through dlrun.

    .venv/bin/python benchmarks/bench_rnn.py [--steps 30] [--epochs 3] [--rounds 2] [--threads N]

Tokens/s are training tokens over training seconds of each epoch after the first
(warm-up), the median over epochs and rounds. Target for 1. and 2.: ratio <= 1.05.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dlrun.config import validate  # noqa: E402
from dlrun.family import build_data, build_model  # noqa: E402
from dlrun.models.rnn import detach  # noqa: E402

NO_REGULARIZATION = ["regularization.dropout=0", "regularization.ar=0", "regularization.tar=0"]


def config(steps: int, epochs: int, *overrides: str):
    base = [
        "model=rnn",
        f"trainer.epochs={epochs}",
        f"trainer.limit_batches={steps}",
        "trainer.device=cpu",
        "trainer.progress=false",
        "trainer.checkpoint=false",
        "seed=0",
    ]
    with initialize_config_dir(version_base=None, config_dir=str(REPO / "configs")):
        cfg = compose("train", overrides=[*base, *overrides])
    validate(cfg)
    return cfg


def dlrun_rates(cfg) -> list[float]:
    """Tokens/s of each epoch after the first, from dlrun's own metrics.csv seconds."""
    from dlrun import rundir, train

    tokens = cfg.data.bs * cfg.data.bptt * cfg.trainer.limit_batches
    with tempfile.TemporaryDirectory() as tmp:
        train.fit(cfg, Path(tmp))
        return [tokens / row["seconds"] for row in rundir.read_metrics(Path(tmp))[1:]]


class PlainLSTM(nn.Module):
    """The textbook LSTM language model: embedding, stacked nn.LSTM layers, tied decoder."""

    def __init__(self, vocab: int, emb: int, hid: int, n_layers: int):
        super().__init__()
        self.encoder = nn.Embedding(vocab, emb)
        sizes = [emb] + [hid] * (n_layers - 1) + [emb]
        self.rnns = nn.ModuleList(nn.LSTM(sizes[i], sizes[i + 1], batch_first=True) for i in range(n_layers))
        self.decoder = nn.Linear(emb, vocab)
        self.decoder.weight = self.encoder.weight

    def forward(self, x, hidden):
        out, new = self.encoder(x), []
        for rnn, h in zip(self.rnns, hidden):
            out, h = rnn(out, h)
            new.append(h)
        return self.decoder(out), new


def plain_rates(cfg, model: nn.Module | None) -> list[float]:
    """The shortest loop that does the job over dlrun's batches: `model` (dlrun's) or a PlainLSTM."""
    torch.manual_seed(cfg.seed)
    data = build_data(cfg, torch.device("cpu"))
    m = cfg.model
    plain = model is None
    model = PlainLSTM(data.facts.vocab_size, m.emb_sz, m.n_hid, m.n_layers) if plain else model
    opt = torch.optim.AdamW(
        model.parameters(), lr=float(cfg.optimizer.lr), weight_decay=cfg.regularization.wd
    )
    steps, rates = cfg.trainer.limit_batches, []
    for epoch in range(cfg.trainer.epochs):
        model.train()
        hidden = [None] * m.n_layers
        if not plain:
            model.reset_state()
        start, tokens = time.perf_counter(), 0
        for i, (x, y) in enumerate(data.train.epoch(epoch)):
            if i >= steps:
                break
            if plain:
                logits, hidden = model(x, hidden)
                hidden = detach(hidden)
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            else:
                loss = data.loss(model(x), y)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            tokens += y.numel()
        loss.item()
        rates.append(tokens / (time.perf_counter() - start))
    return rates[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="training steps per epoch")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per round (the first is warm-up)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = config(args.steps, args.epochs)
    bare = config(args.steps, args.epochs, *NO_REGULARIZATION)
    qrnn = config(args.steps, args.epochs, "model.cell=qrnn")
    print(
        f"model=rnn: {cfg.model.cell} emb {cfg.model.emb_sz} hid {cfg.model.n_hid} x{cfg.model.n_layers}, "
        f"bs {cfg.data.bs} x bptt {cfg.data.bptt}, {args.steps} steps/epoch, "
        f"{torch.get_num_threads()} threads"
    )
    runs: dict[str, list[float]] = {}

    def measure(name: str, fn) -> None:
        runs.setdefault(name, []).extend(fn())

    for _ in range(args.rounds):  # interleaved, so a slow spell of the machine hits every variant
        measure("dlrun loop, AWD-LSTM", lambda: dlrun_rates(cfg))
        measure(
            "plain loop, same AWD-LSTM",
            lambda: plain_rates(cfg, build_model(cfg, build_data(cfg, torch.device("cpu")).facts)),
        )
        measure("dlrun, regularization off", lambda: dlrun_rates(bare))
        measure("plain nn.LSTM LM loop", lambda: plain_rates(bare, None))
        measure("dlrun, QRNN", lambda: dlrun_rates(qrnn))
    med = {name: statistics.median(rates) for name, rates in runs.items()}
    for name, rate in med.items():
        print(f"{name:28s} {rate:9.0f} tokens/s")
    ratios = [
        ("loop:  dlrun / plain loop, same model", "plain loop, same AWD-LSTM", "dlrun loop, AWD-LSTM"),
        ("model: dlrun / plain nn.LSTM (no reg.)", "plain nn.LSTM LM loop", "dlrun, regularization off"),
    ]
    for label, fast, slow in ratios:  # time ratios: above 1, dlrun is slower
        print(f"{label:40s} {med[fast] / med[slow]:.3f}")
    print(f"{'QRNN speed / LSTM speed (dlrun)':40s} {med['dlrun, QRNN'] / med['dlrun loop, AWD-LSTM']:.2f}")


if __name__ == "__main__":
    main()
