"""Speculative decoding's mechanism on CUDA: what verifying drafts costs and gains, same run.

    python benchmarks/speculative_gpu.py [--repeats 3] [--new 128] [--quick]
        [--draft-variants 1b-random,1b-agreeing,self]   # (c); "none" skips it

The Llama-3-8B-shaped model of ``benchmarks/gpu.py`` (``--quick``: the Llama-3.2-1B shape),
random bf16 weights: such a model repeats nothing, so prompt lookup would draft nothing of use
and the drafts come from an oracle put in place of the n-gram proposer.

Random weights alone make greedy decoding unstable: the logits of the best tokens are within
bf16 rounding of each other, so a verify step (5 query tokens, other GEMM shapes and kernels)
often picks another argmax than the plain step that recorded the continuation, the stream then
leaves the recording for good, and the oracle's drafts are all wrong after it (38 of 374
accepted). Scaling the LM head or the final norm would not help: argmax is scale-invariant and
the rounding noise scales with the logits. So ``make_peaked`` gives the model a wide, stable
margin instead: the input embeddings are multiplied by ``EMBED_SCALE`` (the residual stream,
whose layer outputs come from normalised inputs, is then dominated by the current token's
embedding) and an untied LM head is set to the embedding matrix, so the next token is the
current one by a margin ten times the spread of the other logits, whatever the kernels' shapes.
The model computes exactly what it did (same shapes, same work per step), with a predictable
greedy continuation. A first, plain run records each prompt's greedy continuation; the oracle
then proposes

- ``right``: the next tokens of that continuation (every draft the target would accept, as
  long as its greedy choice in the verify step equals the recorded one);
- ``wrong``: those tokens plus one (no draft accepted).

(a) Step cost: the median step with 4 drafted tokens per sequence (a verify step over 1 + 4
    tokens) against the median plain step (1 token), at batch 1 and 64, timed synchronously
    (misses never pause the drafts here).
(b) Single stream: tokens/s of plain decoding (``speculative: false``), ``right`` and ``wrong``
    drafts (with the engine's pause after a miss), interleaved over ``--repeats`` rounds of 4
    prompts; acceptance counted by the engine.
(c) Draft model (``{"method": "draft_model", ...}``), single stream, tokens/s against plain
    decoding on the same engine (interleaved) and acceptance, per variant:
    ``1b-random``: a Llama-3.2-1B-shaped draft (same vocabulary) with random weights, which
    never agrees with the target: the worst case (drafting pauses 1, 2, 4 ... 16 steps after
    each miss, so this is the amortised cost of misses); ``1b-agreeing``: the same 1B shape
    made peaked like the target (``make_peaked``: it proposes the target's own continuation),
    the best case of a small draft; ``self``: the target drafting for itself (8B weights
    twice), the mechanism's ceiling at 100% acceptance with a draft as costly as the target.
    The draft model runs eagerly (no CUDA graphs of its own).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import gpu  # benchmarks/gpu.py
import numpy as np
import torch

from truffula.sampling.params import SamplingParams
from truffula.speculative import drafter as drafter_mod

K = 4
SPEC = {"method": "ngram", "num_speculative_tokens": K}
EMBED_SCALE = 1000.0
"""Input embeddings x this (std 0.02 -> 20 per element) outweigh the residual stream's 32
layer outputs of random weights (each about 2 per element, from normalised inputs)."""
DRAFT_VARIANTS = ("1b-random", "1b-agreeing", "self")


@torch.no_grad()
def make_peaked(hf: torch.nn.Module) -> None:
    """Next token = current token by a wide margin (module docstring): embeddings scaled by
    ``EMBED_SCALE``, an untied LM head set to them (a tied one already is)."""
    emb = hf.get_input_embeddings().weight
    emb.mul_(EMBED_SCALE)
    head = hf.get_output_embeddings().weight
    if head.data_ptr() != emb.data_ptr():
        head.copy_(emb)


class Oracle:
    """Proposes from recorded greedy continuations, found by the prompt's first tokens."""

    def __init__(self, vocab: int) -> None:
        self.refs: dict[tuple[int, ...], list[int]] = {}
        self.vocab = vocab
        self.mode = "right"

    def record(self, prompt: list[int], output: list[int]) -> None:
        self.refs[tuple(prompt[:32])] = prompt + output

    def propose(self, history: Sequence[int] | np.ndarray, k: int, *_: int) -> list[int]:
        ref = self.refs.get(tuple(int(t) for t in history[:32]))
        if ref is None:
            return []
        n = len(history)
        nxt = ref[n : n + k]
        return nxt if self.mode == "right" else [(t + 1) % self.vocab for t in nxt]


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, vocab - 1, (length,), generator=g).tolist() for _ in range(n)]


def generate(
    core: gpu.EngineCore, batch: list[list[int]], params: SamplingParams
) -> list[list[int]]:
    ids = [core.add_request(p, params) for p in batch]
    out: dict[str, list[int]] = {i: [] for i in ids}
    while core.has_work():
        for o in core.step():
            out[o.request_id] += [t.id for t in o.tokens]
    return [out[i] for i in ids]


