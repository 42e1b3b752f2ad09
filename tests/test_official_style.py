"""benchmarks/official_style.py: the benchmarks' baseline is the official model with the same weights, and
refuses a model the study changed (another norm, dropout, a cap), whose weights it could not run."""

import pytest
import torch
from builders import load_benchmark, randomize

from models import DiT_models

pytestmark = pytest.mark.usefixtures("one_thread")
OFFICIAL = load_benchmark("official_style")


def test_the_baseline_computes_what_the_model_computes():
    model = randomize(DiT_models["ToyDiT-XS/1"]()).eval()  # off adaLN-Zero: every block contributes
    official = OFFICIAL.official_model_from(model).eval()
    x, t, y = torch.randn(5, 2, 2, 2), torch.randint(0, 1000, (5,)), torch.zeros(5, dtype=torch.long)
    with torch.no_grad():
        torch.testing.assert_close(official(x, t, y), model(x, t, y), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("change", [dict(norm="none"), dict(dropout=0.1), dict(cap=4.0)])
def test_a_model_the_study_changed_is_refused(change):
    with pytest.raises(ValueError, match="only for the official model"):
        OFFICIAL.official_model_from(DiT_models["ToyDiT-XS/1"](**change))
