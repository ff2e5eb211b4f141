"""md4.draws' docstring on values of probability near 1e-11: the share of its rate a
value keeps, computed exactly from the bits map (tests/test_draws.py's bisection)."""

import pytest

from tests.test_draws import _exact_rare_rate


@pytest.mark.parametrize("probability,kept", [(1e-10, 0.805), (1.45e-10, 0.90), (5.3e-11, 0.50),
                                              (2e-11, 0.035), (1e-11, 0.0002)])
def test_the_docstrings_kept_shares_of_the_rate(probability, kept):
  rate = _exact_rare_rate(probability, num_grid=2**20)
  assert rate / probability == pytest.approx(kept, rel=0.03)
