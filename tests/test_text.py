"""Word tokenizers (issue 11, item 2): a pre-tokenised corpus (Penn Treebank, WikiText) read as
written, the tokenizer saved with the vocabulary, and the CPU-sized language-model recipes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import assert_user_error, compose, dlrun, train

from dlrun.data.text import EOS, UNK, Vocab, tokenize
from dlrun.errors import DlrunError

# Penn Treebank as the usual files have it: lower case, <unk> for rare words, N for numbers,
# contractions split off ("did n't", "'s"), a leading space on each line, one empty line.
PTB = (
    " no it was n't black monday \n"
    " but while the new york stock exchange did n't fall apart friday as the dow jones "
    "industrial average plunged N points <unk> 's <unk> said \n"
    "\n"
    " the company 's shares rose $ N to $ N <unk> \n"
)
TINY = [
    "model=rnn",
    "model.emb_sz=16",
    "model.n_hid=32",
    "model.n_layers=1",
    "data.bs=4",
    "data.bptt=16",
    "trainer.epochs=1",
    "optimizer.lr=1e-2",
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ptb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pre-tokenised corpus folder, train.txt and valid.txt, in Penn Treebank's style."""
    folder = tmp_path_factory.mktemp("ptb")
    (folder / "train.txt").write_text(PTB * 12, encoding="utf-8")
    (folder / "valid.txt").write_text(PTB * 3, encoding="utf-8")
    return folder


def words_and_lines(text: str) -> int:
    return len(text.split()) + text.count("\n")


# --- tokenizers ---------------------------------------------------------------------------


def test_whitespace_tokens_are_the_words_plus_one_per_line() -> None:
    toks = tokenize(PTB, "word", "whitespace")
    assert len(toks) == words_and_lines(PTB)  # 43 words + 4 lines, the empty one included
    assert toks[:6] == ["no", "it", "was", "n't", "black", "monday"]
    assert toks.count(UNK) == 3 and "'s" in toks and toks.count(EOS) == 4
    assert toks[toks.index("said") + 1 : toks.index("said") + 3] == [EOS, EOS]  # the empty line
    # The regex tokenizer, meant for raw prose, cuts the same text into more pieces.
    regex = tokenize(PTB, "word", "regex")
    assert regex[:6] == ["no", "it", "was", "n", "'", "t"] and "<" in regex and UNK not in regex


def test_a_file_without_a_final_newline_still_ends_its_last_line() -> None:
    assert tokenize("a b\nc", "word", "whitespace") == ["a", "b", EOS, "c", EOS]
    assert tokenize("a b\nc\n", "word", "whitespace") == ["a", "b", EOS, "c", EOS]


def test_a_literal_unk_is_the_vocabulary_unknown_token() -> None:
    toks = tokenize(PTB, "word", "whitespace")
    vocab = Vocab.build(toks, "word", min_freq=2, max_vocab=None, tokenizer="whitespace")
    assert vocab.itos.count(UNK) == 1 and vocab.itos[0] == UNK
    ids = vocab.encode(toks).tolist()
    assert [i for i, t in zip(ids, toks, strict=True) if t == UNK] == [0, 0, 0]
    assert vocab.encode(["n't", "'s"]).tolist() == [vocab.stoi["n't"], vocab.stoi["'s"]] != [0, 0]


def test_vocab_json_keeps_the_tokenizer_and_older_ones_mean_regex(tmp_path: Path) -> None:
    vocab = Vocab.build(tokenize(PTB, "word", "whitespace"), "word", 1, None, "whitespace")
    (tmp_path / "vocab.json").write_text(json.dumps(vocab.state()))
    loaded = Vocab.load(tmp_path)
    assert loaded.tokenizer == "whitespace" and loaded.tokenize("it did n't <unk>\n") == [
        "it",
        "did",
        "n't",
        UNK,
        EOS,
    ]
    # A vocab.json written before data.tokenizer existed: its words were split by the regex.
    (tmp_path / "vocab.json").write_text(json.dumps({"tokens": "word", "itos": vocab.itos}))
    assert Vocab.load(tmp_path).tokenizer == "regex"
    chars = Vocab.build(list("abc"), "char", 1, None, "regex")
    assert chars.tokenizer is None and "tokenizer" not in chars.state()


