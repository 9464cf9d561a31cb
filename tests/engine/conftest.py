"""The tiny CUDA test models (``engine.gpu_models``), one folder per architecture and module."""

from __future__ import annotations

import pytest

from engine.gpu_models import make_model


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request, tmp_path_factory):  # type: ignore[no-untyped-def]
    folder = tmp_path_factory.mktemp(request.param)
    make_model(folder, request.param)
    return folder
