"""Timing the real training step and generation, as ``python -m nanogpt.bench`` reports them.

A benchmark, not a test: nothing here asserts on time.
"""

from __future__ import annotations

import platform
import resource
import subprocess
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

from nanogpt.decoding import Decoder
from nanogpt.generation.language_model import compiled_step
from nanogpt.training.trainer import Trainer


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so wall-clock time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def time_training(trainer: Trainer, warmup_steps: int, train_steps: int) -> dict:
    """ms/iter, tokens/s, MFU and peak memory of trainer.train_step(), as training measures them.

    The timed steps' losses are kept too (read once the timing is over, so that no step
    waits for the host): two runs of one seed that compute the same thing differently
    (CUDA graphs, say) can be compared step by step.
    """
    device = trainer.runtime.device
    for _ in range(warmup_steps):
        trainer.train_step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer.throughput.restart()
    losses = [trainer.train_step() for _ in range(train_steps)]
    synchronize(device)
    speed = trainer.throughput.measure()
    return {"train_ms_per_iter": speed["ms_per_iter"], "train_tokens_per_sec": speed["tokens_per_sec"],
            "mfu": speed.get("mfu"), "peak_memory_mb": peak_memory_mb(device),
            "losses": [loss.item() for loss in losses]}


def generation_step(trainer: Trainer, compiled: bool) -> Callable | None:
    """The one-token step generation decodes with: the model (None), or its compiled step.

    Compiled, it is replayed as CUDA graphs on a GPU unless device.cuda_graphs=false: the
    candidate a GPU sitting measures against eager.
    """
    if not compiled:
        return None
    graphs = trainer.cfg.device.cuda_graphs
    return compiled_step(trainer.model, trainer.runtime.device, True if graphs is None else graphs)


def time_generation(trainer: Trainer, new_tokens: int, use_cache: bool, rows: int = 1,
                    step: Callable | None = None) -> dict:
    """Milliseconds per generation step (rows sequences decoded together) from a one-token prompt.

    Generation runs as sampling does, through GPT.stream and its Decoder, with step (a
    compiled one-token step over a static cache, generation_step) where given, after a
    warm-up that covers the compilation and the cache's refill at block_size.
    """
    model, device = trainer.model, trainer.runtime.device
    model.eval()
    prompt = torch.zeros((rows, 1), dtype=torch.long, device=device)
    warmup = model.config.block_size + 8 if step is not None else 8
    with trainer.ctx:
        cache = model.new_cache(rows, static=step is not None)

        def decoder() -> Decoder | None:  # a new sequence in the buffers the step was compiled for
            return Decoder(model, cache, step) if use_cache else None

        for _ in model.stream(prompt, warmup, use_cache=use_cache, decoder=decoder()):
            pass
        synchronize(device)
        start = time.perf_counter()
        for token in model.stream(prompt, new_tokens, top_k=200, use_cache=use_cache, decoder=decoder()):
            token.tolist()  # a streaming caller needs each token on the host
        seconds = time.perf_counter() - start
    model.train()
    return {"ms_per_token": seconds * 1000 / new_tokens, "tokens_per_sec": rows * new_tokens / seconds,
            "rows": rows}


def greedy_agreement(trainer: Trainer, step: Callable, new_tokens: int = 200) -> dict:
    """Whether the compiled step's greedy tokens are eager's, over new_tokens (across a refill if the
    block is shorter): a faster path is only a candidate for the default if it gives the same text.
    """
    model, device = trainer.model, trainer.runtime.device
    model.eval()
    prompt = torch.zeros((1, 1), dtype=torch.long, device=device)
    with trainer.ctx:
        eager = torch.cat(list(model.stream(prompt, new_tokens, temperature=0)), dim=1)[0].tolist()
        cache = model.new_cache(1, static=True)
        ours = model.stream(prompt, new_tokens, temperature=0, decoder=Decoder(model, cache, step))
        compiled = torch.cat(list(ours), dim=1)[0].tolist()
    model.train()
    first = next((i for i, (a, b) in enumerate(zip(eager, compiled, strict=True)) if a != b), None)
    return {"tokens": new_tokens, "same": first is None, "first_difference": first,
            "fell_back": getattr(step, "failed", None)}


def peak_memory_mb(device: torch.device) -> float:
    """Peak device memory on CUDA; peak resident memory of this process elsewhere."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def describe_machine(device: torch.device) -> dict:
    """Where the figures were taken: device, torch version, threads, commit, date."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
            cwd=Path(__file__).parent, timeout=10,
        ).stdout.strip() or None
    except OSError:
        commit = None
    return {
        "device": f"{device.type}: {name}",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "commit": commit,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def format_table(results: dict) -> str:
    """The results as a two-column text table."""
    m, s, t = results["machine"], results["settings"], results["train"]
    rows = [
        ("device", m["device"]),
        ("torch / threads", f"{m['torch']} / {m['threads']}"),
        ("model (layers/heads/width)", f"{s['model']}, {s['params_m']:.2f}M params" + (
            f", {s['trainable_params_m']:.2f}M trained (LoRA)"
            if s.get("trainable_params_m", s["params_m"]) < s["params_m"] else "")),
        ("block x batch x accum",
         f"{s['block_size']} x {s['batch_size']} x {s['gradient_accumulation_steps']}"),
        ("dtype / compile", f"{s['dtype']} / {s['compile']}"),
        ("train ms/iter", f"{t['train_ms_per_iter']:.1f}"),
        ("train tokens/s", f"{t['train_tokens_per_sec']:,.0f}"),
        ("MFU", "n/a (peak unknown)" if t["mfu"] is None else f"{t['mfu']:.1%}"),
        ("peak memory MB", f"{t['peak_memory_mb']:,.0f}"),
        ("generate ms/token (KV cache)", f"{results['generate_cached']['ms_per_token']:.2f}"),
        ("generate tokens/s (KV cache)", f"{results['generate_cached']['tokens_per_sec']:,.0f}"),
    ]
    if "generate_compiled" in results:
        compiled, greedy = results["generate_compiled"], results["generate_compiled"]["greedy"]
        same = "the same" if greedy["same"] else f"differ from token {greedy['first_difference']}"
        fell_back = ", fell back to eager" if greedy["fell_back"] else ""
        rows.append(("generate ms/token (compiled step)", f"{compiled['ms_per_token']:.2f} (greedy tokens "
                     f"{same} over {greedy['tokens']}{fell_back})"))
    if "generate_rows" in results:
        together = results["generate_rows"]
        rows.append((f"generate {together['rows']} rows: ms/step", f"{together['ms_per_token']:.2f} "
                     f"({together['time_vs_one']:.2f}x one row's)"))
    if "generate_uncached" in results:
        rows += [
            ("generate ms/token (no cache)", f"{results['generate_uncached']['ms_per_token']:.2f}"),
            ("generate tokens/s (no cache)", f"{results['generate_uncached']['tokens_per_sec']:,.0f}"),
            ("KV cache speed-up", f"{results['cache_speedup']:.1f}x"),
        ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
