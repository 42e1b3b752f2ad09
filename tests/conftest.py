import sys
from pathlib import Path

import pytest
import torch

# The repository's modules (models.py, checkpoint.py, diffusion/) live at the root, next to tests/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny batches: a second intra-op thread only waits for a core on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
