"""Structured output: JSON schemas, regular expressions, choices and grammars as token masks.

``spec``: what a request asks (``StructuredOutput``) and how each API spells it; ``compiler``:
the llguidance grammars, checked in the API process and turned into per-request matchers in the
engine; ``mask``: the host bitmask of a step's constrained rows and its application on the
device. docs/structured.md tells the design.
"""

from truffula.structured.spec import StructuredOutput

__all__ = ["StructuredOutput"]