def timed_steps(core: gpu.EngineCore, n: int) -> float:
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        core.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def step_cost(core: gpu.EngineCore, oracle: Oracle, batch: int, vocab: int) -> dict[str, float]:
    """Median step (ms) of ``batch`` decoding sequences, plain and verifying K drafts each."""
    res = {}
    ps = prompts(batch, 128, vocab, seed=batch)
    long = SamplingParams(max_new_tokens=400, temperature=0, ignore_eos=True)
    for p, out in zip(ps, generate(core, ps, long.with_updates(speculative=False)), strict=True):
        oracle.record(p, out)
    for name, spec in (("plain_ms", False), ("verify_ms", True)):
        for p in ps:
            core.add_request(p, long.with_updates(speculative=spec))
        for _ in range(4):  # prefill and the first decodes
            core.step()
        res[name] = timed_steps(core, 20)
        for rid in list(core.requests):
            core.abort(rid)
        while core.has_work():
            core.step()
    res["ratio"] = res["verify_ms"] / res["plain_ms"]
    return res


def single_stream(
    core: gpu.EngineCore, oracle: Oracle, new: int, repeats: int, vocab: int
) -> dict[str, object]:
    plain = SamplingParams(max_new_tokens=new, temperature=0, ignore_eos=True)
    ps = prompts(4, 256, vocab, seed=7)
    for p in ps:
        oracle.record(p, generate(core, [p], plain.with_updates(speculative=False))[0])
    drafter = core.drafter
    runs: dict[str, list[float]] = {"plain": [], "right": [], "wrong": []}
    counts = {m: [0, 0] for m in ("right", "wrong")}
    for _ in range(repeats):
        for mode in runs:
            oracle.mode = mode
            d0, a0 = drafter.drafted, drafter.accepted
            t = time.perf_counter()
            n = sum(
                len(generate(core, [p], plain.with_updates(speculative=mode != "plain"))[0])
                for p in ps
            )
            runs[mode].append(n / (time.perf_counter() - t))
            if mode in counts:
                counts[mode][0] += drafter.drafted - d0
                counts[mode][1] += drafter.accepted - a0
    med = {m: statistics.median(v) for m, v in runs.items()}
    return {
        "tok_s": med,
        "runs": runs,
        "right_x": med["right"] / med["plain"],
        "wrong_x": med["wrong"] / med["plain"],
        "drafted_accepted": counts,
    }


def draft_folder(variant: str, target: Path, hf: torch.nn.Module) -> Path:
    """The draft model's folder: a 1B-shaped model written as safetensors (random or peaked),
    or the target's own weights written beside its config (``self``)."""
    if variant == "self":
        if not list(target.glob("*.safetensors")):
            hf.save_pretrained(target, safe_serialization=True)
        return target
    draft, folder = gpu.build(gpu.LLAMA32_1B)
    if variant == "1b-agreeing":
        make_peaked(draft)
    draft.save_pretrained(folder, safe_serialization=True)
    del draft
    gc.collect()
    torch.cuda.empty_cache()
    return folder


def draft_stream(core: gpu.EngineCore, new: int, repeats: int, vocab: int) -> dict[str, object]:
    """Single stream over 4 prompts, plain (``speculative: false``) and drafted, interleaved."""
    plain = SamplingParams(max_new_tokens=new, temperature=0, ignore_eos=True)
    ps = prompts(4, 256, vocab, seed=7)
    generate(core, ps[:1], plain)  # warm-up (the draft model's first steps)
    drafter = core.drafter
    runs: dict[str, list[float]] = {"plain": [], "draft": []}
    outs: dict[str, list[list[int]]] = {}
    d0, a0 = drafter.drafted, drafter.accepted
    for _ in range(repeats):
        for mode in runs:
            t = time.perf_counter()
            outs[mode] = [
                generate(core, [p], plain.with_updates(speculative=mode == "draft"))[0] for p in ps
            ]
            runs[mode].append(sum(map(len, outs[mode])) / (time.perf_counter() - t))
    med = {m: statistics.median(v) for m, v in runs.items()}
    drafted, accepted = drafter.drafted - d0, drafter.accepted - a0
    return {
        "tok_s": med,
        "runs": runs,
        "ratio": med["draft"] / med["plain"],
        "drafted": drafted,
        "accepted": accepted,
        "acceptance": accepted / drafted if drafted else 0.0,
        "same_tokens": outs["draft"] == outs["plain"],
    }


def speculating_engine(folder: Path, hf: torch.nn.Module, spec: dict) -> gpu.EngineCore:
    """The benchmark's engine with ``spec`` as its ``--speculative-config``."""
    return gpu.engine_for(
        folder,
        hf,
        speculative=json.dumps(spec),
        enable_prefix_caching=False,
        max_num_seqs=64,
        kv_cache_memory=16 << 30,
    )


