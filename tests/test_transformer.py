"""Transformer language model: shapes, causality, weight tying, long windows, generation's
`feed` (and the RNN's), the config, user errors."""

from __future__ import annotations

import pytest
import torch
from conftest import compose, dlrun
from omegaconf import OmegaConf

from dlrun.config import validate
from dlrun.data.text import TextFacts, Vocab
from dlrun.errors import DlrunError
from dlrun.generate import sample
from dlrun.models import transformer
from dlrun.models.rnn import RNNLanguageModel

FACTS = TextFacts(n_out=50, tokens="char", bptt=16)
NO_DROP = dict.fromkeys(("embed", "input", "hidden", "weight", "output"), 0.0)


def config(dropout: float | list = 0.0, **model: object):
    """cfg.model and cfg.regularization of a tiny Transformer (model keys overridable)."""
    sizes = dict(n_embd=16, n_head=2, n_layers=2, context=None, bias=False, tie_weights=True)
    return OmegaConf.create({"model": {**sizes, **model}, "regularization": {"dropout": dropout}})


def tiny(**model: object) -> transformer.TransformerLanguageModel:
    torch.manual_seed(0)
    return transformer.build(config(**model), FACTS).eval()


@pytest.mark.parametrize("bias", [False, True])
def test_logits_have_one_row_per_position(bias: bool) -> None:
    model = tiny(bias=bias)
    assert model.context == FACTS.bptt  # context=null: the positions the training windows train
    logits = model(torch.randint(0, 50, (3, 16)))
    assert logits.shape == (3, 16, 50) and torch.isfinite(logits).all()


def test_a_position_sees_only_the_tokens_before_it() -> None:
    model = tiny()
    x = torch.randint(0, 50, (2, 12))
    changed = x.clone()
    changed[:, 7:] = (x[:, 7:] + 1) % 50
    a, b = model(x), model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_decoder_shares_the_token_embedding() -> None:
    model = tiny()
    assert model.decoder.weight is model.tok_emb.weight
    untied = tiny(tie_weights=False)
    assert untied.decoder.weight is not untied.tok_emb.weight


def test_gpt2_init_scales_the_residual_projections() -> None:
    model = tiny(n_embd=64, n_head=4, n_layers=8, context=64)
    assert model.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.1)
    for block in model.blocks:
        assert block.mlp.proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.1)  # 1/sqrt(2*8)


def test_a_window_longer_than_the_context_is_read_in_chunks() -> None:
    model = tiny(context=8)
    x = torch.randint(0, 50, (2, 20))
    whole = model(x)
    parts = torch.cat([model(x[:, :8]), model(x[:, 8:16]), model(x[:, 16:])], dim=1)
    assert whole.shape == (2, 20, 50)
    torch.testing.assert_close(whole, parts)
    model.train()
    model(x).sum().backward()  # and it trains
    assert model.pos_emb.weight.grad is not None


