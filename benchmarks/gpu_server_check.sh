#!/usr/bin/env bash
# On a CUDA machine: `truffula serve --device cuda` on a tiny random model answers the LoRAX and
# OpenAI routes with token probabilities. Prints the replies; exits non-zero on failure.
set -euo pipefail
dir=$(mktemp -d)
python3 -c "import sys; sys.path.insert(0, 'tests'); from pathlib import Path; from engine.test_gpu_engine import make_model; make_model(Path('$dir'), 'llama')"
python3 -m truffula.cli serve --device cuda --model "$dir" --port 8099 > "$dir/log" 2>&1 &
pid=$!
for _ in $(seq 120); do grep -q serving "$dir/log" && break; sleep 1; done
curl -sf localhost:8099/info | python3 -c "import json,sys; d=json.load(sys.stdin); print(d['model_device_type'], d['model_dtype'])"
curl -sf localhost:8099/generate -H 'content-type: application/json' \
  -d '{"inputs": "the quick brown", "parameters": {"max_new_tokens": 4, "return_k_alternatives": 2}}'
echo
curl -sf localhost:8099/v1/completions -H 'content-type: application/json' \
  -d '{"prompt": "hello world", "max_tokens": 3, "logprobs": 2}' | head -c 400
echo
# concurrent requests (asynchronous scheduling), one stream dropped by its client mid-way
curl -sN localhost:8099/generate_stream -H 'content-type: application/json' \
  -d '{"inputs": "one two", "parameters": {"max_new_tokens": 400, "ignore_eos": true}}' \
  > /dev/null & dropped=$!
pids=()
for i in $(seq 8); do
  curl -sf localhost:8099/generate -H 'content-type: application/json' \
    -d '{"inputs": "one two three", "parameters": {"max_new_tokens": 48, "details": true, "return_k_alternatives": 3, "ignore_eos": true}}' \
    > "$dir/out$i" & pids+=($!)
done
sleep 0.3; kill $dropped || true
for p in "${pids[@]}"; do wait "$p"; done
python3 - "$dir" <<'PY'
import json, sys
outs = [json.load(open(f"{sys.argv[1]}/out{i}")) for i in range(1, 9)]
assert all(o["details"]["generated_tokens"] == 48 for o in outs), outs
assert len({o["generated_text"] for o in outs}) == 1, "greedy requests disagree"
print("8 concurrent requests: 48 tokens each, identical greedy text")
PY
curl -sf localhost:8099/metrics | grep -E '^lorax_request_count|^truffula_requests' | head -3 || true
kill -INT $pid; wait $pid; echo "server exited $?"
