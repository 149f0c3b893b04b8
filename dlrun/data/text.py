"""Text for language models: a token stream cut into `bs` rows, read in BPTT windows.

As in the fast.ai course (lesson 7) and AWD-LSTM: the training stream is cut
into `data.bs` contiguous rows, and each mini-batch is the next window of
`data.bptt` tokens of every row, so row r of batch i+1 continues row r of batch
i and the model's hidden state can carry from one window to the next.
Validation reads its own stream the same way, statefully, from start to end.

Corpus: `data.path` (a `.txt` file, or a folder with `train.txt` and
`valid.txt`), or the bundled `pydoc_data.topics` (Python's documentation prose,
about 460 KB) when `data.bundled` names it. Tokens: characters, or words with
a vocabulary cut by `data.min_freq` / `data.max_vocab` and an unknown token.
Words are split by `data.tokenizer`: `regex` cuts raw prose into words and
punctuation marks; `whitespace` keeps a pre-tokenised corpus (Penn Treebank,
WikiText) exactly as written, `<unk>` and `n't` included, which is how published
word-level perplexities count tokens.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dlrun.errors import DlrunError
from dlrun.family import Data, Facts
from dlrun.metrics import perplexity
from dlrun.rules import BOOL, Choice, Int, Rule

log = logging.getLogger(__name__)

UNK = "<unk>"  # stands for every token the training text did not have (or the vocabulary cut)
EOS = "<eos>"  # end of a line, for word tokens (as in WikiText)
VOCAB_FILE = "vocab.json"
BUNDLED = ("pydoc_data.topics",)
TOKENIZERS = ("regex", "whitespace")
OLD_TOKENIZER = "regex"  # what a vocab.json written before `data.tokenizer` existed used

RULES = {
    "data.path": Rule("str", nullable=True),
    "data.bundled": Choice(*BUNDLED, nullable=True),
    "data.tokens": Choice("char", "word"),
    "data.tokenizer": Choice(*TOKENIZERS),
    "data.min_freq": Int(1),
    "data.max_vocab": Int(2, nullable=True),
    "data.bptt": Int(1),
    "data.variable_bptt": BOOL,
}

# Words and single punctuation marks: "don't stop." -> don ' t stop .
_WORD = re.compile(r"\w+|[^\w\s]")


# --- corpus ------------------------------------------------------------------


def _read(path: Path) -> str:
    text = read_text(path)
    if not text.strip():
        raise DlrunError(f"the corpus {path} is empty: point data.path at a text file with some text in it")
    return text


def read_text(path: Path) -> str:
    """A text file to score (`dlrun predict`), as UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DlrunError(f"cannot read {path}: not UTF-8 text ({e.reason}); convert it to UTF-8") from None
    except OSError as e:
        raise DlrunError(f"cannot read {path}: {e.strerror}") from None


def _bundled(name: str) -> str:
    """The bundled corpus: every pydoc topic's prose, in the module's (fixed) order."""
    if name not in BUNDLED:
        raise DlrunError(f"data.bundled={name!r} is not a bundled corpus: use one of {', '.join(BUNDLED)}")
    from pydoc_data.topics import topics

    return "\n".join(topics[key] for key in topics)


def read_corpus(data_cfg: Any) -> tuple[str, str | None]:
    """(train text, valid text or None when the validation part is split off the end)."""
    if data_cfg.path is None:
        if data_cfg.bundled is None:
            raise DlrunError(
                "data=text needs a corpus: set data.path=FILE.txt (or a folder with "
                "train.txt and valid.txt), or use the bundled one with data=pydoc"
            )
        return _bundled(data_cfg.bundled), None
    path = Path(str(data_cfg.path)).expanduser()
    if path.is_dir():
        train, valid = path / "train.txt", path / "valid.txt"
        if not train.is_file():
            raise DlrunError(
                f"data.path={path} is a folder without train.txt: put the training text in "
                f"{train} (and the validation text in {valid}), or point data.path at one file"
            )
        return _read(train), (_read(valid) if valid.is_file() else None)
    if not path.exists():
        raise DlrunError(
            f"data.path={path} does not exist: point it at a .txt file or a folder "
            "with train.txt and valid.txt"
        )
    return _read(path), None


def split_words(line: str, tokenizer: str) -> list[str]:
    """One line's words: `regex` splits off punctuation ("don't." -> don ' t .), `whitespace`
    keeps every token as written (<unk>, n't, 's, 3.5)."""
    return _WORD.findall(line) if tokenizer == "regex" else line.split()


