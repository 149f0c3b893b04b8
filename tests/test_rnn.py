"""RNN language models: BPTT batching, the model's state, QRNN, training, generation, user errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_user_error, dlrun, prose, summary, train
from omegaconf import OmegaConf

from dlrun.data.text import StreamBatches, Vocab, tokenize, window_lengths
from dlrun.errors import DlrunError
from dlrun.models.rnn import QRNNLayer, RNNLanguageModel, detach

# A tiny model on 20 KB of text: two epochs take well under a second.
TINY = [
    "model=rnn",
    "model.emb_sz=16",
    "model.n_hid=48",
    "data.bs=16",
    "data.bptt=32",
    "trainer.epochs=2",
    "optimizer.lr=1e-2",
]
NO_DROP = dict.fromkeys(("embed", "input", "hidden", "weight", "output"), 0.0)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 20 KB of real English prose from the bundled corpus, as a user's .txt file."""
    return prose(tmp_path_factory.mktemp("corpus"), 12, 20_000)


# --- batching ------------------------------------------------------------------


@pytest.mark.parametrize("variable", [False, True])
def test_windows_tile_the_stream(variable: bool) -> None:
    stream = torch.arange(1000)
    batches = StreamBatches(stream, bs=7, bptt=10, split="training", variable=variable, seed=3)
    windows = list(batches.epoch(2))
    assert len(windows) == len(batches)
    xs = torch.cat([x for x, _ in windows], dim=1)
    ys = torch.cat([y for _, y in windows], dim=1)
    row = (1000 - 1) // 7
    # Each row is one contiguous run of the stream, continued window after window...
    assert torch.equal(xs, stream[: 7 * row].view(7, row))
    # ...so every token is in exactly one (row, position), and targets are the next token.
    assert sorted(xs.flatten().tolist()) == list(range(7 * row))
    assert torch.equal(ys, xs + 1)
    for x, y in windows:
        assert x.dtype == y.dtype == torch.long and x.shape == y.shape and x.shape[0] == 7


def test_variable_windows_replay_per_epoch_and_resume() -> None:
    batches = StreamBatches(torch.arange(20_000), bs=4, bptt=70, split="training", variable=True, seed=0)
    assert batches.windows(1) == batches.windows(1)
    assert batches.windows(1) != batches.windows(2)
    lengths = batches.windows(1)
    assert len(set(lengths)) > 5 and min(lengths) >= 5 and sum(lengths) == batches.row_len
    resumed = [x for x, _ in batches.epoch(1, start=3)]
    full = [x for x, _ in batches.epoch(1)]
    assert all(torch.equal(a, b) for a, b in zip(resumed, full[3:], strict=True))


def test_fixed_windows_are_bptt_long_except_the_last() -> None:
    assert window_lengths(25, 10, None) == [10, 10, 5]


# --- the model's hidden state ---------------------------------------------------------------


@pytest.mark.parametrize("cell", ["lstm", "gru", "qrnn"])
def test_hidden_state_is_carried_and_detached(cell: str) -> None:
    torch.manual_seed(0)
    model = RNNLanguageModel(30, 8, 16, 2, cell, True, 2, NO_DROP, 0.0, 0.0)
    first, second = torch.randint(0, 30, (4, 5)), torch.randint(0, 30, (4, 5))
    model(first)
    carried = model(second)
    state = model.hidden
    flat = [t for layer in state for t in (layer if isinstance(layer, tuple) else (layer,))]
    assert all(not t.requires_grad and t.grad_fn is None for t in flat)
    model.reset_state()
    fresh = model(second)
    assert not torch.allclose(carried, fresh)  # the first window's state changed the second's output
    # A backward through the second window must not reach into the first one's (freed) graph.
    model.reset_state()
    for x in (first, second):
        model(x).sum().backward()


