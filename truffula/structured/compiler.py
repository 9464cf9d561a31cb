"""llguidance grammars: checked (and cached) in the API process, matchers in the engine.

llguidance builds its lexer and parser lazily, token by token, with a fuel limit on the work of
each step, so there is no ahead-of-time compilation whose cost grows with the vocabulary: a
"compile" here is parsing the schema / regex / grammar into llguidance's grammar and checking it
against the tokenizer (about a millisecond for the schemas of benchmarks/structured.py). The
check runs in a worker thread of the API process with a time limit (``CHECK_TIMEOUT_S``), before
the request reaches the engine; the engine makes each request's matcher from a cached prototype
(one ``deep_copy``, microseconds).
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
from collections import OrderedDict
from typing import Any

from truffula.errors import RequestValidationError
from truffula.structured.spec import StructuredOutput

CHECK_TIMEOUT_S = 10.0
"""A schema / grammar that takes longer than this to check is refused (422)."""
CACHE_SIZE = 256
JSON_OPTIONS = {"whitespace_flexible": False}
"""JSON is written compactly (``{"a": 1, "b": [2, 3]}``): no run of whitespace to wander into."""

_pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="truffula-grammar")


def _llguidance() -> Any:
    try:
        import llguidance
        import llguidance.hf
        import llguidance.torch
    except ImportError as exc:  # a dependency of truffula; missing only in a broken install
        raise RequestValidationError(
            "structured_outputs", "structured output needs the `llguidance` package"
        ) from exc
    return llguidance


def grammar_text(spec: StructuredOutput) -> str:
    """llguidance's grammar (its JSON form) for a request's constraint."""
    llg = _llguidance()
    if spec.kind == "json":
        schema = json.loads(spec.value)
        if isinstance(schema, dict) and "x-guidance" not in schema:
            schema = {**schema, "x-guidance": JSON_OPTIONS}
        return json.dumps({"grammars": [{"json_schema": schema}]})
    fmt = {"regex": "regex", "choice": "choice", "grammar": "grammar"}[spec.kind]
    return str(llg.grammar_from(fmt, spec.value))


class _Invalid:
    def __init__(self, reason: str) -> None:
        self.reason = reason


def _invalid(spec: StructuredOutput, reason: str) -> RequestValidationError:
    what = {"json": "schema", "regex": "regex", "choice": "choice", "grammar": "grammar"}
    reason = reason.strip().splitlines()[0] if reason.strip() else "cannot be compiled"
    return RequestValidationError(
        spec.field, f"`{spec.field}`: invalid or unsupported {what[spec.kind]}: {reason}"
    )


class Constraint:
    """One request's matcher: the mask of its next token, advanced by each accepted token."""

    def __init__(self, matcher: Any, eos_id: int) -> None:
        self.matcher = matcher
        self.eos_id = eos_id

    def fill(self, bitmask: Any, row: int) -> None:
        """Write the allowed tokens into ``bitmask[row]`` (int32 words, bit ``t % 32`` of word
        ``t // 32``)."""
        _llguidance().torch.fill_next_token_bitmask(self.matcher, bitmask, row)

    def accept(self, token: int) -> None:
        self.matcher.consume_token(token)

    @property
    def failed(self) -> str | None:
        return self.matcher.get_error() or None if self.matcher.is_error() else None


class GrammarCompiler:
    """Grammars of one tokenizer: checked and cached by constraint, matchers made from them."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int) -> None:
        self.hf_tokenizer = hf_tokenizer
        self.vocab_size = vocab_size
        self._tokenizer: Any = None
        self._lock = threading.Lock()
        self._checked: OrderedDict[tuple[str, str], str | _Invalid] = OrderedDict()
        self._prototypes: OrderedDict[tuple[str, str], Any] = OrderedDict()

    @property
    def tokenizer(self) -> Any:
        """llguidance's view of the vocabulary (built once, about 0.3 s for 49k tokens)."""
        with self._lock:
            if self._tokenizer is None:
                llg = _llguidance()
                self._tokenizer = llg.hf.from_tokenizer(self.hf_tokenizer, n_vocab=self.vocab_size)
            return self._tokenizer

    @property
    def eos_id(self) -> int:
        return int(self.tokenizer.eos_token)

    def check(self, spec: StructuredOutput) -> str:
        """The grammar of ``spec``, or RequestValidationError naming its field (cached)."""
        spec.validate()
        with self._lock:
            hit = self._checked.get(spec.key)
            if hit is not None:
                self._checked.move_to_end(spec.key)
        if hit is None:
            hit = self._compile(spec)
            with self._lock:
                self._checked[spec.key] = hit
                while len(self._checked) > CACHE_SIZE:
                    self._checked.popitem(last=False)
        if isinstance(hit, _Invalid):  # cached by constraint: the field is this request's
            raise _invalid(spec, hit.reason)
        return hit

    def _compile(self, spec: StructuredOutput) -> str | _Invalid:
        llg = _llguidance()
        try:
            grammar = grammar_text(spec)
            is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(
                grammar, self.tokenizer
            )
        except Exception as exc:  # text llguidance cannot take (a lone surrogate, ...)
            return _Invalid(str(exc))
        if is_error:
            return _Invalid("; ".join(messages))
        return grammar

    def check_with_timeout(self, spec: StructuredOutput, timeout: float = CHECK_TIMEOUT_S) -> str:
        """``check`` in a worker thread, refused after ``timeout`` seconds (the check goes on in
        the background and its result is cached). The tokenizer's one-off conversion is not
        timed."""
        with self._lock:
            hit = self._checked.get(spec.key)
        if isinstance(hit, str):
            return hit
        _ = self.tokenizer
        future = _pool.submit(self.check, spec)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise RequestValidationError(
                spec.field,
                f"`{spec.field}` took longer than {timeout:g} s to compile; simplify it",
            ) from None

    def constraint(self, spec: StructuredOutput) -> Constraint:
        """A fresh matcher for one request (a copy of the cached prototype)."""
        with self._lock:
            proto = self._prototypes.get(spec.key)
            if proto is not None:
                self._prototypes.move_to_end(spec.key)
        if proto is None:
            llg = _llguidance()
            proto = llg.LLMatcher(self.tokenizer, self.check(spec))
            with self._lock:
                self._prototypes[spec.key] = proto
                while len(self._prototypes) > CACHE_SIZE:
                    self._prototypes.popitem(last=False)
        return Constraint(proto.deep_copy(), self.eos_id)