@pytest.mark.parametrize(
    "doc",
    [
        "{not json",
        '["a", "list"]',
        '{"tokens": "word", "tokenizer": "spaces", "itos": ["<unk>"]}',
        '{"tokens": "word", "itos": ["the", "<unk>"]}',
        '{"tokens": "bytes", "itos": ["<unk>"]}',
    ],
)
def test_a_damaged_vocab_json_is_a_user_error(doc: str, tmp_path: Path) -> None:
    (tmp_path / "vocab.json").write_text(doc)
    with pytest.raises(DlrunError, match="not a dlrun vocabulary"):
        Vocab.load(tmp_path)


# --- through the CLI ----------------------------------------------------------------------


@pytest.mark.slow  # make test-slow: the fast suite stays under 10 minutes on 2 cores
def test_word_model_on_a_pretokenised_corpus(ptb: Path, run_dir: Path) -> None:
    """The acceptance test of item 2: tokens = words + lines, `<unk>` and `n't` kept as written."""
    train(run_dir, *TINY, "data=text", f"data.path={ptb}", "data.tokens=word", "data.tokenizer=whitespace")
    vocab = json.loads((run_dir / "vocab.json").read_text())
    assert vocab["tokens"] == "word" and vocab["tokenizer"] == "whitespace"
    assert vocab["itos"].count(UNK) == 1 and "n't" in vocab["itos"] and "'s" in vocab["itos"]
    assert "<" not in vocab["itos"] and "unk" not in vocab["itos"]
    counts = re.search(r"(\d+) training and (\d+) validation tokens", (run_dir / "train.log").read_text())
    assert counts, (run_dir / "train.log").read_text()
    n_train, n_valid = (words_and_lines((ptb / f).read_text()) for f in ("train.txt", "valid.txt"))
    assert (int(counts[1]), int(counts[2])) == (n_train, n_valid)

    proc = dlrun("generate", str(run_dir), "--prompt", "the company did n't", "-n", "8", "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("the company did n't ") and len(proc.stdout.split()) >= 5

    # Resuming with another tokenizer would give the checkpoint another vocabulary: refused.
    proc = dlrun("train", f"resume={run_dir}", "data.tokenizer=regex", "trainer.epochs=2")
    assert_user_error(proc, "data.tokens=word data.tokenizer=whitespace", "add")


def test_word_lm_reads_pretokenised_corpora_by_default() -> None:
    """As published figures read PTB and WikiText-2: tokens as written, the files' own vocabulary."""
    data = compose("experiment=word_lm").data
    assert data.tokenizer == "whitespace" and data.min_freq == 1 and data.max_vocab is None
    assert compose("experiment=word_lm_small").data.tokenizer == "regex"  # the bundled prose is raw text
    assert compose("model=rnn").data.tokenizer == "regex"


def test_whitespace_words_with_character_tokens_are_refused(run_dir: Path) -> None:
    proc = dlrun("train", *TINY, f"hydra.run.dir={run_dir}", "data.tokenizer=whitespace")
    assert_user_error(proc, "data.tokenizer=whitespace", "data.tokens=char", "data.tokens=word")


def test_an_unknown_tokenizer_is_refused(run_dir: Path) -> None:
    proc = dlrun("train", *TINY, f"hydra.run.dir={run_dir}", "data.tokenizer=spaces")
    assert_user_error(proc, "data.tokenizer='spaces'", "regex, whitespace")


# --- recipes ------------------------------------------------------------------------------


@pytest.mark.slow  # make test-slow: the fast suite stays under 10 minutes on 2 cores
@pytest.mark.parametrize("recipe", ["char_lm_small", "word_lm_small"])
def test_cpu_recipes_train_on_the_bundled_corpus(recipe: str, run_dir: Path) -> None:
    """One batch of each CPU recipe, as the README runs it (the full runs take 10-15 minutes)."""
    train(run_dir, f"experiment={recipe}", "trainer.epochs=1", "trainer.limit_batches=1")
    vocab = json.loads((run_dir / "vocab.json").read_text())
    cfg = compose(f"experiment={recipe}")
    assert cfg.data.name == "pydoc" and vocab["tokens"] == cfg.data.tokens
