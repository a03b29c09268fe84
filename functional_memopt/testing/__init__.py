"""The public test kit: hypothesis strategies, tree-aware assertions and epsilon-derived tolerances.

Point these at your own loss function or training step to property-test that a memory technique
changed memory, not mathematics. The metamorphic assertions (:mod:`.metamorphic`) need no expected
values at all: loss-scale invariance, accumulation invariance, mask equivalence, master precision. The library's own property tests are written with them, and
:mod:`functional_memopt.testing.reference` holds the imperative recipe (an ``nn.Module`` GPT with
``torch.amp`` and ``torch.optim``) that the functional step is checked against.

Example:
    >>> from hypothesis import given
    >>> from functional_memopt import testing
    >>> @given(testing.configs())
    ... def test_my_model(cfg): ...
"""

from .assertions import assert_accumulation_equivalent as assert_accumulation_equivalent
from .assertions import assert_precision_close as assert_precision_close
from .assertions import assert_skipped_step_is_noop as assert_skipped_step_is_noop
from .assertions import assert_steps_equivalent as assert_steps_equivalent
from .assertions import assert_trees_close as assert_trees_close
from .assertions import assert_trees_equal as assert_trees_equal
from .assertions import poison as poison
from .metamorphic import assert_accumulation_invariant as assert_accumulation_invariant
from .metamorphic import assert_loss_scale_invariant as assert_loss_scale_invariant
from .metamorphic import assert_mask_equivalent as assert_mask_equivalent
from .metamorphic import assert_master_precision as assert_master_precision
from .metamorphic import update_error as update_error
from .strategies import accumulation_steps as accumulation_steps
from .strategies import configs as configs
from .strategies import nonfinite_values as nonfinite_values
from .strategies import masked_batches as masked_batches
from .strategies import params as params
from .strategies import policies as policies
from .strategies import powers_of_two as powers_of_two
from .strategies import ragged_batches as ragged_batches
from .strategies import token_batches as token_batches
from .tolerances import GRAD_TOLERANCE_FACTOR as GRAD_TOLERANCE_FACTOR
from .tolerances import LOSS_TOLERANCE_FACTOR as LOSS_TOLERANCE_FACTOR
from .tolerances import relative_error as relative_error
from .tolerances import tolerance as tolerance

__all__ = [
    # assertions
    "assert_trees_close", "assert_trees_equal", "assert_accumulation_equivalent", "assert_precision_close",
    "assert_skipped_step_is_noop", "assert_steps_equivalent", "poison",
    # metamorphic relations on a whole step
    "assert_loss_scale_invariant", "assert_accumulation_invariant", "assert_mask_equivalent", "assert_master_precision",
    "update_error",
    # strategies
    "configs", "params", "token_batches", "ragged_batches", "masked_batches", "policies", "nonfinite_values",
    "accumulation_steps", "powers_of_two",
    # tolerances
    "tolerance", "relative_error", "LOSS_TOLERANCE_FACTOR", "GRAD_TOLERANCE_FACTOR",
]
