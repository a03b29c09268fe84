import os

import pytest
import torch

try:  # a GPU machine may have no hypothesis: the CUDA tests do not need it
    from hypothesis import HealthCheck, Phase, settings
except ImportError:  # pragma: no cover
    settings = None

# Hypothesis profiles, chosen with HYPOTHESIS_PROFILE (default "ci"):
# - ci: what CI runs; bounded so the whole suite stays within about 10 minutes on 2 cores.
#   Properties marked @examples(n) (tests/_hypothesis.py) run n examples: 50 for the accumulation,
#   loss-scale and mask relations; the rest run 15.
# - thorough: 500 examples for every property, for a run before a release (about an hour).
# - mutation: what benchmarks/mutation.py runs for each mutant: derandomized (the same examples
#   every run, so the score can be rerun), no example database, no shrinking (a mutant only needs
#   to be killed, not explained).
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
if settings is not None:
    _quiet = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
    settings.register_profile("ci", max_examples=15, deadline=None, suppress_health_check=_quiet)
    settings.register_profile("dev", max_examples=25, deadline=None, suppress_health_check=_quiet)
    settings.register_profile("thorough", max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
    settings.register_profile("mutation", max_examples=15, deadline=None, suppress_health_check=list(HealthCheck),
                              derandomize=True, database=None, phases=[Phase.explicit, Phase.generate],
                              print_blob=False)
    settings.load_profile(PROFILE)

torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_report_header(config):
    if settings is None:
        return "hypothesis: not installed"
    return (f"hypothesis profile: {PROFILE} (max_examples={settings.default.max_examples}, "
            f"derandomize={settings.default.derandomize}); set HYPOTHESIS_PROFILE=ci|dev|thorough|mutation")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_thread():
    """Run the test on one torch thread: tiny models run fastest so and do not fight for cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