def profile_draft(core: gpu.EngineCore, new: int) -> None:
    """Host time of the draft model's proposals against the whole stream, and the profiler's
    kernel table, over one drafted stream."""
    from torch.profiler import ProfilerActivity, profile

    model = core.drafter.model
    spent: list[float] = []
    propose = model.propose

    def timed(*args: object) -> dict[str, list[int]]:
        t = time.perf_counter()
        out = propose(*args)  # type: ignore[arg-type]
        spent.append(time.perf_counter() - t)
        return out

    model.propose = timed  # type: ignore[method-assign]
    p = SamplingParams(max_new_tokens=new, temperature=0, ignore_eos=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        generate(core, prompts(1, 256, core.vocab_size, seed=7), p)
        wall = time.perf_counter() - t
    model.propose = propose  # type: ignore[method-assign]
    print(
        f"(c) profile: {len(spent)} proposals, {1e3 * statistics.median(spent):.2f} ms each "
        f"(median), {sum(spent) / wall:.0%} of the stream's {1e3 * wall:.0f} ms",
        flush=True,
    )
    print(
        prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60)
    )


def draft_models(
    folder: Path,
    hf: torch.nn.Module,
    variants: list[str],
    new: int,
    repeats: int,
    profiled: bool = False,
) -> dict[str, object]:
    """(c): one engine per variant (the previous one freed first)."""
    res: dict[str, object] = {}
    for variant in variants:
        draft = draft_folder(variant, folder, hf)
        spec = {"method": "draft_model", "model": str(draft), "num_speculative_tokens": K}
        core = speculating_engine(folder, hf, spec)
        r = draft_stream(core, new, repeats, core.vocab_size)
        res[variant] = r
        tok = r["tok_s"]
        assert isinstance(tok, dict)
        print(
            f"(c) draft model {variant}, {new} new tokens: plain {tok['plain']:.1f} tok/s, "
            f"drafted {tok['draft']:.1f} ({r['ratio']:.2f}x); accepted {r['accepted']}/"
            f"{r['drafted']} ({r['acceptance']:.0%}); same tokens: {r['same_tokens']}",
            flush=True,
        )
        if profiled:
            profile_draft(core, new)
        del core
        gc.collect()
        torch.cuda.empty_cache()
    return res


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="rounds of (b)")
    ap.add_argument("--new", type=int, default=128, help="tokens per stream in (b)")
    ap.add_argument("--quick", action="store_true", help="the 1B shape")
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--no-step-cost", action="store_true", help="skip (a)")
    ap.add_argument(
        "--profile", action="store_true", help="(c): where a drafted stream's time goes"
    )
    ap.add_argument(
        "--draft-variants",
        default=",".join(DRAFT_VARIANTS),
        help=f"(c): comma-separated subset of {', '.join(DRAFT_VARIANTS)}, or none",
    )
    args = ap.parse_args()
    args.variants = [v for v in args.draft_variants.split(",") if v and v != "none"]
    unknown = set(args.variants) - set(DRAFT_VARIANTS)
    if unknown:
        ap.error(f"--draft-variants: unknown {', '.join(sorted(unknown))}")
    return args


def main() -> None:
    args = parse_args()
    hf, folder = gpu.build_8b(args.quick)
    make_peaked(hf)
    core = speculating_engine(folder, hf, SPEC)
    vocab = core.vocab_size
    oracle = Oracle(vocab)
    propose: Callable[..., list[int]] = drafter_mod.ngram.propose
    drafter_mod.ngram.propose = oracle.propose  # type: ignore[assignment]
    res: dict[str, object] = {"device": torch.cuda.get_device_name(), "k": K}
    try:
        generate(core, prompts(2, 64, vocab, 0), SamplingParams(max_new_tokens=8))  # warm-up
        verified, served = core.drafter.verified, core.overlap
        core.drafter.verified = lambda rid, d, a: None  # type: ignore[method-assign]
        core.overlap = False  # each step timed alone
        for batch in () if args.no_step_cost else (1, 64):
            r = step_cost(core, oracle, batch, vocab)
            res[f"batch{batch}"] = r
            print(
                f"(a) batch {batch}: plain step {r['plain_ms']:.2f} ms, verify 1+{K} "
                f"{r['verify_ms']:.2f} ms ({r['ratio']:.2f}x)",
                flush=True,
            )
        core.drafter.verified = verified  # type: ignore[method-assign]
        core.overlap = served  # as served: a speculating engine does not overlap its steps
        s = single_stream(core, oracle, args.new, args.repeats, vocab)
        res["single"] = s
        tok = s["tok_s"]
        assert isinstance(tok, dict)
        print(
            f"(b) single stream, {args.new} new tokens: plain {tok['plain']:.1f} tok/s, "
            f"right drafts {tok['right']:.1f} ({s['right_x']:.2f}x), wrong drafts "
            f"{tok['wrong']:.1f} ({s['wrong_x']:.2f}x); drafted/accepted {s['drafted_accepted']}",
            flush=True,
        )
    finally:
        drafter_mod.ngram.propose = propose  # type: ignore[assignment]
    del core
    gc.collect()
    torch.cuda.empty_cache()
    if args.variants:
        res["draft_model"] = draft_models(
            folder, hf, args.variants, args.new, args.repeats, args.profile
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res["date"] = time.strftime("%Y-%m-%d")
    (out / "speculative_gpu.json").write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
