"""``truffula inspect "prompt" [--adapter ID] [-k 5] [--compare ID] [--url URL] [--html F] [--json]``.

Generates with per-token details and k alternatives, as truffula's native (LoRAX-dialect) JSON
exactly as the server returns it, and reads it with ``truffula.analysis`` (``report.py``):

- in-process (default): ``LLM`` loaded from ``--model`` and the engine flags; the prompt goes
  through the model's chat template unless ``--raw``; the completions are written as the server
  writes them (``truffula.server.formats``);
- ``--url URL``: POSTs to ``URL/generate``. The prompt is sent as given (the chat template lives
  with the server's model, not here), so pass it already formatted if the model needs one;
- ``--compare ID``: a second generation of the same prompt with another adapter (``base`` = the
  base model), then a token-by-token comparison;
- output: the generation colored by probability and a table of the most ambiguous positions in
  the terminal; ``--json`` prints the raw analysis instead; ``--html F`` also writes a report.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

from truffula.analysis.html import html_report
from truffula.analysis.report import Run, analyze_runs, render_terminal, report_dict
from truffula.cli.args import add_engine_args, engine_options

BASE = "base"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ins = sub.add_parser(
        "inspect", help="show where the model hesitated: tokens colored by probability"
    )
    ins.add_argument("prompt")
    ins.add_argument("--url", default=None, help="server URL (default: an in-process engine)")
    ins.add_argument("--adapter", default=None)
    ins.add_argument(
        "--compare", default=None, help="second adapter id ('base' for the base model)"
    )
    ins.add_argument("-k", type=int, default=5, help="alternatives per token")
    ins.add_argument("--max-new-tokens", type=int, default=64)
    ins.add_argument("--temperature", type=float, default=0.0)
    ins.add_argument("--raw", action="store_true", help="do not apply the chat template")
    ins.add_argument("--html", default=None, help="write a self-contained HTML report here")
    ins.add_argument("--json", action="store_true", help="print the raw analysis as JSON")
    add_engine_args(ins)
    ins.set_defaults(func=run)


def adapter_id(name: str | None) -> str | None:
    """``None``, ``""`` and ``"base"`` all mean the base model."""
    return None if name in (None, "", BASE) else name


def label_for(name: str | None) -> str:
    return adapter_id(name) or "base model"


def generate_local(
    args: argparse.Namespace, adapters: list[str | None]
) -> tuple[str, list[dict[str, Any]], int]:
    """Run the prompt through ``LLM`` once per adapter, in one batch: the prompt as formatted,
    the responses in the server's native JSON, the vocabulary size."""
    from truffula.config import EngineConfig
    from truffula.engine.llm import LLM
    from truffula.sampling.params import SamplingParams
    from truffula.server.formats import Accumulator, details_dict

    options = engine_options(args)
    limits = EngineConfig.from_kwargs(**options).limits
    sampling = args.temperature > 0
    # as the server does: a sampled run gets a seed, reported so that it can be replayed
    seeds = [random.randrange(2**63) if sampling else None for _ in adapters]
    params = [
        SamplingParams(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            seed=seed,
            details=True,
            return_k_alternatives=args.k,
            adapter_id=adapter,
        )
        for adapter, seed in zip(adapters, seeds, strict=True)
    ]
    for p in params:
        p.validate(limits)  # a bad flag is an error before the model loads
    llm = LLM(**options)
    prompt = args.prompt
    if not args.raw and llm.tokenizer.has_chat_template:
        prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    responses = []
    for c, seed in zip(llm.generate([prompt] * len(adapters), params), seeds, strict=True):
        acc = Accumulator(
            tokens=c.tokens,
            prompt_tokens=c.prompt_tokens,
            text=c.text,
            finish_reason=c.finish_reason,
            num_prompt_tokens=len(c.prompt_token_ids),
            num_generated_tokens=len(c.token_ids),
            seed=seed,
        )
        responses.append({"generated_text": c.text, "details": details_dict(acc, sampling)})
    return prompt, responses, llm.engine.vocab_size


def request_body(args: argparse.Namespace, adapter: str | None) -> dict[str, Any]:
    """The ``/generate`` request for one run."""
    params: dict[str, Any] = {
        "max_new_tokens": args.max_new_tokens,
        "details": True,
        "do_sample": args.temperature > 0,
    }
    if args.temperature > 0:
        params["temperature"] = args.temperature
    if args.k > 0:
        params["return_k_alternatives"] = args.k
    if adapter is not None:
        params["adapter_id"] = adapter
    return {"inputs": args.prompt, "parameters": params}


def generate_remote(args: argparse.Namespace, adapters: list[str | None]) -> list[dict[str, Any]]:
    import httpx

    url = args.url.rstrip("/") + "/generate"
    out = []
    with httpx.Client(timeout=httpx.Timeout(600.0, connect=10.0)) as client:
        for adapter in adapters:
            try:
                resp = client.post(url, json=request_body(args, adapter))
            except httpx.HTTPError as exc:
                raise ValueError(f"cannot reach {url}: {exc}") from exc
            if resp.status_code != 200:
                try:
                    message = resp.json().get("error", resp.text)
                except ValueError:
                    message = resp.text
                raise ValueError(f"{url} answered {resp.status_code}: {message}")
            out.append(resp.json())
    return out


def run(args: argparse.Namespace) -> int:
    """``truffula inspect``; returns the exit status."""
    if args.k < 0:
        raise ValueError(f"-k must be >= 0. Given: {args.k}")
    names = [args.adapter] if args.compare is None else [args.adapter, args.compare]
    adapters = [adapter_id(n) for n in names]
    vocab: int | None = None
    if args.url:
        if not args.raw:
            print(
                "truffula: note: --url sends the prompt as given (no chat template applied)",
                file=sys.stderr,
            )
        inputs, raw = args.prompt, generate_remote(args, adapters)
    else:
        inputs, raw, vocab = generate_local(args, adapters)
    runs = [Run(a, label_for(n), r) for a, n, r in zip(adapters, names, raw, strict=True)]
    comp = analyze_runs(runs, vocab)
    if args.json:
        header = {
            "prompt": args.prompt,
            "inputs": inputs,
            "source": args.url or "in-process",
            "model": None if args.url else args.model,
            "k": args.k,
            "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature,
        }
        print(json.dumps(report_dict(header, runs, comp), indent=2, ensure_ascii=False))
    else:
        render_terminal(runs, comp)
    if args.html:
        page = html_report([r.analysis for r in runs if r.analysis], comp, prompt=inputs)
        Path(args.html).write_text(page, encoding="utf-8")
        print(f"truffula: wrote {args.html}", file=sys.stderr)
    return 0
