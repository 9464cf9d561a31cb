#!/usr/bin/env bash
# On a CUDA machine: `truffula serve --device cuda` on a tiny random model answers the LoRAX and
# OpenAI routes with token probabilities. Prints the replies; exits non-zero on failure.
set -euo pipefail
dir=$(mktemp -d)
python3 -c "import sys; sys.path.insert(0, 'tests'); from pathlib import Path; from test_gpu_engine import make_model; make_model(Path('$dir'), 'llama')"
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
kill -INT $pid; wait $pid; echo "server exited $?"