def test_weight_drop_changes_outputs_not_parameters() -> None:
    torch.manual_seed(0)
    drops = {**NO_DROP, "weight": 0.5}
    model = RNNLanguageModel(30, 8, 16, 1, "lstm", True, 2, drops, 0.0, 0.0)
    before = model.layers[0].rnn.weight_hh_l0.detach().clone()
    x = torch.randint(0, 30, (2, 6))
    model.train()
    a = model(x)
    a.sum().backward()
    assert model.layers[0].rnn.weight_hh_l0.grad is not None
    model.reset_state()
    model.eval()
    b = model(x)
    assert not torch.allclose(a, b)
    assert torch.equal(model.layers[0].rnn.weight_hh_l0, before)


def naive_qrnn(layer: QRNNLayer, x: torch.Tensor, c: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """QRNN one time step at a time, straight from the paper."""
    outs = []
    seq = torch.cat([prev, x], dim=1)
    for t in range(x.shape[1]):
        window = seq[:, t : t + layer.window].reshape(x.shape[0], -1)
        z, f, o = layer.gates(window).chunk(3, dim=-1)
        z, f, o = torch.tanh(z), torch.sigmoid(f), torch.sigmoid(o)
        c = f * c + (1 - f) * z
        outs.append(o * c)
    return torch.stack(outs, dim=1)


def test_qrnn_matches_a_step_by_step_reference() -> None:
    torch.manual_seed(0)
    layer = QRNNLayer(5, 7, window=2, weight_p=0.0)
    x1, x2 = torch.randn(3, 9, 5, requires_grad=True), torch.randn(3, 4, 5)
    state = layer.initial_state(3, x1)
    h1, state = layer(x1, state)
    h2, _ = layer(x2, state)  # the second window continues the first
    ref = naive_qrnn(layer, torch.cat([x1, x2], dim=1), torch.zeros(3, 7), torch.zeros(3, 1, 5))
    torch.testing.assert_close(torch.cat([h1, h2], dim=1), ref, rtol=1e-5, atol=1e-6)
    # The hand-written backward of fo-pooling agrees with autograd through the loop.
    weights = torch.randn_like(h1)
    (g_fast,) = torch.autograd.grad((h1 * weights).sum(), x1)
    ref1 = naive_qrnn(layer, x1, torch.zeros(3, 7), torch.zeros(3, 1, 5))
    (g_ref,) = torch.autograd.grad((ref1 * weights).sum(), x1)
    torch.testing.assert_close(g_fast, g_ref, rtol=1e-4, atol=1e-6)


# --- vocabulary -----------------------------------------------------------------------


def test_word_vocabulary_cuts_rare_words_to_unknown() -> None:
    words = tokenize("the cat sat.\nthe dog sat!\nthe end", "word")
    assert words[:5] == ["the", "cat", "sat", ".", "<eos>"]
    vocab = Vocab.build(words, "word", min_freq=2, max_vocab=None)
    assert vocab.itos[0] == "<unk>" and vocab.itos[1] == "the"
    assert set(vocab.itos) == {"<unk>", "the", "sat", "<eos>"}
    assert vocab.encode(["cat", "the"]).tolist() == [0, 1]
    assert len(Vocab.build(words, "word", min_freq=1, max_vocab=3)) == 4  # 3 kept + <unk>


# --- training, through the CLI ------------------------------------------------------------


def test_char_model_trains_and_generates(corpus: Path, run_dir: Path) -> None:
    train(run_dir, *TINY, "data=text", f"data.path={corpus}")
    result = summary(run_dir)
    assert result["status"] == "completed" and result["monitor"] == "perplexity"
    best = result["best"]
    assert best["perplexity"] == pytest.approx(torch.tensor(best["valid_loss"]).exp().item(), rel=1e-6)
    assert best["bpc"] == pytest.approx(best["valid_loss"] / 0.6931471805599453, rel=1e-6)
    vocab = json.loads((run_dir / "vocab.json").read_text())
    assert vocab["tokens"] == "char" and "e" in vocab["itos"]
    assert best["perplexity"] < len(vocab["itos"]) / 2  # a uniform guess scores the vocabulary size

    proc = dlrun("generate", str(run_dir), "--prompt", "The ", "-n", "50", "--seed", "1")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout[:-1]  # the trailing newline
    assert text.startswith("The ") and len(text) == len("The ") + 50
    again = dlrun("generate", str(run_dir), "--prompt", "The ", "-n", "50", "--seed", "1")
    assert again.stdout == proc.stdout  # the seed makes sampling repeatable


@pytest.mark.parametrize("cell", ["gru", "qrnn"])
def test_other_cells_train(cell: str, corpus: Path, run_dir: Path) -> None:
    train(run_dir, *TINY, "data=text", f"data.path={corpus}", f"model.cell={cell}")
    result = summary(run_dir)
    vocab = json.loads((run_dir / "vocab.json").read_text())
    assert result["status"] == "completed" and result["best"]["perplexity"] < len(vocab["itos"]) / 2


def test_word_model_with_valid_file_and_variable_bptt(corpus: Path, tmp_path: Path, run_dir: Path) -> None:
    folder = tmp_path / "words"
    folder.mkdir()
    text = corpus.read_text()
    (folder / "train.txt").write_text(text[:16_000])
    (folder / "valid.txt").write_text(text[16_000:])
    train(
        run_dir,
        *TINY,
        "data=text",
        f"data.path={folder}",
        "data.tokens=word",
        "data.min_freq=2",
        "data.variable_bptt=true",
    )
    vocab = json.loads((run_dir / "vocab.json").read_text())
    assert vocab["tokens"] == "word" and vocab["itos"][0] == "<unk>" and "the" in vocab["itos"]
    assert summary(run_dir)["status"] == "completed"
    proc = dlrun("generate", str(run_dir), "-n", "12", "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.replace("\n", " ").split()) >= 6  # words (end-of-line tokens print as new lines)


def test_bundled_corpus_is_the_default(run_dir: Path) -> None:
    proc = dlrun("train", "model=rnn", "--cfg", "job")
    cfg = OmegaConf.create(proc.stdout)
    assert cfg.data.name == "pydoc" and cfg.data.kind == "text" and cfg.regularization.ar > 0
    assert cfg.trainer.grad_clip is not None


@pytest.mark.slow
def test_sweep_over_bptt_reports_perplexity_and_tokens_per_second(corpus: Path, tmp_path: Path) -> None:
    proc = dlrun(
        "train",
        "-m",
        "trainer.progress=false",
        f"hydra.sweep.dir={tmp_path}",
        *TINY,
        "data=text",
        f"data.path={corpus}",
        "data.bptt=16,32",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for job in ("0", "1"):
        result = summary(tmp_path / job)
        assert result["status"] == "completed" and result["best"]["perplexity"] > 1
        assert result["items_per_s"] > 0


def test_a_diverging_run_stops_and_suggests_a_shorter_bptt(corpus: Path, run_dir: Path) -> None:
    proc = dlrun(
        "train",
        "trainer.progress=false",
        f"hydra.run.dir={run_dir}",
        *TINY,
        "data=text",
        f"data.path={corpus}",
        "optimizer.lr=1e6",
        "trainer.log_every=1",
    )
    assert_user_error(proc, "the loss became", "data.bptt")
    assert summary(run_dir)["status"] == "diverged"


@pytest.mark.slow
def test_default_run_beats_the_unigram_baseline(run_dir: Path) -> None:
    """`dlrun train model=rnn` as the README shows it: the bundled corpus, characters, a few CPU minutes."""
    train(run_dir, "model=rnn")
    best = summary(run_dir)["best"]
    # Unigram (character frequencies) on the same validation text: perplexity 25.5, 4.67 bits/char.
    assert best["perplexity"] < 8 and best["bpc"] < 3
    proc = dlrun("generate", str(run_dir), "-n", "200")
    assert proc.returncode == 0 and len(proc.stdout) > 200


# --- user mistakes ------------------------------------------------------------------------


def test_missing_path(tmp_path: Path, run_dir: Path) -> None:
    missing = tmp_path / "nope.txt"
    proc = dlrun("train", *TINY, f"hydra.run.dir={run_dir}", "data=text", f"data.path={missing}")
    assert_user_error(proc, "nope.txt", "does not exist")


def test_text_data_needs_a_path(run_dir: Path) -> None:
    assert_user_error(dlrun("train", *TINY, f"hydra.run.dir={run_dir}", "data=text"), "data.path=")


def test_empty_corpus(tmp_path: Path, run_dir: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    assert_user_error(
        dlrun("train", *TINY, f"hydra.run.dir={run_dir}", "data=text", f"data.path={empty}"), "empty"
    )


def test_unreadable_corpus(tmp_path: Path, run_dir: Path) -> None:
    binary = tmp_path / "image.txt"
    binary.write_bytes(bytes(range(256)) * 10)
    assert_user_error(
        dlrun("train", *TINY, f"hydra.run.dir={run_dir}", "data=text", f"data.path={binary}"), "UTF-8"
    )


def test_folder_without_train_txt(tmp_path: Path, run_dir: Path) -> None:
    assert_user_error(
        dlrun("train", *TINY, f"hydra.run.dir={run_dir}", "data=text", f"data.path={tmp_path}"), "train.txt"
    )


def test_corpus_shorter_than_one_batch(tmp_path: Path, run_dir: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("Far too short for sixteen rows of thirty-two characters.")
    proc = dlrun("train", *TINY, f"hydra.run.dir={run_dir}", "data=text", f"data.path={short}")
    assert_user_error(proc, "data.bs * data.bptt", "smaller data.bs or data.bptt")


def test_bptt_zero(corpus: Path, run_dir: Path) -> None:
    proc = dlrun(
        "train", *TINY, f"hydra.run.dir={run_dir}", "data=text", f"data.path={corpus}", "data.bptt=0"
    )
    assert_user_error(proc, "data.bptt=0", ">= 1")


def test_unknown_cell(run_dir: Path) -> None:
    assert_user_error(
        dlrun("train", *TINY, f"hydra.run.dir={run_dir}", "model.cell=transformer"),
        "model.cell",
        "lstm, gru, qrnn",
    )


def test_a_list_of_dropouts_is_refused(run_dir: Path) -> None:
    proc = dlrun("train", *TINY, f"hydra.run.dir={run_dir}", "regularization.dropout=[0.1,0.2]")
    assert_user_error(proc, "regularization.dropout", "one number")


def test_rnn_on_image_data_names_the_text_data() -> None:
    assert_user_error(dlrun("train", "model=rnn", "data=digits"), "data=pydoc", "data=text")


def test_generate_needs_a_language_model_run(tmp_path: Path) -> None:
    assert_user_error(dlrun("generate", str(tmp_path / "nowhere")), "does not exist")
    assert_user_error(dlrun("generate", str(tmp_path)), "not a dlrun run directory")
    assert_user_error(dlrun("generate", str(tmp_path), "-n", "0"), "-n 0")


def test_generate_from_a_run_without_best_weights_says_so(corpus: Path, run_dir: Path) -> None:
    train(run_dir, *TINY, "data=text", f"data.path={corpus}", "trainer.checkpoint=false")
    assert_user_error(dlrun("generate", str(run_dir)), "has no best.pt")


def test_vocab_of_a_non_text_run_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(DlrunError, match="text run"):
        Vocab.load(tmp_path)


def test_detach_handles_nested_states() -> None:
    a = torch.ones(2, requires_grad=True) * 2
    out = detach([(a, a), a])
    assert isinstance(out, list) and isinstance(out[0], tuple) and not out[1].requires_grad
