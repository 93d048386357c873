import os

import pytest
import torch

# Tests are small; one thread keeps them deterministic and leaves cores to parallel workers.
torch.set_num_threads(int(os.environ.get("CLIPFORGE_TEST_THREADS", "1")))


@pytest.fixture
def micro_model():
    from clipforge import create_model

    torch.manual_seed(0)
    return create_model("ViT-Micro-8-32").eval()


@pytest.fixture(scope="session")
def open_clip():
    """The installed open_clip package, imported as its users do (see clip_reference.import_open_clip)."""
    from clip_reference import import_open_clip

    return import_open_clip()
