"""Looking inside a model (nanogpt/insight, python -m nanogpt.explain), checked against the model itself.

The numbers come from the model's own forward pass, so they must agree with what the model
computes elsewhere: attention rows are distributions over the past, the logit lens after the
last block is the model's logits, and the per-token losses average to GPT.forward's loss.
The command's page and PNGs are written for our run and for a Hugging Face directory made
here; the page is opened in headless chromium (slow tier).
"""

from __future__ import annotations

import base64
import json
import re

import pytest
import torch

from nanogpt.errors import DataError
from nanogpt.explain import about
from nanogpt.generation.language_model import load
from nanogpt.insight import page
from nanogpt.insight.numbers import logit_lens
from nanogpt.insight.page import MAX_HEADS, MAX_LAYERS, MAX_TOKENS, notes, page_html
from nanogpt.insight.reading import embedding_map, summarize_head

from .commands import run_in_process
from .conftest import run_module
from .test_gpt2 import random_hf_model

TEXT = "ROMEO: I am ROMEO.\nJULIET: I am"  # within the shared run's block of 32


@pytest.fixture(scope="module")
def lm(trained_run):
    _, run_dir, _ = trained_run
    return load(run_dir / "best.pt", device="cpu")


@pytest.fixture(scope="module")
def explained(lm):
    return lm.explain(TEXT)


def test_attention_rows_are_distributions_over_the_past(lm, explained):
    e = explained
    T = len(e.tokens)
    assert e.attention.shape == (lm.model.config.n_layer, lm.model.config.n_head, T, T)
    torch.testing.assert_close(e.attention.sum(-1), torch.ones(e.attention.shape[:-1]))
    future = torch.ones(T, T, dtype=torch.bool).triu(diagonal=1)
    assert (e.attention[..., future] == 0).all()
    assert (e.attention[..., ~future] > 0).all()  # a softmax: every past token gets some weight
    # What a position reads cannot depend on what comes after it.
    changed = lm.explain(TEXT[:-5] + "NURSE")
    torch.testing.assert_close(changed.attention[..., :T - 5, :T - 5], e.attention[..., :T - 5, :T - 5])
    assert not torch.allclose(changed.attention[..., -1, :], e.attention[..., -1, :])


