"""Command line: ``truffula generate``, ``truffula serve``, ``truffula inspect``.

Flags map onto ``EngineConfig`` here and nowhere else.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from truffula.config import EngineConfig, parse_size
from truffula.errors import TruffulaError

DEMO_PROMPT = "In one sentence, what is a truffula tree?"


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and engine")
    g.add_argument(
        "--model",
        default="default",
        help="'default' (embedded SmolLM2-135M-Instruct), a local HF folder, a .gguf file, or a "
        "hub id org/name[@revision] (the HF cache first, then a download)",
    )
    g.add_argument("--device", default="auto", help="auto, cpu or cuda")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument(
        "--quantization",
        default=None,
        choices=["int8"],
        help="int8: weight-only int8 linears, per-output-channel scales (LoRA factors stay 16/32-bit)",
    )
    g.add_argument("--max-model-len", type=int, default=None, help="longest prompt + generation")
    g.add_argument(
        "--kv-cache-memory",
        default=None,
        help="KV cache budget, e.g. 512MiB, 4GB (default: sized to the machine; CUDA: see "
        "--gpu-memory-utilization; CPU: 10%% of available RAM up to 1 GiB, at least one "
        "sequence of the full length)",
    )
    g.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.90,
        help="CUDA: fraction of the GPU's total memory truffula may use (weights, activations, "
        "CUDA graphs, KV cache; other processes' memory counts against it); the KV cache takes "
        "what is left (default 0.90)",
    )
    g.add_argument(
        "--num-kv-blocks",
        type=int,
        default=None,
        help="exact KV block count (overrides --kv-cache-memory)",
    )
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    g.add_argument(
        "--max-batch-tokens",
        type=int,
        default=None,
        help="token budget of one step (default: 8192 on CUDA, 512 on CPU)",
    )
    g.add_argument(
        "--max-prefill-while-decoding",
        type=int,
        default=None,
        help="most prefill tokens in a step that also decodes, so new prompts add a bounded "
        "delay to running streams (default: 256 on CUDA, where such steps replay CUDA graphs; 0, "
        "no cap beyond the step budget, on CPU)",
    )
    g.add_argument(
        "--speculative-config",
        default=None,
        help='speculative decoding, as JSON: {"method": "ngram", "num_speculative_tokens": 4, '
        '"prompt_lookup_min": 1, "prompt_lookup_max": 4} (prompt lookup; outputs, logprobs and '
        "alternatives are those of plain decoding)",
    )
    g.add_argument(
        "--max-num-seqs",
        type=int,
        default=None,
        help="most requests running in one step (default: 256 on CUDA, 64 on CPU)",
    )
    g.add_argument(
        "--cuda-graph-max-batch",
        type=int,
        default=None,
        help="largest decode batch replayed as a CUDA graph (default: --max-num-seqs; 0: none)",
    )
    g.add_argument(
        "--max-concurrent-requests", type=int, default=1024, help="requests held before 429"
    )
    g.add_argument(
        "--async-scheduling",
        default="auto",
        choices=["auto", "on", "off"],
        help="launch each step before reading the previous one's results (auto: on CUDA)",
    )
    g.add_argument(
        "--no-prefix-caching",
        dest="prefix_caching",
        action="store_false",
        help="compute every prompt in full (default: reuse cached KV blocks of shared prefixes)",
    )
    g.add_argument("--max-k-alternatives", type=int, default=20, help="largest k a request may ask")
    g.add_argument("--max-stop-sequences", type=int, default=4)
    g.add_argument(
        "--max-active-adapters", type=int, default=8, help="LoRA adapters resident at once"
    )
    g.add_argument(
        "--adapter-root",
        default=None,
        help="directory local adapter ids must resolve under (default: the working directory)",
    )
    g.add_argument("--max-lora-rank", type=int, default=16, help="largest adapter rank served")
    g.add_argument(
        "--max-cpu-adapters",
        type=int,
        default=64,
        help="adapters kept in host memory; the least recently used unused ones are dropped",
    )
    g.add_argument("-v", "--verbose", action="store_true")


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig.from_kwargs(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        quantization=args.quantization,
        max_model_len=args.max_model_len,
        kv_cache_memory=None if args.kv_cache_memory is None else parse_size(args.kv_cache_memory),
        gpu_memory_utilization=args.gpu_memory_utilization,
        num_blocks=args.num_kv_blocks,
        block_size=args.block_size,
        enable_prefix_caching=args.prefix_caching,
        max_num_batched_tokens=args.max_batch_tokens,
        max_num_seqs=args.max_num_seqs,
        max_prefill_while_decoding=args.max_prefill_while_decoding,
        speculative=args.speculative_config,
        cuda_graph_max_batch=args.cuda_graph_max_batch,
        max_queued_requests=args.max_concurrent_requests,
        async_scheduling=args.async_scheduling,
        max_k_alternatives=args.max_k_alternatives,
        max_stop_sequences=args.max_stop_sequences,
        max_active_adapters=args.max_active_adapters,
        adapter_root=args.adapter_root,
        max_lora_rank=args.max_lora_rank,
        max_cpu_adapters=args.max_cpu_adapters,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from truffula.engine.core import EngineCore
    from truffula.sampling.params import SamplingParams

    core = EngineCore(engine_config(args))
    prompt = args.prompt
    if not args.raw and core.tokenizer.has_chat_template:
        prompt = core.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=tuple(args.stop or ()),
    )
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


def cmd_serve(args: argparse.Namespace) -> int:
    from truffula.server.launch import serve

    return serve(args, engine_config(args))


def cmd_inspect(args: argparse.Namespace) -> int:
    from truffula.analysis.inspect_cli import run_inspect

    return run_inspect(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="truffula", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate a completion and stream it to stdout")
    gen.add_argument("prompt", nargs="?", default=DEMO_PROMPT)
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", help="stop sequence (repeatable)")
    gen.add_argument("--raw", action="store_true", help="do not apply the chat template")
    add_engine_args(gen)
    gen.set_defaults(func=cmd_generate)

    srv = sub.add_parser("serve", help="run the HTTP server (LoRAX, TGI and OpenAI APIs)")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8080)
    srv.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on every route but /health",
    )
    srv.add_argument(
        "--preload-adapter",
        action="append",
        default=[],
        help="adapter id to load at start-up (repeatable)",
    )
    srv.add_argument(
        "--adapter-source",
        default=None,
        choices=["local", "hub"],
        help="default adapter_source (unset: a folder under --adapter-root, else the HF cache)",
    )
    srv.add_argument(
        "--drain-timeout", type=float, default=10.0, help="seconds to finish requests on shutdown"
    )
    srv.add_argument("--log-level", default="info")
    srv.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="json: one JSON object a line, with the request id (x-request-id) of each request",
    )
    srv.add_argument(
        "--strict-params",
        action="store_true",
        help="answer 422 naming any unknown field of a request body (default: ignored, as LoRAX)",
    )
    srv.add_argument(
        "--otlp-endpoint",
        default=None,
        help="export OpenTelemetry traces over OTLP/HTTP to this URL, e.g. "
        "http://localhost:4318 (needs pip install 'truffula[tracing]')",
    )
    srv.add_argument(
        "--otlp-service-name", default="truffula", help="service.name of the exported spans"
    )
    srv.add_argument(
        "--api-server-count",
        type=int,
        default=1,
        help="HTTP server processes in front of the one engine process (share the port)",
    )
    srv.add_argument(
        "--max-request-bytes",
        type=parse_size,
        default=None,
        help="largest request body, e.g. 4MiB (default 4 MiB); larger ones are answered 413 "
        "before they are read",
    )
    add_engine_args(srv)
    srv.set_defaults(func=cmd_serve)

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
    ins.set_defaults(func=cmd_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except (TruffulaError, ValueError) as exc:
        print(f"truffula: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
