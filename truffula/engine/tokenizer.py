"""The model's tokenizer, its end-of-sequence ids and chat template."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

from truffula.errors import ModelLoadError


class Tokenizer:
    def __init__(self, folder: Path) -> None:
        from transformers import AutoTokenizer

        try:
            self.hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:
            raise ModelLoadError(f"the tokenizer in {folder} cannot be loaded: {exc}") from exc
        if not getattr(self.hf, "is_fast", False):
            raise ModelLoadError(
                f"the tokenizer in {folder} has no tokenizer.json (fast tokenizer)"
            )
        self.eos_ids = _eos_ids(folder, self.hf)
        self.bos_id: int | None = self.hf.bos_token_id

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return cast(str, self.hf.decode(ids, skip_special_tokens=skip_special_tokens))

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        if not self.has_chat_template:
            raise ValueError("this model has no chat template")
        text = self.hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        return cast(str, text)  # tokenize=False: the rendered prompt

    def offsets(self, text: str, add_special_tokens: bool = True) -> list[tuple[int, int, int]]:
        """(id, start, stop) character offsets of each token of ``text``."""
        enc = self.hf(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        return [
            (i, a, b) for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
        ]


def _eos_ids(folder: Path, hf: Any) -> set[int]:
    ids: set[int] = set()
    gen = folder / "generation_config.json"
    if gen.exists():
        try:
            value = json.loads(gen.read_text()).get("eos_token_id")
        except json.JSONDecodeError:
            value = None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(int(v) for v in value)
    if hf.eos_token_id is not None:
        ids.add(int(hf.eos_token_id))
    return ids
