"""What an API process keeps for the garbage collector to walk while it streams: the engine's
outputs and their statistics are untracked (numbers only, no cycles), and a stream's
accumulator keeps the text and counts but not the token records its events already carried."""

from __future__ import annotations

import gc

from truffula.engine import messages as m
from truffula.engine.output import RequestOutput, TokenInfo
from truffula.runner.output import TokenLogprobs
from truffula.server.formats import Accumulator


def test_decoded_outputs_are_untracked_and_unchanged() -> None:
    lp = TokenLogprobs(7, -0.25, 2, 1.5, [3, 7, 9], [-0.1, -0.25, -3.0])
    sent = [m.EngineOutput("r1", token_ids=[7], logprobs=[lp], finish_reason="length")]
    (got,) = m.outputs_decoder.decode(m.encoder.encode(sent))
    assert got == sent[0] and got.logprobs[0] == lp
    assert not gc.is_tracked(got) and not gc.is_tracked(got.logprobs[0])
    assert not gc.is_tracked(lp)


def test_a_stream_accumulator_keeps_text_and_counts_not_records() -> None:
    tok = TokenInfo(5, "hi", b"hi", False, -0.5, 1, 0.1)
    outs = [
        RequestOutput("r", [tok], "hi", num_prompt_tokens=3, num_generated_tokens=1),
        RequestOutput("r", [tok], " there", True, "length", num_generated_tokens=2, seed=4),
    ]
    kept, streamed = Accumulator(), Accumulator(keep_tokens=False)
    for out in outs:
        kept.add(out)
        streamed.add(out)
    assert kept.tokens == [tok, tok] and streamed.tokens == []
    for acc in (kept, streamed):
        assert (acc.text, acc.finish_reason, acc.seed) == ("hi there", "length", 4)
        assert (acc.num_prompt_tokens, acc.num_generated_tokens) == (3, 2)