def tokenize(text: str, tokens: str, tokenizer: str = "regex") -> list[str]:
    """Characters, or each line's words followed by an end-of-line token.

    `regex` skips lines without words. `whitespace` reads lines as the AWD-LSTM and PyTorch
    example loaders do (`line.split() + ['<eos>']` for every line of the file, empty ones
    too), so the token count, and with it the perplexity, is the one papers report.
    """
    if tokens == "char":
        return list(text)
    lines = text.split("\n") if tokenizer == "whitespace" else text.splitlines()
    if lines and not lines[-1]:  # the file's final newline ends the last line, it starts none
        lines.pop()
    out: list[str] = []
    for line in lines:
        words = split_words(line, tokenizer)
        if words or tokenizer == "whitespace":
            out.extend(words)
            out.append(EOS)
    return out


def detokenize(words: list[str], tokens: str) -> str:
    """Text a person can read back from tokens (word tokens are joined with spaces)."""
    if tokens == "char":
        return "".join("\ufffd" if w == UNK else w for w in words)
    return " ".join(words).replace(f" {EOS} ", "\n").replace(EOS, "\n")


# --- vocabulary --------------------------------------------------------------


@dataclass
class Vocab:
    """Token <-> index, and how text is cut into tokens. Index 0 is the unknown token
    (a literal `<unk>` in the corpus is that token too)."""

    itos: list[str]
    tokens: str  # char | word
    tokenizer: str | None = None  # word tokens: regex | whitespace (None for characters)

    def __post_init__(self) -> None:
        self.stoi = {s: i for i, s in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    @classmethod
    def build(
        cls,
        train: list[str],
        tokens: str,
        min_freq: int,
        max_vocab: int | None,
        tokenizer: str = OLD_TOKENIZER,
    ) -> "Vocab":
        """Most frequent first (ties in order of first appearance), cut by count and frequency."""
        counts = collections.Counter(train)
        kept = [t for t, n in counts.most_common(max_vocab) if n >= min_freq and t != UNK]
        if tokens == "char":
            kept.sort()  # a stable, readable order for characters
        return cls([UNK, *kept], tokens, tokenizer if tokens == "word" else None)

    def tokenize(self, text: str) -> list[str]:
        """`text` cut into tokens the way the training text was."""
        return tokenize(text, self.tokens, self.tokenizer or OLD_TOKENIZER)

    def encode(self, toks: list[str]) -> torch.Tensor:
        return torch.tensor([self.stoi.get(t, 0) for t in toks], dtype=torch.long)

    def decode(self, ids: list[int]) -> str:
        return detokenize([self.itos[i] for i in ids], self.tokens)

    def state(self) -> dict[str, Any]:
        """What `load` reads back: the tokenization and the tokens in index order."""
        doc: dict[str, Any] = {"tokens": self.tokens}
        if self.tokenizer is not None:
            doc["tokenizer"] = self.tokenizer
        return doc | {"itos": self.itos}

    @classmethod
    def load(cls, run_dir: Path) -> "Vocab":
        """The vocabulary a run saved; one without `tokenizer` (older runs) split words by regex."""
        path = Path(run_dir) / VOCAB_FILE
        if not path.is_file():
            raise DlrunError(f"{path} is missing: RUN_DIR must be the directory of a text run")
        try:
            return vocab_from(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
            raise DlrunError(f"{path} is not a dlrun vocabulary: the run directory is damaged") from None


# --- batches -----------------------------------------------------------------


def window_lengths(n: int, bptt: int, generator: torch.Generator | None) -> list[int]:
    """Lengths of the windows that tile `n` positions of a row.

    Fixed: `bptt` each, the last one shorter. Variable (a generator given), as
    AWD-LSTM draws them: bptt with probability 0.95, else bptt/2, then normal
    with sd 5, at least 5. Unlike AWD-LSTM we draw as many windows as fixed
    windows would be, and stretch them to tile the row exactly: every epoch has
    the same number of steps (the schedule counts on it) and no token is lost.
    """
    count = math.ceil(n / bptt)
    if generator is None or count == 1:
        return [min(bptt, n - i * bptt) for i in range(count)]
    u = torch.rand(count, generator=generator, dtype=torch.float64)
    mean = torch.where(u < 0.95, float(bptt), bptt / 2)
    raw = (mean + 5 * torch.randn(count, generator=generator, dtype=torch.float64)).clamp_min(5)
    ends = torch.round(raw.cumsum(0) * (n / raw.sum())).long().tolist()
    lengths, start = [], 0
    for i, end in enumerate(ends):
        # Every window keeps at least one token, and the last one ends at n.
        end = n if i == count - 1 else min(max(end, start + 1), n - (count - 1 - i))
        lengths.append(end - start)
        start = end
    return lengths


class StreamBatches:
    """A token stream as `bs` contiguous rows, read in windows of about `bptt` tokens.

    Row r holds tokens [r*L, (r+1)*L) as inputs and the same shifted by one as
    targets, so the inputs of all windows tile the first bs*L tokens exactly.
    """

    def __init__(
        self, stream: torch.Tensor, bs: int, bptt: int, split: str, variable: bool = False, seed: int = 0
    ):
        self.row_len = (len(stream) - 1) // bs
        if self.row_len < 1:
            raise DlrunError(
                f"the {split} text has {len(stream)} tokens, too few for data.bs={bs} rows: "
                f"use a longer corpus or a smaller data.bs"
            )
        n = bs * self.row_len
        self.x = stream[:n].view(bs, self.row_len)
        self.y = stream[1 : n + 1].view(bs, self.row_len)
        self.bs, self.bptt, self.variable, self.seed = bs, bptt, variable, seed

    def __len__(self) -> int:
        return math.ceil(self.row_len / self.bptt)

    def shard(self, rank: int, world: int) -> None:
        """Keep rank `rank`'s rows of the bs streams (bs / world of them): each rank carries the
        hidden state of its own rows from window to window."""
        from dlrun.distributed import share

        rows = share(self.bs, rank, world)
        self.x, self.y, self.bs = self.x[rows], self.y[rows], rows.stop - rows.start

    def windows(self, epoch: int) -> list[int]:
        """The window lengths of `epoch` (variable ones replay exactly for the same seed and epoch)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch) if self.variable else None
        return window_lengths(self.row_len, self.bptt, g)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        pos = 0
        for i, length in enumerate(self.windows(epoch)):
            if i >= start:
                yield self.x[:, pos : pos + length], self.y[:, pos : pos + length]
            pos += length


# --- loss and metrics --------------------------------------------------------


def lm_loss(out: Any, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy per token. In training the model returns (logits, penalty):
    the AR/TAR penalty is added to the gradient but not to the reported value
    (penalty - penalty.detach() is zero), so the train loss stays comparable to the valid loss."""
    logits, penalty = out if isinstance(out, tuple) else (out, None)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
    if penalty is not None:
        loss = loss + (penalty - penalty.detach())
    return loss


class LanguageModelMetrics:
    """Perplexity (exp of the mean loss per token) and, for characters, bits per character."""

    monitor, mode = "perplexity", "min"

    def __init__(self, chars: bool):
        self.chars = chars

    def update(self, out: Any, y: Any) -> None:
        pass  # both follow from the validation loss

    def compute(self, valid_loss: float) -> dict[str, float]:
        result = {"perplexity": perplexity(valid_loss)}
        if self.chars:
            result["bpc"] = valid_loss / math.log(2)
        return result


# --- build -------------------------------------------------------------------


@dataclass(frozen=True)
class TextFacts(Facts):
    """A token stream: `n_out` is the vocabulary size; windows are about `bptt` tokens."""

    tokens: str  # char | word
    bptt: int

    @property
    def vocab_size(self) -> int:
        return self.n_out


def text_facts(vocab: Vocab, bptt: int) -> TextFacts:
    """The facts a language model is built from (`dlrun generate` rebuilds them from vocab.json)."""
    return TextFacts(n_out=len(vocab), tokens=vocab.tokens, bptt=int(bptt))


def facts_from(inputs: dict[str, Any]) -> TextFacts:
    """The facts of a saved language model, from its `Data.inputs` (model.json)."""
    return text_facts(vocab_from(inputs["vocab"]), inputs["bptt"])


def vocab_from(doc: dict[str, Any]) -> Vocab:
    """A `Vocab` from its `state()`, checked."""
    tokens, itos = doc["tokens"], doc["itos"]
    tokenizer = doc.get("tokenizer", OLD_TOKENIZER) if tokens == "word" else None
    ok = (
        tokens in ("char", "word")
        and (tokenizer is None or tokenizer in TOKENIZERS)
        and isinstance(itos, list)
        and all(isinstance(t, str) for t in itos)
        and itos[:1] == [UNK]
    )
    if not ok:
        raise ValueError("not a dlrun vocabulary")
    return Vocab(itos, tokens, tokenizer)


def word_tokenizer(data_cfg: Any) -> str:
    """`data.tokenizer` (a config saved before the key existed split words by regex). It
    splits words: asking for whitespace-separated words with character tokens is a mistake."""
    tokenizer = data_cfg.get("tokenizer", OLD_TOKENIZER)
    if data_cfg.tokens == "char" and tokenizer == "whitespace":
        raise DlrunError(
            "data.tokenizer=whitespace splits lines into words, but data.tokens=char reads characters: "
            "add data.tokens=word for a word model (or data.tokenizer=regex to keep characters)"
        )
    return tokenizer


def _tokenization(vocab: Vocab) -> str:
    return f"data.tokens={vocab.tokens}" + (f" data.tokenizer={vocab.tokenizer}" if vocab.tokenizer else "")


def check_resumed_vocab(run_dir: Any, vocab: Vocab) -> None:
    """A resumed run must read its text as it did: the checkpoint's embedding rows are the
    saved vocabulary's tokens. A changed tokenization (word_lm's default tokenizer was regex
    before whitespace) is named with the override that restores it."""
    run_dir = Path(str(run_dir))
    if not (run_dir / VOCAB_FILE).is_file():
        return
    saved = Vocab.load(run_dir)
    then, now = _tokenization(saved), _tokenization(vocab)
    if then != now:
        raise DlrunError(
            f"resume={run_dir}: the run read its text with {then} ({VOCAB_FILE}), this config "
            f"with {now}: add {then} to the command"
        )
    if saved.itos != vocab.itos:
        raise DlrunError(
            f"resume={run_dir}: the corpus gives another vocabulary than the run's {VOCAB_FILE}: "
            "resume with the same corpus and data.min_freq / data.max_vocab, or start a new run"
        )


def build(cfg: Any, device: torch.device) -> Data:
    """Read, tokenize and batch the corpus named by `cfg.data`."""
    d = cfg.data
    tokenizer = word_tokenizer(d)
    train_text, valid_text = read_corpus(d)
    train_toks = tokenize(train_text, d.tokens, tokenizer)
    if valid_text is None:
        cut = len(train_toks) - max(1, int(len(train_toks) * d.valid_pct))
        train_toks, valid_toks = train_toks[:cut], train_toks[cut:]
    else:
        valid_toks = tokenize(valid_text, d.tokens, tokenizer)
    need = d.bs * d.bptt + 1
    if len(train_toks) < need:
        raise DlrunError(
            f"the training text has {len(train_toks)} {d.tokens} tokens, fewer than data.bs * data.bptt + 1 "
            f"= {d.bs} * {d.bptt} + 1 = {need}: use a longer corpus, or a smaller data.bs or data.bptt"
        )
    vocab = Vocab.build(train_toks, d.tokens, d.min_freq, d.max_vocab, tokenizer)
    if cfg.get("resume"):
        check_resumed_vocab(cfg.resume, vocab)
    train_ids, valid_ids = vocab.encode(train_toks), vocab.encode(valid_toks)
    if len(valid_ids) < d.bs + 1:
        raise DlrunError(
            f"the validation text has {len(valid_ids)} tokens, too few for data.bs={d.bs} rows: "
            f"use a longer valid.txt, a larger data.valid_pct, or a smaller data.bs"
        )
    # Perplexity is per token: the log says what a token is, for comparing with other figures.
    log.info(
        "%d training and %d validation tokens (%s), vocabulary %d, %.2f%% of validation tokens %s",
        len(train_ids),
        len(valid_ids),
        f"words split by {tokenizer}, {EOS} at line ends" if vocab.tokens == "word" else "characters",
        len(vocab),
        100 * int((valid_ids == 0).sum()) / len(valid_ids),
        UNK,
    )
    train = StreamBatches(train_ids.to(device), d.bs, d.bptt, "training", d.variable_bptt, cfg.seed)
    valid = StreamBatches(valid_ids.to(device), d.bs, d.bptt, "validation")
    bptt = int(d.bptt)
    return Data(
        train=train,
        valid=valid,
        loss=lm_loss,
        metrics=lambda: LanguageModelMetrics(chars=vocab.tokens == "char"),
        facts=text_facts(vocab, bptt),
        state={VOCAB_FILE: vocab.state()},
        inputs={"family": "text", "bptt": bptt, "bs": int(d.bs), "vocab": vocab.state()},
        count=lambda y: y.numel(),  # the loss is a mean over tokens
        unit="tokens",
        # A shorter window has fewer tokens behind its mean loss: AWD-LSTM scales the lr by length/bptt.
        lr_scale=(lambda x: x.shape[1] / bptt) if d.variable_bptt else None,
        batch_keys=("bs", "bptt"),
        advice=(f"a shorter data.bptt (now {bptt})",),
    )
