from pathlib import Path

import pytest
import torch

# Tiny test models gain nothing from a second thread, and OpenMP threads that spin while
# another process holds the other core can slow a step down tenfold.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHAKESPEARE = REPO / "src" / "lmforge" / "assets" / "tinyshakespeare.txt"


@pytest.fixture(scope="session")
def shakespeare_text() -> str:
    return SHAKESPEARE.read_text(encoding="utf-8")


@pytest.fixture
def small_corpus(tmp_path, shakespeare_text) -> Path:
    """About 60 kB of Shakespeare in a file."""
    p = tmp_path / "corpus.txt"
    p.write_text(shakespeare_text[:60_000], encoding="utf-8")
    return p
