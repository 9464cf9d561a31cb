"""``truffula generate``: one completion, streamed to stdout from an in-process engine."""

from __future__ import annotations

import argparse
import sys

from truffula.cli.args import add_engine_args, default_of, engine_config
from truffula.sampling.params import SamplingParams

DEMO_PROMPT = "In one sentence, what is a truffula tree?"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    gen = sub.add_parser("generate", help="generate a completion and stream it to stdout")
    gen.add_argument("prompt", nargs="?", default=DEMO_PROMPT)
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=default_of(SamplingParams, "top_p"))
    gen.add_argument("--top-k", type=int, default=default_of(SamplingParams, "top_k"))
    gen.add_argument("--seed", type=int, default=default_of(SamplingParams, "seed"))
    gen.add_argument("--stop", action="append", help="stop sequence (repeatable)")
    gen.add_argument("--raw", action="store_true", help="do not apply the chat template")
    add_engine_args(gen)
    gen.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from truffula.engine.core import EngineCore

    config = engine_config(args)
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=tuple(args.stop or ()),
    )
    params.validate(config.limits)  # a bad flag is an error before the model loads
    core = EngineCore(config)
    prompt = args.prompt
    if not args.raw and core.tokenizer.has_chat_template:
        prompt = core.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    core.add_request(prompt, params)
    while core.has_work():
        for out in core.step():
            sys.stdout.write(out.text)
            sys.stdout.flush()
            if out.finished:
                sys.stdout.write("\n")
                if args.verbose:
                    print(
                        f"[{out.finish_reason}, {out.num_generated_tokens} tokens]", file=sys.stderr
                    )
    return 0
