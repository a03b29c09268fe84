"""Example counts that follow the hypothesis profile chosen in conftest.py.

``@examples(50)`` runs a property at least 50 times under the ``ci`` profile and as many times as
a larger profile asks (``thorough``: 500); a plain ``@settings(max_examples=50)`` would pin it.
"""

from hypothesis import settings


def examples(at_least: int) -> settings:
    """Settings with ``max(at_least, the profile's max_examples)`` examples."""
    return settings(max_examples=max(at_least, settings.default.max_examples))
