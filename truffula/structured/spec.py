"""What a request constrains its output to, and how each API dialect spells it.

Every dialect is parsed into one ``StructuredOutput`` (kind + text) carried by
``SamplingParams``; malformed or conflicting options raise ``RequestValidationError`` naming the
API field, before anything is compiled or run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from truffula.errors import RequestValidationError

Kind = Literal["json", "regex", "choice", "grammar"]
KINDS = ("json", "regex", "choice", "grammar")
MAX_SPEC_CHARS = 1 << 20
"""Largest schema / regex / grammar text accepted (the request body limit applies first)."""
ANY_JSON_OBJECT = '{"type": "object"}'


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint on the generated text.

    ``kind``: ``json`` (``value`` is a JSON schema as text), ``regex``, ``choice`` (``value`` is
    a JSON list of strings) or ``grammar`` (Lark, or GBNF as llama.cpp writes it). ``field`` is
    the request field it came from, named by error messages."""

    kind: str
    value: str
    field: str = "structured_outputs"

    @property
    def key(self) -> tuple[str, str]:
        """What compiled grammars are cached by."""
        return (self.kind, self.value)

    def validate(self) -> None:
        """Shape only (types, size); whether it compiles is the compiler's check."""
        if self.kind not in KINDS:
            raise RequestValidationError(
                self.field, f"`{self.field}` kind must be one of {', '.join(KINDS)}"
            )
        if not isinstance(self.value, str) or not self.value:
            raise RequestValidationError(self.field, f"`{self.field}` must not be empty")
        if len(self.value) > MAX_SPEC_CHARS:
            raise RequestValidationError(
                self.field, f"`{self.field}` must be at most {MAX_SPEC_CHARS} characters"
            )


def _fail(field: str, reason: str) -> RequestValidationError:
    return RequestValidationError(field, f"`{field}` {reason}")


def _schema_text(field: str, schema: Any) -> str:
    """A JSON schema given as an object (or as JSON text, as TGI allows) -> canonical text."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise _fail(field, f"schema is not valid JSON: {exc}") from None
    if isinstance(schema, bool):
        schema = {} if schema else {"not": {}}
    if not isinstance(schema, dict):
        raise _fail(field, "schema must be a JSON object")
    return json.dumps(schema, sort_keys=True, separators=(",", ":"))


def _object(field: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(field, "must be an object")
    return value


def _json_schema_member(field: str, spec: dict[str, Any]) -> StructuredOutput:
    """OpenAI's ``{type: json_schema, json_schema: {name, schema, strict}}``; LoRAX's
    ``{type: json_schema, schema}`` too."""
    inner = spec.get("json_schema")
    if inner is None:
        if "schema" not in spec:
            raise _fail(field, "of type json_schema needs `json_schema.schema`")
        return StructuredOutput("json", _schema_text(field, spec["schema"]), field)
    inner = _object(f"{field}.json_schema", inner)
    strict = inner.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise _fail(f"{field}.json_schema.strict", "must be a boolean")
    name = inner.get("name")
    if name is not None and not isinstance(name, str):
        raise _fail(f"{field}.json_schema.name", "must be a string")
    if "schema" not in inner or inner["schema"] is None:
        return StructuredOutput("json", ANY_JSON_OBJECT, field)
    return StructuredOutput("json", _schema_text(field, inner["schema"]), field)


def response_format(value: Any, field: str = "response_format") -> StructuredOutput | None:
    """LoRAX ``{type: text | json_object | json_schema, schema?}`` and OpenAI
    ``{type: text | json_object | json_schema, json_schema?}``; ``text`` constrains nothing."""
    if value is None:
        return None
    spec = _object(field, value)
    kind = spec.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        schema = spec.get("schema")
        text = ANY_JSON_OBJECT if schema is None else _schema_text(field, schema)
        return StructuredOutput("json", text, field)
    if kind == "json_schema":
        return _json_schema_member(field, spec)
    raise _fail(f"{field}.type", f"must be text, json_object or json_schema. Given: {kind!r}")


def tgi_grammar(value: Any, field: str = "grammar") -> StructuredOutput | None:
    """TGI ``{type: json | regex, value}`` (a JSON schema may be an object or its text)."""
    if value is None:
        return None
    spec = _object(field, value)
    kind, body = spec.get("type"), spec.get("value")
    if body is None:
        raise _fail(f"{field}.value", "is required")
    if kind in ("json", "json_schema"):
        return StructuredOutput("json", _schema_text(field, body), field)
    if kind == "regex":
        if not isinstance(body, str) or not body:
            raise _fail(f"{field}.value", "must be a non-empty regular expression")
        return StructuredOutput("regex", body, field)
    raise _fail(f"{field}.type", f"must be json or regex. Given: {kind!r}")


STRUCTURED_MEMBERS = ("json", "regex", "choice", "grammar", "json_object")


def structured_outputs(value: Any, field: str = "structured_outputs") -> StructuredOutput | None:
    """vLLM's ``structured_outputs``: exactly one of ``json`` (a schema), ``regex``, ``choice``
    (a list of strings), ``grammar`` (Lark / GBNF) or ``json_object: true``."""
    if value is None:
        return None
    spec = _object(field, value)
    given = [m for m in STRUCTURED_MEMBERS if spec.get(m) not in (None, False)]
    if not given:
        return None
    if len(given) > 1:
        raise _fail(field, f"takes one constraint; given {len(given)}: {', '.join(given)}")
    member = given[0]
    body = spec[member]
    sub = f"{field}.{member}"
    if member == "json":
        return StructuredOutput("json", _schema_text(sub, body), sub)
    if member == "json_object":
        if body is not True:
            raise _fail(sub, "must be true")
        return StructuredOutput("json", ANY_JSON_OBJECT, sub)
    if member == "choice":
        if not (isinstance(body, list) and body and all(isinstance(c, str) and c for c in body)):
            raise _fail(sub, "must be a non-empty list of non-empty strings")
        return StructuredOutput("choice", json.dumps(body), sub)
    if not isinstance(body, str) or not body:
        raise _fail(sub, "must be a non-empty string")
    return StructuredOutput(member, body, sub)


def only_one(*specs: StructuredOutput | None) -> StructuredOutput | None:
    """The one constraint among several request fields; two is a conflict."""
    given = [s for s in specs if s is not None]
    if len(given) > 1:
        names = " and ".join(f"`{s.field.split('.')[0]}`" for s in given)
        raise RequestValidationError(
            given[1].field.split(".")[0], f"{names} both constrain the output: give only one"
        )
    return given[0] if given else None
