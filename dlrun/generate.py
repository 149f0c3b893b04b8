"""`dlrun generate RUN_DIR`: sample text from a trained language model.

The model is rebuilt from the run's own config (`RUN_DIR/.hydra/config.yaml`),
vocabulary (`vocab.json`) and best weights (`best.pt`); the corpus is not read again.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from dlrun.errors import DlrunError, parse_args

USAGE = "dlrun generate RUN_DIR [--prompt TEXT] [-n N] [--temperature T] [--seed S]"
MAX_TOKENS = 100_000  # one forward pass per token: more would run for hours on a CPU


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dlrun generate",
        description="Sample text from a trained language model (a `dlrun train model=rnn` run).",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run's directory (has best.pt and vocab.json)")
    parser.add_argument("--prompt", default=None, help="text to start from (default: a new line)")
    parser.add_argument("-n", "--n", type=int, default=300, help="tokens to generate (default 300)")
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.8,
        help="lower is safer, higher is wilder; 0 takes the likeliest token (default 0.8)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed of the sampling (default 0)")
    args = parse_args(parser, argv, USAGE)
    if not 0 <= args.seed < 2**32:
        raise DlrunError(f"--seed {args.seed} is not allowed: give a seed from 0 to {2**32 - 1}")
    if args.n < 1:
        raise DlrunError(f"-n {args.n} is not allowed: generate at least 1 token")
    if args.n > MAX_TOKENS:
        raise DlrunError(f"-n {args.n} is too many: generate at most {MAX_TOKENS} tokens at a time")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):  # argparse reads "nan" and "inf"
        raise DlrunError(
            f"--temperature {args.temperature} is not allowed: use 0 (greedy) or a finite positive number"
        )
    return args


def load(run_dir: Path):  # -> tuple[nn.Module, Vocab]
    """The run's model with its best weights (on the CPU, in eval mode) and its vocabulary."""
    from dlrun import rundir
    from dlrun.data.text import Vocab, text_facts
    from dlrun.family import build_model

    cfg = rundir.load_config(rundir.existing_run(run_dir, need=""))
    if cfg.get("data", {}).get("kind") != "text":
        raise DlrunError(
            f"{run_dir} trained a {cfg.model.name} model on data={cfg.data.name}: "
            "dlrun generate needs a language-model run (dlrun train model=rnn)"
        )
    vocab = Vocab.load(run_dir)
    model = build_model(cfg, text_facts(vocab, cfg.data.bptt))
    rundir.load_weights(model, run_dir)
    return model.eval(), vocab


def sample(model, vocab, prompt: str, n: int, temperature: float, seed: int) -> str:
    """`n` tokens following `prompt`, drawn one at a time. The model keeps what it has read
    (an RNN its hidden state, a Transformer its window of tokens): `reset_state()` empties it,
    `feed(ids)` reads more and returns the next token's logits."""
    import torch

    from dlrun.data.text import EOS

    start = vocab.tokenize(prompt)  # as the training text was (vocab.json says how)
    if vocab.tokens == "word" and start[-1:] == [EOS] and not prompt.endswith("\n"):
        start.pop()  # the prompt's last line goes on: no end-of-line token after it
    start = start or ([EOS] if vocab.tokens == "word" else ["\n"])
    ids = vocab.encode(start).unsqueeze(0)
    g = torch.Generator().manual_seed(seed)
    out: list[int] = []
    model.reset_state()
    with torch.no_grad():
        for _ in range(n):
            logits = model.feed(ids).float()  # the prompt first, then the token just drawn
            if temperature == 0:
                nxt = int(logits.argmax())
            else:
                nxt = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=g))
            out.append(nxt)
            ids = torch.tensor([[nxt]])
    return vocab.decode(out)


def main(argv: list[str]) -> None:
    """Entry point of `dlrun generate`."""
    import sys

    args = parse(argv)
    run_dir = Path(args.run_dir).expanduser()
    if not run_dir.is_dir():
        raise DlrunError(f"{run_dir} does not exist: give the directory of a `dlrun train model=rnn` run")
    model, vocab = load(run_dir)
    prompt = args.prompt if args.prompt is not None else ""
    text = sample(model, vocab, prompt, args.n, args.temperature, args.seed)
    joiner = "" if vocab.tokens == "char" or not prompt else " "
    # Plain stdout, not rich: generated text is full of [brackets] rich would read as markup.
    sys.stdout.write(prompt + joiner + text + "\n")
