"""The order statistics preprocessing relies on give np.percentile's values."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from lenet.stats import median, quantiles

# Few distinct values, as a clean background clipped to exactly 0 gives, as well as any floats.
values = st.one_of(
    arrays(np.float32, st.integers(1, 3000), elements=st.sampled_from([0.0, 0.25, 1.0])),
    arrays(np.float32, st.integers(1, 3000), elements=st.floats(0, 1, width=32)),
)


@settings(max_examples=200, deadline=None)
@given(values, st.lists(st.floats(0, 1), min_size=1, max_size=4))
def test_quantiles_are_numpys_percentiles(array, qs):
    expected = [float(np.percentile(array, q * 100)) for q in qs]
    # NumPy interpolates in the array's float32; ours is float64: equal to float32 precision.
    assert quantiles(array, tuple(qs)) == pytest.approx(expected, rel=1e-6, abs=1e-7)


@settings(max_examples=100, deadline=None)
@given(values)
def test_median_is_numpys(array):
    assert median(array) == pytest.approx(float(np.median(array)), rel=1e-6, abs=1e-7)