def test_training_steps_lower_the_loss() -> None:
    torch.manual_seed(0)
    model = transformer.build(config(dropout=0.1), FACTS)
    x = torch.randint(0, 50, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), x[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0


def test_dropout_acts_in_training_only() -> None:
    torch.manual_seed(0)
    model = transformer.build(config(dropout=0.5), FACTS)
    x = torch.randint(0, 50, (2, 10))
    assert not torch.allclose(model(x), model(x))
    model.eval()
    torch.testing.assert_close(model(x), model(x))


# --- generation: feed ---------------------------------------------------------------------


def test_feed_gives_the_logits_of_the_whole_sequence_in_a_sliding_window() -> None:
    model = tiny(context=8)
    seq = torch.randint(0, 50, (1, 15))
    model.reset_state()
    with torch.no_grad():
        fed = [model.feed(seq[:, :5])]  # a prompt, then one token at a time
        fed += [model.feed(seq[:, t : t + 1]) for t in range(5, 15)]
        assert model.buffer.shape == (1, 8)  # cropped to the last `context` tokens
        assert torch.equal(model.buffer, seq[:, -8:])
        for t, logits in zip(range(4, 15), fed, strict=True):
            window = seq[:, max(0, t + 1 - 8) : t + 1]
            assert logits.shape == (50,)
            torch.testing.assert_close(logits, model(window)[0, -1])
    model.reset_state()
    assert model.buffer is None


def test_a_prompt_longer_than_the_context_keeps_its_end() -> None:
    model = tiny(context=8)
    seq = torch.randint(0, 50, (1, 30))
    with torch.no_grad():
        torch.testing.assert_close(model.feed(seq), model(seq[:, -8:])[0, -1])


@pytest.mark.parametrize("cell", ["lstm", "gru", "qrnn"])
def test_rnn_feed_matches_its_forward(cell: str) -> None:
    torch.manual_seed(0)
    model = RNNLanguageModel(50, 8, 16, 2, cell, True, 2, NO_DROP, 0.0, 0.0).eval()
    seq = torch.randint(0, 50, (1, 12))
    with torch.no_grad():
        model.reset_state()
        whole = model(seq)[0]
        model.reset_state()
        fed = [model.feed(seq[:, :4])] + [model.feed(seq[:, t : t + 1]) for t in range(4, 12)]
    torch.testing.assert_close(torch.stack(fed), whole[3:])


def old_sample(model, vocab: Vocab, prompt: str, n: int, temperature: float, seed: int) -> str:
    """generate.sample as it was before `feed`: the model called on the new tokens directly."""
    ids = vocab.encode(list(prompt)).unsqueeze(0)
    g = torch.Generator().manual_seed(seed)
    out: list[int] = []
    model.reset_state()
    with torch.no_grad():
        for _ in range(n):
            logits = model(ids)[0, -1].float()
            probs = torch.softmax(logits / temperature, -1)
            out.append(int(torch.multinomial(probs, 1, generator=g)))
            ids = torch.tensor([[out[-1]]])
    return vocab.decode(out)


def test_sample_draws_the_same_rnn_text_as_before() -> None:
    vocab = Vocab(["<unk>", *"abcdefghij "], "char")
    torch.manual_seed(0)
    model = RNNLanguageModel(len(vocab), 8, 16, 2, "lstm", True, 2, NO_DROP, 0.0, 0.0).eval()
    text = sample(model, vocab, "abc ", 40, 1.0, seed=3)
    assert len(text) == 40 and text == old_sample(model, vocab, "abc ", 40, 1.0, seed=3)


def test_sample_generates_from_a_transformer() -> None:
    vocab = Vocab(["<unk>", *"abcdefghij "], "char")
    torch.manual_seed(0)
    facts = TextFacts(n_out=len(vocab), tokens="char", bptt=4)
    model = transformer.build(config(), facts).eval()
    text = sample(model, vocab, "abc ", 40, 1.0, seed=3)  # runs past the 4-token context
    assert len(text) == 40 and text == sample(model, vocab, "abc ", 40, 1.0, seed=3)
    assert sample(model, vocab, "abc ", 5, 0.0, seed=0) == sample(model, vocab, "abc ", 5, 0.0, seed=9)


# --- config and user errors ---------------------------------------------------------------


def test_model_transformer_composes_and_builds() -> None:
    proc = dlrun("train", "model=transformer", "--cfg", "job")
    assert proc.returncode == 0, proc.stderr
    cfg = OmegaConf.create(proc.stdout)
    assert cfg.data.name == "pydoc" and cfg.trainer.grad_clip is not None
    assert cfg.regularization.wd == 0.1 and cfg.model.family == "text"
    model = transformer.build(cfg, TextFacts(n_out=104, tokens="char", bptt=cfg.data.bptt))
    assert model.context == cfg.data.bptt and len(model.blocks) == cfg.model.n_layers


def test_a_list_of_dropouts_is_refused() -> None:
    with pytest.raises(DlrunError, match=r"regularization.dropout=\[0.1, 0.2\].*one number"):
        transformer.build(config(dropout=[0.1, 0.2]), FACTS)


def test_n_embd_must_be_a_multiple_of_n_head() -> None:
    with pytest.raises(DlrunError, match="model.n_embd=30 is not a multiple of model.n_head=4") as e:
        transformer.build(config(n_embd=30, n_head=4), FACTS)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("key, value", [("context", 0), ("context", 2.5), ("n_head", 0), ("n_embd", -4)])
def test_sizes_must_be_positive_integers(key: str, value: object) -> None:
    with pytest.raises(DlrunError, match=f"model.{key}={value}.* must be an integer >= 1"):
        validate(compose("model=transformer", f"model.{key}={value}"))


# --- through the command line ----------------------------------------------------------------

TINY_RUN = [
    "model=transformer",
    "model.n_embd=16",
    "model.n_head=2",
    "model.n_layers=1",
    "data.bs=8",
    "data.bptt=16",
    "trainer.epochs=1",
    "trainer.limit_batches=30",
    "optimizer.lr=1e-2",
]


@pytest.mark.parametrize("extra", [[], ["data.variable_bptt=true", "model.context=16"]])
def test_trains_on_the_bundled_prose_and_generates(run_dir, extra) -> None:
    import json

    from conftest import summary, train

    train(run_dir, *TINY_RUN, *extra)
    result = summary(run_dir)
    vocab = json.loads((run_dir / "vocab.json").read_text())
    assert result["status"] == "completed" and result["monitor"] == "perplexity"
    assert result["best"]["perplexity"] < len(vocab["itos"]) / 2  # a uniform guess scores the vocabulary size
    proc = dlrun("generate", str(run_dir), "-n", "60", "--prompt", "The ")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("The ") and len(proc.stdout) >= 60
