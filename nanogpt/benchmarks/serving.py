"""Load on a running server, over loopback: ``python -m nanogpt.benchmarks.serving [--url URL] [--out FILE]``.

Start the server first (``python -m nanogpt.serve ckpt=RUN``); then this sends
a bounded number of requests and measures, in one sitting:

* throughput: the tokens per second one streaming client gets, alone, and the
  tokens per second 8 clients streaming at once get together;
* first-token latency: of a request to an idle server, and of one that arrives
  while 7 others stream;
* mix-ups: 200 greedy requests from 16 clients at once (more than the slots, so
  some wait), each answer compared with the same request served alone. A
  difference is a mix-up unless, where the two first part, the request served
  alone had two likeliest tokens within NEAR_TIE of each other: a batch of rows
  may compute the last bits of a logit differently, which can only tip such a tie.
  Lost requests (an error or no answer) are counted too. Latency p50/p99 of these.

A benchmark, not a test: nothing here asserts on time (tests/test_serve_api.py
runs the mix-up check on a small model). Prompts are plain English lines any
character model trained on English text can read; a request never stops
early (``ignore_eos``), so every one asks for the same work.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import httpx

# The log-probability gap between the two likeliest tokens below which batching may tip the choice.
NEAR_TIE = 1e-3
NAMES = ("ROMEO", "JULIET", "MERCUTIO", "NURSE", "TYBALT", "FRIAR", "CAPULET", "BENVOLIO", "PARIS", "PRINCE")
OPENINGS = ("What say you", "Good morrow", "I pray thee", "Come hither", "Alas")


def prompts(count: int = 50) -> list[str]:
    """Distinct short prompts (count of them), in the shape of a play's lines."""
    return [f"{NAMES[i % len(NAMES)]}:\n{OPENINGS[i // len(NAMES) % len(OPENINGS)]}" + "," * (i // 50)
            for i in range(count)]


@dataclass
class Result:
    """One streamed request: its text, when its first piece and its end arrived, and how it ended."""

    text: str = ""
    tokens: int = 0
    first_s: float | None = None
    total_s: float = 0.0
    error: str | None = None
    logprobs: list[dict] = field(default_factory=list)  # the chunks' logprobs, when asked for


async def stream_completion(client: httpx.AsyncClient, body: dict) -> Result:
    """Send one streaming completion; its text, its token count and its timings."""
    result, start = Result(), time.perf_counter()
    try:
        streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
        async with client.stream("POST", "/v1/completions", json=streamed) as r:
            if r.status_code != 200:
                result.error = f"{r.status_code}: {(await r.aread()).decode()[:200]}"
                return result
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result.error = chunk["error"]["message"]
                    break
                if chunk.get("usage"):
                    result.tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk["choices"]:
                    if choice["text"] and result.first_s is None:
                        result.first_s = time.perf_counter() - start
                    result.text += choice["text"]
                    if choice.get("logprobs"):
                        result.logprobs.append(choice["logprobs"])
    except httpx.HTTPError as error:
        result.error = f"{type(error).__name__}: {error}"
    result.total_s = time.perf_counter() - start
    return result


def new_client(url: str, api_key: str | None, clients: int) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    return httpx.AsyncClient(base_url=url, headers=headers, timeout=600, limits=limits)


async def throughput(url: str, api_key: str | None, model: str | None, clients: int, requests_each: int,
                     max_tokens: int) -> dict:
    """Aggregate tokens per second of `clients` clients each streaming requests_each requests in turn."""
    texts = prompts()

    async def client_loop(client: httpx.AsyncClient, c: int) -> list[Result]:
        return [await stream_completion(client, {"model": model, "prompt": texts[(c * 7 + r) % len(texts)],
                                                 "max_tokens": max_tokens, "seed": c * 1000 + r,
                                                 "ignore_eos": True})
                for r in range(requests_each)]

    async with new_client(url, api_key, clients) as client:
        await stream_completion(client, {"model": model, "prompt": texts[0], "max_tokens": 8})  # warm up
        start = time.perf_counter()
        per_client = await asyncio.gather(*(client_loop(client, c) for c in range(clients)))
        results = [r for rs in per_client for r in rs]
        seconds = time.perf_counter() - start
    tokens = sum(r.tokens for r in results)
    return {"clients": clients, "requests": len(results), "errors": sum(r.error is not None for r in results),
            "tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1)}


async def first_token(url: str, api_key: str | None, model: str | None, probes: int, others: int,
                      max_tokens: int) -> dict:
    """Median time to the first piece of a short request, with `others` clients streaming meanwhile."""
    texts = prompts()
    async with new_client(url, api_key, others + 1) as client:
        done = asyncio.Event()

        async def background(c: int) -> None:
            r = 0
            while not done.is_set():
                await stream_completion(client, {"model": model, "prompt": texts[(c + r) % len(texts)],
                                                 "max_tokens": max_tokens, "seed": r, "ignore_eos": True})
                r += 1

        streaming = [asyncio.ensure_future(background(c)) for c in range(others)]
        if others:
            await asyncio.sleep(1.0)  # let them all reach their steady state
        times = []
        for p in range(probes):
            result = await stream_completion(client, {"model": model, "prompt": texts[p % len(texts)],
                                                      "max_tokens": 4, "seed": p})
            times.append(result.first_s if result.first_s is not None else float("nan"))
            await asyncio.sleep(0.05)
        done.set()
        await asyncio.gather(*streaming)
    return {"others_streaming": others, "probes": probes,
            "first_token_ms_p50": round(1000 * statistics.median(times), 1)}


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile q of values."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def first_difference(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def near_tie_at(reference: Result, char: int) -> bool:
    """Whether the reference's token covering character `char` was chosen over a runner-up within NEAR_TIE."""
    for chunk in reference.logprobs:
        columns = zip(chunk["text_offset"], chunk["tokens"], chunk["top_logprobs"], strict=True)
        for offset, token, top in columns:
            if offset <= char < offset + max(1, len(token)) and top:
                best = sorted(top.values(), reverse=True)
                return len(best) > 1 and best[0] - best[1] < NEAR_TIE
    return False


async def mixups(url: str, api_key: str | None, model: str | None, requests: int, clients: int,
                 distinct: int = 50) -> dict:
    """Send `requests` greedy requests from `clients` clients at once; compare each with it served alone."""
    texts = prompts(distinct)
    bodies = [{"model": model, "prompt": texts[i % distinct], "max_tokens": 16 + 8 * (i % distinct % 13),
               "temperature": 0, "ignore_eos": True} for i in range(requests)]
    async with new_client(url, api_key, clients) as client:
        pending: asyncio.Queue = asyncio.Queue()
        for i in range(requests):
            pending.put_nowait(i)
        results: dict[int, Result] = {}

        async def worker() -> None:
            while not pending.empty():
                i = pending.get_nowait()
                results[i] = await stream_completion(client, bodies[i])

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        seconds = time.perf_counter() - start
        references = {}  # each distinct request served alone, with the two likeliest tokens at each step
        for d in range(min(distinct, requests)):
            references[d] = await stream_completion(client, {**bodies[d], "logprobs": 2})
    lost = [i for i in range(requests) if i not in results or results[i].error or results[i].tokens == 0]
    same = tied = mixed = 0
    for i, result in results.items():
        if i in lost:
            continue
        reference = references[i % distinct]
        if result.text == reference.text:
            same += 1
        elif near_tie_at(reference, first_difference(result.text, reference.text)):
            tied += 1
        else:
            mixed += 1
    latencies = [r.total_s for i, r in results.items() if i not in lost]
    firsts = [r.first_s for i, r in results.items() if i not in lost and r.first_s is not None]
    return {"requests": requests, "clients": clients, "seconds": round(seconds, 3), "lost": len(lost),
            "identical": same, "near_tie_differences": tied, "mixed_up": mixed,
            "errors": sorted({results[i].error for i in lost if i in results and results[i].error})[:3],
            "latency_ms_p50": round(1000 * percentile(latencies, 50), 1) if latencies else None,
            "latency_ms_p99": round(1000 * percentile(latencies, 99), 1) if latencies else None,
            "first_token_ms_p50": round(1000 * percentile(firsts, 50), 1) if firsts else None,
            "first_token_ms_p99": round(1000 * percentile(firsts, 99), 1) if firsts else None}


async def run_all(args: argparse.Namespace) -> dict:
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load_average = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    server = (args.url, args.api_key, args.model)
    one = await throughput(*server, 1, args.requests_each * args.clients // 2, args.max_tokens)
    many = await throughput(*server, args.clients, args.requests_each, args.max_tokens)
    idle = await first_token(*server, args.probes, 0, args.max_tokens)
    loaded = await first_token(*server, args.probes, args.clients - 1, args.max_tokens)
    checked = await mixups(*server, args.mixup_requests, args.mixup_clients)
    return {
        "date": started,
        "load_average_before": load_average,
        "url": args.url, "max_tokens": args.max_tokens,
        "one_client": one, "many_clients": many,
        "aggregate_speedup": round(many["tokens_per_s"] / one["tokens_per_s"], 2),
        "first_token_idle": idle, "first_token_loaded": loaded,
        "first_token_ratio": round(loaded["first_token_ms_p50"] / idle["first_token_ms_p50"], 2),
        "mixups": checked,
    }


def report(results: dict) -> str:
    one, many, checked = results["one_client"], results["many_clients"], results["mixups"]
    idle, loaded = results["first_token_idle"], results["first_token_loaded"]
    return "\n".join([
        f"{results['date']}, load average {results['load_average_before']} before the first request",
        f"1 client:  {one['tokens_per_s']:8.1f} tokens/s ({one['requests']} requests of "
        f"{results['max_tokens']} tokens, one after another)",
        f"{many['clients']} clients: {many['tokens_per_s']:8.1f} tokens/s together ({many['requests']} "
        f"requests), {results['aggregate_speedup']}x one client",
        f"first token: {idle['first_token_ms_p50']} ms idle, {loaded['first_token_ms_p50']} ms while "
        f"{loaded['others_streaming']} others stream ({results['first_token_ratio']}x)",
        f"{checked['requests']} greedy requests from {checked['clients']} clients: {checked['lost']} lost, "
        f"{checked['identical']} identical to the request served alone, {checked['near_tie_differences']} "
        f"differ at a near-tie, {checked['mixed_up']} mixed up; latency p50 {checked['latency_ms_p50']} ms, "
        f"p99 {checked['latency_ms_p99']} ms; first token p50 {checked['first_token_ms_p50']} ms, p99 "
        f"{checked['first_token_ms_p99']} ms",
    ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nanogpt.benchmarks.serving",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default %(default)s)")
    parser.add_argument("--api-key", default=os.environ.get("NANOGPT_API_KEY"),
                        help="its API key, if it needs one (default: $NANOGPT_API_KEY)")
    parser.add_argument("--model", default=None, help="the model name to send (default: none, the server's)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent streaming clients (default 8)")
    parser.add_argument("--requests-each", type=int, default=3, help="requests per client (default 3)")
    parser.add_argument("--max-tokens", type=int, default=200, help="tokens per request (default 200)")
    parser.add_argument("--probes", type=int, default=7, help="first-token probes per setting (default 7)")
    parser.add_argument("--mixup-requests", type=int, default=200,
                        help="greedy requests checked (default 200)")
    parser.add_argument("--mixup-clients", type=int, default=16, help="clients sending them (default 16)")
    parser.add_argument("--out", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    try:
        httpx.get(f"{args.url}/health", timeout=10).raise_for_status()
    except httpx.HTTPError as error:
        sys.exit(f"error: no server answers at {args.url} ({error}); start one: "
                 "python -m nanogpt.serve ckpt=RUN")
    results = asyncio.run(run_all(args))
    print(report(results))
    print(json.dumps(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
