import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def sp_model_file(tmp_path_factory):
    """A 512-piece sentencepiece BPE model trained on real text (20 held-out stdlib files) in a few seconds."""
    from eval import stdlib_texts
    from train_tiny import train_tokenizer
    path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    train_tokenizer(stdlib_texts("heldout")[:20], path, vocab_size=512)
    return path