def test_the_lens_after_the_last_block_is_the_models_own_logits(lm, explained):
    e = explained
    with torch.no_grad():
        logits, _ = lm.model(e.ids[None], e.ids[None])  # every position's logits, by the fused kernel
        lens = logit_lens(lm.model, e.residual[-1])
    torch.testing.assert_close(lens, logits[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(e.lens_ids[-1], logits[0].argmax(-1))
    torch.testing.assert_close(e.lens_answer_logprobs[-1], e.top_logprobs[:, 0])
    torch.testing.assert_close(e.top_logprobs, logits[0].log_softmax(-1).topk(5).values)
    # The earlier blocks' guesses differ from the final one somewhere: the lens shows something.
    assert not torch.allclose(e.lens_answer_logprobs[0], e.lens_answer_logprobs[-1])


def test_the_per_token_losses_average_to_the_models_loss(lm, explained):
    e = explained
    with torch.no_grad():
        _, loss = lm.model(e.ids[None, :-1], e.ids[None, 1:])
    assert e.logprobs.shape == (len(e.tokens) - 1,)
    assert e.loss() == pytest.approx(float(loss), rel=1e-5)
    torch.testing.assert_close(e.surprise_bits, -e.logprobs / torch.log(torch.tensor(2.0)))
    assert "".join(e.tokens) == TEXT


def test_a_text_longer_than_the_block_keeps_its_last_block(lm):
    block = lm.model.config.block_size
    text = (TEXT * 3)[:block + 7]
    last, first = lm.explain(text), lm.explain(text, keep="first")
    assert (last.cut, first.cut) == (7, 7)
    assert "".join(last.tokens) == text[-block:] and "".join(first.tokens) == text[:block]


def test_head_rule_names_a_previous_token_head_and_a_spread_one():
    T = 8
    previous = torch.zeros(T, T)
    previous[0, 0] = 1
    previous[torch.arange(1, T), torch.arange(T - 1)] = 1
    assert summarize_head(previous).kind == "previous-token"
    two_back = torch.zeros(T, T)
    two_back[torch.arange(T), (torch.arange(T) - 2).clamp_min(0)] = 1
    assert summarize_head(two_back).line == "2-back head: 100% of its weight, on average, on the token 2 back"
    sink = torch.zeros(T, T)
    sink[:, 0] = 0.7
    sink[torch.arange(T), torch.arange(T)] += 0.3
    assert summarize_head(sink).kind == "first-token"
    uniform = torch.ones(T, T).tril()
    uniform = uniform / uniform.sum(-1, keepdim=True)
    summary = summarize_head(uniform)
    # Row t spreads over t + 1 tokens: e^mean(log(t + 1)) of them, t / 2 back, 1 / (t + 1) on each.
    assert summary.kind == "spread"
    assert summary.line == ("spread: over about 5.2 tokens, on average 2.2 tokens back; the most, 20%, "
                            "on its own token")


def page_data(html: str) -> dict:
    text = re.search(r'<script type="application/json" id="data">(.*?)</script>', html, re.S).group(1)
    return json.loads(text)


def test_the_page_holds_what_the_model_computed_and_fetches_nothing(lm, explained):
    embedding = embedding_map(lm.model, lm.tokenizer)
    html = page_html(page.page_data(explained, lm.tokenizer, about(lm), embedding, []))
    assert not re.search(r"<(script|link|img|iframe)[^>]+(src|href)=|url\(|@import", html)  # self-contained
    data = page_data(html)
    assert "".join(data["tokens"]) == TEXT
    assert len(data["attention"]) == 2 and len(data["attention"][0]) == 2
    T = len(TEXT)
    weights = base64.b64decode(data["attention"][1][0])
    assert len(weights) == T * (T + 1) // 2  # the causal rows alone
    assert weights[-T:] == bytes((explained.attention[1, 0, -1] * 255).round().to(torch.uint8).tolist())
    # Token t's surprise and candidates are those read after token t - 1.
    assert data["surprise"][0] is None
    assert data["surprise"][5] == pytest.approx(float(explained.surprise_bits[4]), abs=1e-3)
    expected = [lm.tokenizer.decode([int(i)]) for i in explained.top_ids[4]]
    assert [c[0] for c in data["expected"][5]] == expected
    assert data["embedding"]["classes"][data["embedding"]["tokens"].index("R")] == "upper-case letter"
    assert len(data["embedding"]["points"]) == lm.model.config.vocab_size
    assert len(data["heads"]) == 2 and all(h["line"] for block in data["heads"] for h in block)


@pytest.mark.slow
def test_the_command_writes_a_self_contained_page_and_pngs(trained_run, tmp_path):
    _, run_dir, _ = trained_run
    result = run_in_process("nanogpt.explain", f"ckpt={run_dir}", f"prompt='{TEXT}'", "out=pictures",
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "wrote pictures: explain.html" in result.stdout
    written = sorted(p.name for p in (tmp_path / "pictures").iterdir())
    pictures = ("surprise.png", "attention.png", "logit_lens.png", "embeddings.png")
    assert written == sorted(["explain.html", *pictures, ".nanogpt-explain.json"]) or \
        set(written) >= {"explain.html", *pictures}, written
    for name in pictures:
        assert (tmp_path / "pictures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (tmp_path / "pictures" / "explain.html").read_text()
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=", html)  # nothing fetched
    data = page_data(html)
    assert "".join(data["tokens"]) == TEXT and len(data["attention"]) == 2 and len(data["attention"][0]) == 2
    assert data["embedding"] is not None and len(data["embedding"]["points"]) == 33
    # Run again into the same directory: it replaces its own page; a folder of the user's it refuses.
    again = run_in_process("nanogpt.explain", f"ckpt={run_dir}", "prompt=ROMEO", "out=pictures", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert page_data((tmp_path / "pictures" / "explain.html").read_text())["tokens"] == list("ROMEO")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("my own")
    refused = run_in_process("nanogpt.explain", f"ckpt={run_dir}", "prompt=ROMEO", "out=mine", cwd=tmp_path)
    assert refused.returncode != 0
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]
    assert len(refused.stderr.strip().splitlines()) == 1 and "out=mine" in refused.stderr


@pytest.mark.parametrize(("args", "says"), [
    (["prompt="], "prompt is empty"),
    ([], "give prompt=TEXT or prompt_file=PATH"),
    (["prompt_file=absent.txt"], "prompt_file=absent.txt does not exist"),
    (["prompt=ROMEO", "candidates=0"], "candidates=0 must be between 1 and 20"),
    (["prompt=ROMEO?"], "'?' (U+003F) is not in the vocabulary"),
])
def test_bad_input_is_one_line_and_writes_nothing(trained_run, tmp_path, args, says):
    _, run_dir, _ = trained_run
    result = run_in_process("nanogpt.explain", f"ckpt={run_dir}", *args, "out=pictures", cwd=tmp_path)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "pictures").exists()


def test_a_long_text_says_what_is_shown(lm):
    text = "ROMEO: I am ROMEO. " * 4
    e = lm.explain(text)
    assert notes(e, about(lm), len(e.tokens) + e.cut) == [
        "the text is 76 tokens, longer than the model's block of 32: shown is its last 32 tokens, as the "
        "model reads them"]


def hf_directory(path, **shape):
    """A small random GPT-2-format model saved to path, whose attention weights transformers returns
    (its eager attention: the fused one keeps them to itself).
    """
    return random_hf_model(path, std=0.1, attn_implementation="eager", **shape)


@pytest.mark.slow  # transformers' import and a second model: seconds
def test_a_hugging_face_model_is_read_the_same_way(tmp_path, bpe_cache):
    reference = hf_directory(tmp_path / "hf", n_layer=3, n_head=4, n_embd=32, n_positions=64, vocab_size=4000)
    lm = load(tmp_path / "hf", device="cpu")
    e = lm.explain("the cat sat on the mat, and the dog sat on the cat.")  # BPE ids below 4000
    with torch.no_grad():
        out = reference(e.ids[None], output_attentions=True)
    # transformers' own weights and logits: the same numbers, computed by another program.
    torch.testing.assert_close(e.attention, torch.stack(out.attentions)[:, 0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logit_lens(lm.model, e.residual[-1])[:, :4000], out.logits[0],
                               atol=1e-4, rtol=1e-4)
    with pytest.raises(DataError, match="token id 38656 is past the 4000 tokens"):  # " Xylophone"
        lm.explain("the Xylophone")


@pytest.mark.slow
def test_a_model_larger_than_the_page_is_drawn_in_part_and_said(tmp_path, bpe_cache):
    # A vocabulary of the text's BPE ids alone (they are below 4000): the lens over 50257 takes seconds.
    hf_directory(tmp_path / "hf", n_layer=MAX_LAYERS + 1, n_head=MAX_HEADS + 1, n_embd=26,
                 n_positions=MAX_TOKENS + 16, vocab_size=4000)
    text = "the cat sat on the mat. " * 50  # 350 or so BPE tokens, past the block of 272
    result = run_in_process("nanogpt.explain", f"ckpt={tmp_path / 'hf'}", f"prompt='{text}'", "out=pictures",
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if line.startswith("note:")]
    assert re.fullmatch(r"note: the text is 35\d tokens, longer than the model's block of 272: shown is its "
                        "last 272 tokens, as the model reads them", notes[0]), notes
    assert any(f"at most {MAX_TOKENS} tokens" in n for n in notes), notes
    assert any(f"at most {MAX_LAYERS} blocks x {MAX_HEADS} heads" in n and "blocks 13-13" in n
               and "heads 13-13" in n for n in notes), notes
    data = page_data((tmp_path / "pictures" / "explain.html").read_text())
    assert len(data["attention"]) == MAX_LAYERS and len(data["attention"][0]) == MAX_HEADS
    assert len(data["tokens"]) == MAX_TOKENS and data["embedding"] is None
    assert data["notes"] == [n.removeprefix("note: ") for n in notes]


@pytest.mark.slow
def test_the_page_opens_in_a_browser_with_every_map_and_candidates_on_hover(trained_run, tmp_path, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    _, run_dir, _ = trained_run
    result = run_module("nanogpt.explain", f"ckpt={run_dir}", f"prompt='{TEXT}'", "out=pictures",
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    page = tmp_path / "pictures" / "explain.html"
    data = page_data(page.read_text())
    browser.get(page.as_uri())
    maps = browser.find_elements(By.CSS_SELECTOR, "#grid figure.head canvas")
    assert len(maps) == 2 * 2
    assert [int(m.get_attribute("width")) for m in maps] == [len(TEXT)] * 4
    assert browser.find_element(By.ID, "where").text.endswith("best.pt")
    tokens = browser.find_elements(By.CSS_SELECTOR, "#text .token")
    assert len(tokens) == len(TEXT) + 1  # and "next?"
    ActionChains(browser).move_to_element(tokens[9]).perform()
    panel = browser.find_element(By.ID, "candidates").text
    assert f"Token 10, “{TEXT[9].replace(' ', '␣')}”" in panel
    for candidate, _ in data["expected"][9]:
        assert f"“{candidate.replace(' ', '␣').replace(chr(10), '↵')}”" in panel
    browser.find_element(By.CSS_SELECTOR, "#grid figure.head").click()
    assert browser.find_element(By.ID, "zoom").is_displayed()
    assert "Block 1, head 1" in browser.find_element(By.ID, "zoom-title").text
    rows = browser.find_elements(By.CSS_SELECTOR, "#lens-table tbody tr")
    assert len(rows) == 2 + 1  # a row a block, and the text's next token
    assert len(browser.find_elements(By.CSS_SELECTOR, "#map text.point")) == 33
    assert not [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
