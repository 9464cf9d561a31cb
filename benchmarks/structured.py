"""Structured output: validity on a suite of schemas and regexes, its cost, and compile times.

    python benchmarks/structured.py [--repeats 3] [--quick]
    python benchmarks/structured.py --gpu     # Llama-3-8B shape on one GPU (benchmarks/gpu.py)

(a) Validity: 22 JSON schemas (nested objects, arrays, enums, bounded numbers, optional fields,
    ``$ref``) and 6 regexes, greedy and sampled, on the base model and each example adapter
    (examples/adapters): an output is valid when it ends at EOS (not cut by length) and parses
    and validates against its schema (``jsonschema``) or fully matches its regex. Target 100%.
(b) Cost: 32 concurrent requests constrained by a JSON schema (an array of objects long enough
    that every request runs to ``--new`` tokens) against the same 32 requests free, both greedy
    with 64 prompt tokens; configurations interleaved, medians of ``--repeats``; target >= 0.9x.
    ``--gpu``: 64 concurrent, 512 in / 128 out, target >= 0.95x.
(c) Compile time: checking each schema of (a) cold and cached, and making a matcher from the
    cached prototype; the tokenizer's one-off conversion is reported apart.
(d) The per-step work a constraint adds for 32 rows: the host bitmask fill and the masking of
    the logits.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from common import random_prompts, write_result  # noqa: E402

from truffula.sampling.params import SamplingParams  # noqa: E402
from truffula.structured.spec import StructuredOutput  # noqa: E402

S = {"type": "string", "maxLength": 16}
INT = {"type": "integer", "minimum": 0, "maximum": 1000}


def obj(props: dict[str, Any], required: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": props,
        "required": list(props) if required is None else required,
        "additionalProperties": False,
        **extra,
    }


POINT = obj({"x": {"type": "number", "minimum": -100, "maximum": 100}, "y": INT})
SCHEMAS: list[dict[str, Any]] = [
    obj({"name": S, "age": {"type": "integer", "minimum": 0, "maximum": 120}}),
    obj({"name": S, "email": S, "phone": S}, ["name"]),
    obj({"city": S, "country": S, "population": INT}),
    obj({"color": {"enum": ["red", "green", "blue"]}, "size": {"enum": ["S", "M", "L", "XL"]}}),
    obj({"ok": {"type": "boolean"}, "reason": S}),
    obj({"title": S, "tags": {"type": "array", "items": S, "minItems": 1, "maxItems": 4}}),
    obj({"scores": {"type": "array", "items": INT, "minItems": 2, "maxItems": 5}}),
    obj({"price": {"type": "number", "minimum": 0, "maximum": 10000}, "currency": S}),
    obj({"user": obj({"id": INT, "name": S}), "active": {"type": "boolean"}}),
    obj({"order": obj({"id": INT, "items": {"type": "array", "items": S, "maxItems": 3}})}),
    obj({"a": obj({"b": obj({"c": obj({"d": S})})})}),
    {
        "$defs": {"point": POINT},
        **obj({"from": {"$ref": "#/$defs/point"}, "to": {"$ref": "#/$defs/point"}}),
    },
    {
        "$defs": {"person": obj({"name": S, "age": INT})},
        **obj({"people": {"type": "array", "items": {"$ref": "#/$defs/person"}, "maxItems": 3}}),
    },
    obj(
        {
            "temperature": {"type": "number", "minimum": -50, "maximum": 60},
            "unit": {"enum": ["C", "F"]},
        }
    ),
    obj({"date": {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}$"}, "event": S}),
    obj({"sku": {"type": "string", "pattern": r"^[A-Z]{3}-\d{3}$"}, "qty": INT}),
    obj({"status": {"const": "done"}, "count": INT}),
    obj({"value": {"anyOf": [INT, S]}}),
    obj({"name": S, "nickname": S, "age": INT, "city": S}, ["name"]),
    obj({"rating": {"type": "integer", "minimum": 1, "maximum": 5}, "review": S}),
    obj(
        {
            "matrix": {
                "type": "array",
                "items": {"type": "array", "items": INT, "maxItems": 3},
                "maxItems": 3,
            }
        }
    ),
    obj(
        {
            "answer": {"enum": ["yes", "no"]},
            "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        }
    ),
]
REGEXES = [
    r"\d{3}-\d{3}-\d{4}",
    r"(yes|no)",
    r"[A-Z][a-z]{2,10}",
    r"\d{4}-\d{2}-\d{2}",
    r"[a-z]{3,8}@[a-z]{3,8}\.(com|org)",
    r"(Monday|Tuesday|Wednesday|Thursday|Friday)",
]
LONG = {
    "type": "array",
    "items": obj({"id": INT, "name": S, "tag": {"enum": ["a", "b", "c"]}}),
    "minItems": 40,
}
"""(b): long enough that every request runs to the token limit."""


def specs() -> list[tuple[StructuredOutput, Any]]:
    out: list[tuple[StructuredOutput, Any]] = [
        (StructuredOutput("json", json.dumps(s)), s) for s in SCHEMAS
    ]
    out += [(StructuredOutput("regex", r), None) for r in REGEXES]
    return out


def valid(text: str, finish: str | None, spec: StructuredOutput, schema: Any) -> bool:
    import jsonschema

    if finish != "eos_token":
        return False
    if spec.kind == "regex":
        return re.fullmatch(spec.value, text) is not None
    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def validity(llm: Any, adapters: list[str | None], new: int) -> dict[str, Any]:
    cases = specs()
    res: dict[str, Any] = {}
    for adapter in adapters:
        for mode, temp in (("greedy", 0.0), ("sampled", 0.8)):
            prompts, params = [], []
            for i, (spec, _) in enumerate(cases):
                what = "a JSON object" if spec.kind == "json" else "a short answer"
                q = f"Reply with {what} about item number {i}."
                prompts.append(llm.tokenizer.apply_chat_template([{"role": "user", "content": q}]))
                params.append(
                    SamplingParams(
                        max_new_tokens=new,
                        temperature=temp,
                        seed=i,
                        structured=spec,
                        adapter_id=adapter,
                    )
                )
            outs = llm.generate(prompts, params)
            ok = [
                valid(o.text, o.finish_reason, spec, schema)
                for o, (spec, schema) in zip(outs, cases, strict=True)
            ]
            key = f"{adapter or 'base'}/{mode}"
            res[key] = {"valid": sum(ok), "total": len(ok)}
            bad = [o.text[:80] for o, good in zip(outs, ok, strict=True) if not good]
            print(f"(a) {key}: {sum(ok)}/{len(ok)} valid {bad[:3] if bad else ''}", flush=True)
    total = sum(v["total"] for v in res.values())
    res["percent_valid"] = 100.0 * sum(v["valid"] for v in res.values()) / total
    return res


def compile_times(llm: Any) -> dict[str, float]:
    from truffula.structured.compiler import GrammarCompiler

    engine = llm.engine
    fresh = GrammarCompiler(engine.tokenizer.hf, engine.vocab_size)
    t0 = time.perf_counter()
    _ = fresh.tokenizer
    tokenizer_s = time.perf_counter() - t0
    cold, cached, matcher_cold, matcher = [], [], [], []
    for spec, _ in specs():
        for acc in (cold, cached):
            t0 = time.perf_counter()
            fresh.check(spec)
            acc.append(time.perf_counter() - t0)
        for acc in (matcher_cold, matcher):
            t0 = time.perf_counter()
            fresh.constraint(spec)
            acc.append(time.perf_counter() - t0)
    ms = 1e3
    res = {
        "tokenizer_once_ms": tokenizer_s * ms,
        "check_cold_median_ms": statistics.median(cold) * ms,
        "check_cold_max_ms": max(cold) * ms,
        "check_cached_median_ms": statistics.median(cached) * ms,
        "matcher_first_median_ms": statistics.median(matcher_cold) * ms,
        "matcher_cached_median_ms": statistics.median(matcher) * ms,
    }
    print("(c) " + ", ".join(f"{k} {v:.3f}" for k, v in res.items()), flush=True)
    return res


def mask_overhead(llm: Any, rows: int = 32, repeats: int = 20) -> dict[str, float]:
    """Per-step host and device work that a constraint adds, for ``rows`` constrained rows
    midway through a JSON object: filling the bitmask, and masking [rows, vocab] logits."""
    import torch

    from truffula.structured.mask import apply_bitmask, fill_bitmask

    engine = llm.engine
    grammars = engine.frontend.grammars
    spec = StructuredOutput("json", json.dumps(LONG))
    cons = [grammars.constraint(spec) for _ in range(rows)]
    prefix = engine.tokenizer.encode('[{"id":12,"name":"ab', add_special_tokens=False)
    for c in cons:
        for t in prefix:
            c.accept(t)
    vocab = engine.vocab_size
    logits = torch.randn(rows, vocab)
    index = torch.arange(rows)
    fill, apply = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mask = fill_bitmask(cons, vocab)
        fill.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        apply_bitmask(logits, index, mask)
        apply.append(time.perf_counter() - t0)
    res = {
        "rows": rows,
        "fill_ms": 1e3 * statistics.median(fill),
        "apply_ms": 1e3 * statistics.median(apply),
    }
    print(
        f"(d) {rows} rows: fill {res['fill_ms']:.3f} ms, apply {res['apply_ms']:.3f} ms", flush=True
    )
    return res


def tok_s(generate: Any, prompts: list[list[int]], params: SamplingParams) -> float:
    t0 = time.perf_counter()
    n = generate(prompts, params)
    return n / (time.perf_counter() - t0)


def cost(generate: Any, make_prompts: Any, new: int, repeats: int) -> dict[str, Any]:
    """``make_prompts(seed)``: the concurrent prompts; every run gets prompts of its own, so no
    run is served from the prefix cache that an earlier one filled."""
    free = SamplingParams(max_new_tokens=new, temperature=0, ignore_eos=True)
    constrained = SamplingParams(
        max_new_tokens=new, temperature=0, structured=StructuredOutput("json", json.dumps(LONG))
    )
    prompts = make_prompts(1000)
    for params in (free, constrained):  # warm-up of both (graphs, kernels, matchers)
        generate(prompts, params.with_updates(max_new_tokens=8))
    runs: dict[str, list[float]] = {"free": [], "json_schema": [], "ratio": []}
    for i in range(repeats):  # interleaved: the machine's drift hits both alike
        a = tok_s(generate, make_prompts(2 * i), free)
        b = tok_s(generate, make_prompts(2 * i + 1), constrained)
        runs["free"].append(a)
        runs["json_schema"].append(b)
        runs["ratio"].append(b / a)
    res = {k: statistics.median(v) for k, v in runs.items()}
    res["runs"] = runs  # type: ignore[assignment]
    print(
        f"(b) {len(prompts)} concurrent, {new} new: free {res['free']:.1f} tok/s, "
        f"json_schema {res['json_schema']:.1f} tok/s, ratio {res['ratio']:.3f}",
        flush=True,
    )
    return res


def main_cpu(args: argparse.Namespace) -> None:
    from truffula.engine.llm import LLM

    llm = LLM(
        progress=False,
        max_num_seqs=64,
        adapter_root=str(ROOT / "examples" / "adapters"),
    )

    def generate(prompts: list[list[int]], params: SamplingParams) -> int:
        outs = llm.generate(prompts, params)
        assert all(len(o.token_ids) == params.max_new_tokens for o in outs)
        return sum(len(o.token_ids) for o in outs)

    res: dict[str, Any] = {"compile": compile_times(llm), "mask_step": mask_overhead(llm)}
    res["cost"] = cost(generate, lambda seed: random_prompts(32, 64, seed), args.new, args.repeats)
    res["command"] = "python benchmarks/structured.py " + " ".join(sys.argv[1:])
    if args.cost_only:
        write_result("structured-cost", res)
        return
    adapters: list[str | None] = [None] if args.quick else [None, "french", "caps", "pirate"]
    res["validity"] = validity(llm, adapters, 160)
    if not args.quick:
        write_result("structured", res)


def main_gpu(args: argparse.Namespace) -> None:
    """64 concurrent, 512 in / 128 out on the Llama-3-8B shape (random bf16 weights)."""
    import torch
    from gpu import LLAMA3_8B, build, engine_8b

    hf, folder = build(LLAMA3_8B)
    core = engine_8b(folder, hf)

    def generate(prompts: list[list[int]], params: SamplingParams) -> int:
        for p in prompts:
            core.add_request(p, params)
        n = 0
        while core.has_work():
            n += sum(len(o.tokens) for o in core.step())
        torch.cuda.synchronize()
        return n

    def prompts(seed: int) -> list[list[int]]:  # within the bench tokenizer's ids
        return [[t % 256 + 3 for t in p] for p in random_prompts(64, 512, seed)]

    res = {
        "device": torch.cuda.get_device_name(),
        "cost": cost(generate, prompts, 128, args.repeats),
    }
    res["command"] = "python benchmarks/structured.py --gpu"
    write_result("structured-gpu", res)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new", type=int, default=64, help="tokens per request in (b)")
    ap.add_argument("--quick", action="store_true", help="base model only, nothing written")
    ap.add_argument("--gpu", action="store_true", help="(b) on the 8B shape, one CUDA GPU")
    ap.add_argument("--cost-only", action="store_true", help="(b)-(d) only")
    args = ap.parse_args()
    if args.gpu:
        main_gpu(args)
    else:
        main_cpu(args)


if __name__ == "__main__":
    main()
