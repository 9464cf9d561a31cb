"""``truffula inspect "prompt" [--adapter ID] [-k 5] [--compare ID] [--url URL] [--html F] [--json]``.

Generates with per-token details and k alternatives, converts the result to truffula's native
(LoRAX-dialect) JSON exactly as the server returns it, analyzes it and prints it:

- in-process (default): loads the engine from ``--model`` etc.; the prompt goes through the
  model's chat template unless ``--raw``;
- ``--url URL``: POSTs to ``URL/generate``. The prompt is sent as given (the chat template lives
  with the server's model, not here), so pass it already formatted if the model needs one;
- ``--compare ID``: a second generation of the same prompt with another adapter (``base`` = the
  base model), then a token-by-token comparison;
- output: the generation colored by probability and a table of the most ambiguous positions in
  the terminal; ``--json`` prints the raw analysis instead; ``--html F`` also writes a report.

This module is CLI glue: the engine is imported only for the in-process path.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from truffula.analysis.compare import Comparison, compare
from truffula.analysis.export import analysis_dict, comparison_dict
from truffula.analysis.html import html_report
from truffula.analysis.metrics import Analysis, analyze
from truffula.analysis.parse import parse

BASE = "base"


@dataclass
class Run:
    adapter: str | None
    label: str
    response: dict[str, Any]
    analysis: Analysis | None = None


def adapter_id(name: str | None) -> str | None:
    """``None``, ``""`` and ``"base"`` all mean the base model."""
    return None if name in (None, "", BASE) else name


def label_for(name: str | None) -> str:
    return adapter_id(name) or "base model"


def _generate_local(
    args: argparse.Namespace, adapters: list[str | None]
) -> tuple[str, list[dict[str, Any]], int]:
    """Run the prompt through an in-process engine once per adapter, in one batch."""
    from truffula.cli import engine_config
    from truffula.engine.core import EngineCore
    from truffula.sampling.params import SamplingParams
    from truffula.server.formats import Accumulator, details_dict

    core = EngineCore(engine_config(args))
    prompt = args.prompt
    if not args.raw and core.tokenizer.has_chat_template:
        prompt = core.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    greedy = args.temperature == 0
    accs: dict[str, Accumulator] = {}
    order = []
    for adapter in adapters:
        params = SamplingParams(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            details=True,
            return_k_alternatives=args.k,
            adapter_id=adapter,
        )
        rid = core.add_request(prompt, params)
        accs[rid] = Accumulator()
        order.append(rid)
    while core.has_work():
        for out in core.step():
            accs[out.request_id].add(out)
    responses = [
        {"generated_text": accs[rid].text, "details": details_dict(accs[rid], not greedy)}
        for rid in order
    ]
    return prompt, responses, core.vocab_size


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


def _generate_remote(args: argparse.Namespace, adapters: list[str | None]) -> list[dict[str, Any]]:
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


def build_report(
    args: argparse.Namespace, inputs: str, runs: list[Run], comp: Comparison | None
) -> dict[str, Any]:
    """The ``--json`` document: settings, and per run the raw response and its analysis."""
    return {
        "prompt": args.prompt,
        "inputs": inputs,
        "source": args.url or "in-process",
        "model": None if args.url else args.model,
        "k": args.k,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "runs": [
            {
                "adapter": r.adapter,
                "label": r.label,
                "response": r.response,
                "analysis": analysis_dict(r.analysis) if r.analysis else None,
            }
            for r in runs
        ],
        "comparison": None if comp is None else comparison_dict(comp),
    }


def render_terminal(runs: list[Run], comp: Comparison | None) -> None:
    from rich.console import Console

    from truffula.analysis.terminal import render, render_comparison

    console = Console(highlight=False)
    for r in runs:
        assert r.analysis is not None
        render(r.analysis, console, title=r.label if comp is not None else None)
    if comp is not None:
        a, b = (r.analysis for r in runs)
        assert a is not None and b is not None
        render_comparison(a, b, comp, console)


def run_inspect(args: argparse.Namespace) -> int:
    """Entry point of ``truffula inspect``; returns the exit status."""
    if args.k < 0:
        raise ValueError(f"-k must be >= 0. Given: {args.k}")
    adapters = [adapter_id(args.adapter)]
    names = [args.adapter]
    if args.compare is not None:
        adapters.append(adapter_id(args.compare))
        names.append(args.compare)
    vocab: int | None = None
    if args.url:
        if not args.raw:
            print(
                "truffula: note: --url sends the prompt as given (no chat template applied)",
                file=sys.stderr,
            )
        inputs, raw = args.prompt, _generate_remote(args, adapters)
    else:
        inputs, raw, vocab = _generate_local(args, adapters)
    runs = [Run(a, label_for(n), r) for a, n, r in zip(adapters, names, raw, strict=True)]
    for run in runs:
        resp = parse(run.response)
        resp.label, resp.vocab_size = run.label, vocab
        run.analysis = analyze(resp)
    comp = None
    if len(runs) == 2:
        assert runs[0].analysis and runs[1].analysis
        comp = compare(runs[0].analysis.response, runs[1].analysis.response)
    if args.json:
        print(json.dumps(build_report(args, inputs, runs, comp), indent=2, ensure_ascii=False))
    else:
        render_terminal(runs, comp)
    if args.html:
        page = html_report([r.analysis for r in runs if r.analysis], comp, prompt=inputs)
        Path(args.html).write_text(page, encoding="utf-8")
        print(f"truffula: wrote {args.html}", file=sys.stderr)
    return 0
