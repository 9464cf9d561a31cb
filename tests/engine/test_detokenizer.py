"""Incremental detokenization: multi-byte UTF-8, byte fallback, stop sequences, alternatives."""

from __future__ import annotations

import pytest

from truffula.engine.detokenizer import Detokenizer, TokenTable


@pytest.fixture(scope="module")
def table(hf_tokenizer) -> TokenTable:  # type: ignore[no-untyped-def]
    return TokenTable(hf_tokenizer)


TEXTS = [
    "über café naïve",
    "日本語のテキスト",
    "emoji 😀🎉 and ünïcödé",
    "mixed: Ж, ק, ☃, 𝄞!",
    "plain ascii text",
]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_level_stream_never_shows_replacement_chars(table, hf_tokenizer, text: str) -> None:  # type: ignore[no-untyped-def]
    ids = hf_tokenizer.encode(text, add_special_tokens=False)
    detok = Detokenizer(table, (), skip_special=True)
    pieces = [detok.add(t).released for t in ids] + [detok.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text == hf_tokenizer.decode(ids)


def test_some_default_model_tokens_are_partial_characters(table, hf_tokenizer) -> None:  # type: ignore[no-untyped-def]
    ids = hf_tokenizer.encode("😀", add_special_tokens=False)
    assert len(ids) > 1 and table.text[ids[0]] is None  # the first piece is not a whole character
    detok = Detokenizer(table, (), skip_special=True)
    first = detok.add(ids[0])
    assert first.token_text == "" and detok.pending
    # an alternative in place of the second piece completes the same pending bytes
    alt_text, _ = detok.token_text(ids[1])
    assert alt_text == "😀"[: len(alt_text)] and "\ufffd" not in alt_text


def sentencepiece_tokenizer():  # type: ignore[no-untyped-def]
    """A real SentencePiece-style BPE with byte fallback, built with the tokenizers library."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in [
        "▁",
        "h",
        "e",
        "l",
        "o",
        "w",
        "r",
        "d",
        "▁h",
        "▁he",
        "▁hel",
        "▁hell",
        "▁hello",
        "▁w",
        "▁wo",
        "▁wor",
        "▁worl",
        "▁world",
    ]:
        vocab[piece] = len(vocab)
    merges = [
        ("▁", "h"),
        ("▁h", "e"),
        ("▁he", "l"),
        ("▁hel", "l"),
        ("▁hell", "o"),
        ("▁", "w"),
        ("▁w", "o"),
        ("▁wo", "r"),
        ("▁wor", "l"),
        ("▁worl", "d"),
    ]
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def test_sentencepiece_byte_fallback_tokens() -> None:
    hf = sentencepiece_tokenizer()
    table = TokenTable(hf)
    text = "hello 日本 world"
    ids = hf.encode(text, add_special_tokens=False)
    byte_ids = [i for i in ids if hf.convert_ids_to_tokens(i).startswith("<0x")]
    assert len(byte_ids) == 6  # two CJK characters, three fallback bytes each
    detok = Detokenizer(table, (), skip_special=True)
    pieces = [detok.add(t).released for t in ids]
    assert all("\ufffd" not in p for p in pieces)
    # continuation text keeps the leading space the SentencePiece decoder strips at the start
    assert "".join(pieces) == " " + hf.decode(ids)
    # mid-character, an alternative byte completes the pending bytes in place of the chosen one
    detok = Detokenizer(table, (), skip_special=True)
    for t in ids[: ids.index(byte_ids[2])]:
        detok.add(t)
    assert len(detok.pending) == 2
    chosen, _ = detok.token_text(byte_ids[2])
    assert chosen == "日"
    alt, _ = detok.token_text(table.strings.index("<0xA4>"))  # E6 97 A4 is 旤
    assert alt == "\u65e4"


@pytest.mark.parametrize(
    ("stop", "expected"),
    [(("lo wor",), "hel"), (("world",), "hello "), (("xyz",), "hello world"), (("o", "ll"), "he")],
)
def test_stop_sequence_spanning_tokens_is_never_emitted(
    table, hf_tokenizer, stop, expected
) -> None:  # type: ignore[no-untyped-def]
    ids = hf_tokenizer.encode("hello world", add_special_tokens=False)
    detok = Detokenizer(table, stop, skip_special=True)
    released = []
    stopped = False
    for t in ids:
        step = detok.add(t)
        released.append(step.released)
        if step.stopped:
            stopped = True
            break
    if not stopped:
        released.append(detok.flush())
    assert "".join(released) == expected
    assert stopped == (expected != "hello world")
    assert detok.text == expected


def test_held_back_text_is_released_when_the_stop_does_not_complete(table, hf_tokenizer) -> None:  # type: ignore[no-untyped-def]
    ids = hf_tokenizer.encode("the end", add_special_tokens=False)
    detok = Detokenizer(table, ("end of story",), skip_special=True)
    released = [detok.add(t).released for t in ids]
    assert "".join(released) == "the "  # "end" could still become the stop sequence
    assert detok.flush() == "end"
    ids = hf_tokenizer.encode("the end.", add_special_tokens=False)
    detok = Detokenizer(table, ("end of story",), skip_special=True)
    assert "".join(detok.add(t).released for t in ids) == "the end."  # "." rules it out


def test_special_tokens_are_skipped_in_text_but_named_in_token_text(table, hf_tokenizer) -> None:  # type: ignore[no-untyped-def]
    eos = hf_tokenizer.eos_token_id
    detok = Detokenizer(table, (), skip_special=True)
    step = detok.add(eos)
    assert step.token_text == hf_tokenizer.eos_token and step.released == "" and detok.text == ""
    keep = Detokenizer(table, (), skip_special=False)
    assert keep.add(eos).released == hf_tokenizer.eos_token


def test_alternative_dicts_equal_the_records_they_skip(table, hf_tokenizer) -> None:  # type: ignore[no-untyped-def]
    """A token event's alternatives built straight from ids and logprobs (``as_dicts``) equal
    those of the records (``Alternative``), after a whole character and after a partial one,
    and once the records were read."""
    from truffula.engine.output import LazyAlternatives
    from truffula.runner.output import TokenLogprobs
    from truffula.server.formats import alternative_dict

    emoji = hf_tokenizer.encode("😀", add_special_tokens=False)
    plain = hf_tokenizer.encode(" the sea", add_special_tokens=False)
    top = [*plain, *emoji, table.size + 3]  # one id past the table: empty text
    lp = TokenLogprobs(plain[0], -0.5, 1, 2.0, top, [-0.5 - i for i in range(len(top))])
    for prefix in ([], emoji[:-1]):  # nothing pending; all but the last piece of a character
        detok = Detokenizer(table, (), skip_special=True)
        for t in prefix:
            detok.add(t)
        lazy = LazyAlternatives(table, detok, lp, detok.pending)
        fresh = lazy.as_dicts()
        records = [alternative_dict(a) for a in lazy]  # reads the records
        assert fresh == records == lazy.as_dicts()
        assert [d["id"] for d in fresh] == top and fresh[-1]["text"] == ""
    # the last piece, in place of the chosen token, completes the pending character
    assert records[len(plain) + len(emoji) - 1]["text"] == "😀"
