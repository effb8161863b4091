"""The Python face: ``nanogpt.load(source)`` gives a LanguageModel, a GPT with its tokenizer: text in and out.

Every way of generating text goes through one loop: a Sampling (nanogpt/generation/
sampling.py) says how, LanguageModel.tokens() runs GPT.stream over a Decoder
(nanogpt/model.py), and texts() turns the tokens into final pieces of text with a
Detokenizer (nanogpt/generation/detokenize.py). ``python -m nanogpt.sample`` prints
exactly what stream() yields, so generate() with the same settings returns the same
text as the command; chat answers and evaluation's generation tasks come the same way.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from nanogpt.decoding import Decoder
from nanogpt.errors import ConfigError, DataError
from nanogpt.generation.detokenize import Detokenizer
from nanogpt.generation.sampling import Sampling
from nanogpt.insight.numbers import KEEPS, Explanation, explain
from nanogpt.model import GPT, KVCache
from nanogpt.runtime.device import (
    CompiledOrEager,
    autocast,
    compile_mode,
    compiled,
    resolve_device,
    resolve_dtype,
    should_compile,
)
from nanogpt.text.chat_template import ChatTemplate, messages_problem
from nanogpt.text.tokenizers import Tokenizer, UnknownTokenError
from nanogpt.weights.loading import LoadedSource, resolve_source
from nanogpt.weights.quantize import QUANTIZATIONS, quantize_model

DOCUMENT_BREAK = "\n\n"  # what a sample shows where the model wrote end-of-text


class LanguageModel:
    """A GPT with its tokenizer: text in, text out. Made by nanogpt.load().

    ``python -m nanogpt.sample`` prints exactly what stream() yields, so
    generate() with the same settings returns the same text as the command.
    """

    def __init__(self, loaded: LoadedSource, device: torch.device, dtype: torch.dtype,
                 quantize: str | None = None, compile: bool = False, graphs: bool | None = None):
        self.model = quantize_model(loaded.model.to(device).eval(), quantize, device)
        # Compiled, a one-token step is one fused program over a static KV cache (CUDA graphs
        # replay it on a GPU); the prompt still runs eagerly, as its length varies.
        self.step = compiled_step(self.model, device, graphs) if compile else None
        self.caches: dict[int, KVCache] = {}  # rows -> the static cache the compiled step fills
        self.tokenizer = loaded.tokenizer
        self.encode, self.decode = self.tokenizer.encode, self.tokenizer.decode
        self.device, self.dtype = device, dtype
        self.source = loaded
        # The template it was finetuned with (dataset=sft), else the plain one for its tokenizer.
        self.template = ChatTemplate.from_record(loaded.chat_template, loaded.tokenizer)
        self.warned_not_finetuned = False

    def __repr__(self) -> str:
        c = self.model.config
        return (f"LanguageModel({self.source.where!r}: {c.n_layer} layers, {c.n_head} heads, "
                f"{c.n_embd} wide, block {c.block_size}, {self.tokenizer.kind} vocabulary, {self.device})")

    # Text in, text out.

    def generate(self, prompt: str, max_new_tokens: int = 500, temperature: float = 0.8,
                 top_k: int | None = 200, top_p: float | None = None, seed: int | None = 1337,
                 use_cache: bool = True, stop: list[str] | tuple[str, ...] = ()) -> str:
        """The prompt followed by up to max_new_tokens generated tokens, decoded.

        The defaults are nanogpt.sample's; temperature=0 (or top_k=1) is greedy. The
        text ends before the first of the stop strings it writes, if any.
        """
        new = self.stream(prompt, max_new_tokens, temperature, top_k, top_p, seed, use_cache, stop=stop)
        return prompt + "".join(new)

    def stream(self, prompt: str, max_new_tokens: int = 500, temperature: float = 0.8,
               top_k: int | None = 200, top_p: float | None = None, seed: int | None = 1337,
               use_cache: bool = True, generator: torch.Generator | None = None,
               stop: list[str] | tuple[str, ...] = ()) -> Iterator[str]:
        """Yield the new text piece by piece as tokens are sampled (not repeating the prompt).

        A piece is final: a character made of several BPE tokens shows once it is
        whole, and text that may be the start of a stop string once it is not.
        generator, if given, is used instead of a fresh one seeded with seed.
        """
        sampling = Sampling(temperature, top_k, top_p, seed, list(stop), max_new_tokens)
        for pieces in self.stream_rows(prompt, 1, sampling, generator, use_cache):
            yield pieces[0]

    def stream_rows(self, prompt: str, rows: int, sampling: Sampling,
                    generator: torch.Generator | None = None, use_cache: bool = True) -> Iterator[list[str]]:
        """stream() for rows samples of one prompt at once: at each step, each row's new text.

        The rows are decoded together, one batch: on a GPU, 16 take little more time than one.
        """
        yield from self.texts(self.prompt_ids(prompt), rows, sampling, generator, use_cache)

    def prompt_ids(self, prompt: str) -> list[int]:
        """The prompt's token ids, or one line saying why there are none."""
        if not prompt:
            raise ConfigError("the prompt is empty; the model needs at least one token to continue")
        try:
            ids = self.encode(prompt)
        except UnknownTokenError as e:
            raise DataError(f"prompt: {e} of {self.source.where}") from None
        vocab = self.model.config.vocab_size  # a model may have fewer rows than its tokenizer has tokens
        if max(ids, default=0) >= vocab:
            raise DataError(f"prompt: token id {max(ids)} is past the {vocab} tokens {self.source.where} "
                            "has embeddings for; use words its vocabulary holds")
        return ids

    # Looking inside.

    def explain(self, prompt: str, candidates: int = 5, keep: str = "last") -> Explanation:
        """What the model computes reading prompt, as tensors (nanogpt/insight/numbers.py: Explanation).

        Each block's and head's attention weights, each token's log-probability and the
        candidates likeliest after each position, and the logit lens's prediction after each
        block: all from the model's own forward pass (GPT.hidden's record). A prompt longer
        than the model's block is cut to its last block (keep="first": its first one);
        Explanation.cut says how many tokens were left out.
        """
        if keep not in KEEPS:
            raise ConfigError(f"keep={keep!r} is not one of {', '.join(map(repr, KEEPS))}")
        if candidates < 1:
            raise ConfigError(f"candidates={candidates} must be at least 1")
        ids = self.prompt_ids(prompt)
        with autocast(self.device, self.dtype):
            return explain(self.model, self.tokenizer, ids, candidates, keep)

    # The loop: tokens, then text.

    def texts(self, prompt_ids: list[int], rows: int, sampling: Sampling,
              generator: torch.Generator | None = None, use_cache: bool = True, end_id: int | None = None,
              skip_prefix: str = "", ends: list[str] | None = None) -> Iterator[list[str]]:
        """Each row's new final text at each step, until every row has ended or the budget is spent.

        A row ends at a stop string (not shown) or at the token end_id (not shown);
        skip_prefix is text the model writes before the text proper. ends, if given,
        is filled with why each row ended: "stop", "end" (end_id) or "length".
        """
        rows_text = [Detokenizer(self.decode, sampling.stop, skip_prefix) for _ in range(rows)]
        why = [""] * rows
        for tokens in self.tokens(prompt_ids, rows, sampling, generator, use_cache):
            pieces = [""] * rows
            for row, token in enumerate(tokens):
                if why[row]:
                    continue
                if token == end_id:
                    pieces[row], why[row] = rows_text[row].finish(), "end"
                    continue
                pieces[row] = rows_text[row].add(token)
                why[row] = "stop" if rows_text[row].stopped else ""
            yield pieces
            if all(why):
                break
        yield [text.finish() for text in rows_text]
        if ends is not None:
            ends[:] = [reason or "length" for reason in why]

    def tokens(self, prompt_ids: list[int], rows: int, sampling: Sampling,
               generator: torch.Generator | None = None, use_cache: bool = True) -> Iterator[list[int]]:
        """The next token of each of rows continuations of prompt_ids, decoded together, per step."""
        generator = generator or sampling.generator(self.device)
        idx = torch.tensor([prompt_ids] * rows, dtype=torch.long, device=self.device)
        with autocast(self.device, self.dtype):
            decoder = self.decoder(rows) if use_cache else None
            s = sampling
            for tokens in self.model.stream(idx, s.max_new_tokens, s.temperature, s.top_k, s.top_p,
                                            use_cache, generator, decoder):
                yield tokens[:, 0].tolist()

    def decoder(self, rows: int) -> Decoder:
        """A Decoder for rows sequences: the compiled step's, over its own static cache for that many
        rows (kept, so that the step always sees the same buffers), else the model's over a new cache.

        Call it where the model computes (under autocast on a GPU): the cache takes that precision.
        """
        if self.step is None:
            return Decoder(self.model, self.model.new_cache(rows))
        if rows not in self.caches:
            self.caches[rows] = self.model.new_cache(rows, static=True)
        return Decoder(self.model, self.caches[rows], self.step)

    # Conversations.

    def chat(self, messages: str | list[dict], max_new_tokens: int = 256, temperature: float = 0.8,
             top_k: int | None = 200, top_p: float | None = None, seed: int | None = 1337,
             system: str | None = None) -> str:
        """The model's answer to a message (a string) or to a conversation (a list of
        ``{"role": "system"|"user"|"assistant", "content": ...}`` ending with the user's).

        The conversation is written with the chat template the model was
        finetuned with; the answer ends at the end-of-text token (or after
        max_new_tokens). temperature=0 is greedy.
        """
        return "".join(self.stream_chat(messages, max_new_tokens, temperature, top_k, top_p, seed, system))

    def stream_chat(self, messages: str | list[dict], max_new_tokens: int = 256, temperature: float = 0.8,
                    top_k: int | None = 200, top_p: float | None = None, seed: int | None = 1337,
                    system: str | None = None, generator: torch.Generator | None = None,
                    fit: ChatFit | None = None) -> Iterator[str]:
        """Yield the answer piece by piece (what chat() returns whole); the end-of-text is never shown.

        fit, if given, is filled in with what was dropped and cut, the answer's
        room and why it ended (ChatFit; see answer()).
        """
        if not self.finetuned_for_chat and not self.warned_not_finetuned:
            self.warned_not_finetuned = True
            warnings.warn(not_finetuned_note(self), stacklevel=2)
        sampling = Sampling(temperature, top_k, top_p, seed, max_new_tokens=max_new_tokens)
        yield from self.answer(messages, sampling, generator, fit, system)

    def answer(self, messages: str | list[dict], sampling: Sampling,
               generator: torch.Generator | None = None, fit: ChatFit | None = None,
               system: str | None = None) -> Iterator[str]:
        """The answer to messages, piece by piece, as sampling says.

        The prompt and the answer share the model's block_size, and the answer
        never pushes the prompt out: the oldest turns are dropped to leave the
        answer min(max_new_tokens, block_size // 2) tokens; a newest message
        longer than that is kept whole while it fits (the answer then has less
        room), else cut from the left.
        """
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        conversation = list(messages)
        if system is not None:
            conversation.insert(0, {"role": "system", "content": system})
        problem = messages_problem(conversation, for_training=False)
        if problem is not None:
            raise ConfigError(f"chat: {problem}")
        prompt_ids, fit = self.chat_prompt(conversation, sampling.max_new_tokens, fit)
        template, ends = self.template, []
        stops = [*sampling.stop, *([template.end_text] if template.end_id is None else [])]
        for pieces in self.texts(prompt_ids, 1, replace(sampling, stop=stops, max_new_tokens=fit.room),
                                 generator, end_id=template.end_id, skip_prefix=template.answer_start,
                                 ends=ends):
            if pieces[0]:
                yield pieces[0]
        if ends[0] != "length":
            fit.ended = "end"

    def chat_prompt(self, conversation: list[dict], max_new_tokens: int,
                    fit: ChatFit | None = None) -> tuple[list[int], ChatFit]:
        """The prompt ids of the answer to a checked conversation, and how it fits (see answer()).

        The server (nanogpt/serving) builds its chat prompts here too, so they are
        the ones answer() builds for the same messages and max_new_tokens.
        """
        block_size = self.model.config.block_size
        reserve = max(1, min(max_new_tokens, block_size // 2))  # what older turns make room for
        try:
            prompt_ids, dropped, cut = self.template.prompt(conversation, self.encode, block_size - reserve,
                                                            longest=block_size - 1)
        except UnknownTokenError as e:
            raise DataError(f"message: {e} of {self.source.where}") from None
        fit = fit if fit is not None else ChatFit()
        fit.dropped, fit.cut, fit.block_size = dropped, cut, block_size
        fit.room = min(max_new_tokens, block_size - len(prompt_ids))  # new tokens never slide the prompt out
        fit.ended = "context" if fit.room < max_new_tokens else "max_new_tokens"
        return prompt_ids, fit

    @property
    def finetuned_for_chat(self) -> bool:
        """True when the model was finetuned on instruction data (its checkpoint records the template)."""
        return self.source.chat_template is not None


@dataclass
class ChatFit:
    """How one answer fitted the model's context, for chat to say: nothing is left out without a word."""

    dropped: int = 0  # the oldest turns left out of the prompt
    cut: int = 0  # tokens cut from the start of the newest message, longer than the context
    room: int = 0  # the most tokens the answer could take: max_new_tokens, or what the context had left
    block_size: int = 0  # the model's context
    ended: str = ""  # why the answer ended: "end" (the model ended it), "max_new_tokens", "context" (full)


def not_finetuned_note(lm: LanguageModel) -> str:
    """Why a model never finetuned on instruction data answers poorly, and how to finetune it."""
    return (f"note: {lm.source.where} was not finetuned on instruction data, so it continues the "
            "conversation's text rather than answering it (often with nothing); finetune it first: "
            f"python -m nanogpt.train model.init_from={lm.source.where} dataset=sft "
            "dataset.source=CHATS.jsonl (docs/finetuning.md)")


def compiled_step(model: GPT, device: torch.device, graphs: bool | None = None) -> CompiledOrEager:
    """Model compiled for one-token steps over a static KVCache: one graph, never recompiled.

    The Decoder calls it for every token after the prompt; graphs (device.cuda_graphs)
    replays it as a CUDA graph on a GPU. If compiling or capturing fails, it warns once and
    the tokens come from the model itself.
    """
    return compiled(model, "generation's one-token step", compile_mode(graphs, device), fullgraph=True,
                    dynamic=False)


def load(source: str | Path, device: str = "auto", dtype: str = "auto",
         meta: str | Path | None = None, quantize: str | None = None,
         compile: bool | None = None) -> LanguageModel:
    """A model ready to generate text, from any source nanogpt knows (see ACCEPTED).

    device is auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps; dtype
    auto (bfloat16 or float16 on CUDA, else float32), float32, bfloat16 or
    float16. meta points at a karpathy/nanoGPT meta.pkl that is not where
    nanoGPT's own sample.py would find it. quantize="int8" stores the Linear
    weights as int8 for faster generation on a CPU (nanogpt/weights/quantize.py).
    compile: torch.compile each one-token step (None: not yet, as no GPU has measured it).
    """
    if quantize not in QUANTIZATIONS:
        raise ConfigError(f"quantize={quantize!r} is not one of {', '.join(map(repr, QUANTIZATIONS))}")
    torch_device = resolve_device(device)
    loaded = resolve_source(source, key="source", meta=meta)
    return LanguageModel(loaded, torch_device, resolve_dtype(dtype, torch_device), quantize,
                         should_compile(compile, torch_device, generating=True))


def sample_text(model: GPT, tokenizer: Tokenizer, num_tokens: int, device: torch.device) -> str:
    """What the model writes after a newline (temperature 1, top_k 200): a glance at what it learned.

    Text, not token markers: where the model ends a document (the end-of-text
    token, which a model trained on documents or instruction data writes often,
    and an undertrained one many times in a row), the sample has a blank line.
    """
    try:
        start = tokenizer.encode("\n")
    except UnknownTokenError:  # a character vocabulary without newlines
        start = [0]
    model.eval()
    ids = model.generate(torch.tensor([start], device=device), num_tokens, temperature=1.0, top_k=200)
    documents = [[]]
    for token in ids[0].tolist():
        if token == tokenizer.eot:
            documents.append([])
        else:
            documents[-1].append(token)
    return DOCUMENT_BREAK.join(tokenizer.decode(document) for document in documents if document)
