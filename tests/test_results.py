"""runner.results: what a worker sends back."""

from __future__ import annotations

import numpy as np
import pytest

from runner.results import SAEEvalPointResult, SAEMeasurement


@pytest.fixture
def measurement() -> SAEMeasurement:
    return SAEMeasurement(
        metrics={"sae/l0": np.float32(2.5), "density/n_tokens": 12},
        density=np.array([0.25, 0.0, 0.5], np.float32),
        density_histogram=np.array([1, 2], np.int32),
        density_histogram_edges=[-10.0, -5.0, 0.0],
        l0_histogram=np.array([0, 3, 9]),
        top_feature_rows=[{"sequence": 0, "position": 1, "token": 7, "token_text": "a", "feature_ids": [2],
                           "feature_values": [0.5]}],
    )


def test_a_measurement_is_normalised_to_plain_floats_and_fixed_dtypes(measurement) -> None:
    assert measurement.metrics == {"sae/l0": 2.5, "density/n_tokens": 12.0}
    assert all(type(value) is float for value in measurement.metrics.values())
    assert (measurement.density.dtype, measurement.density_histogram.dtype) == (np.float64, np.int64)
    assert (measurement.density_histogram_edges.dtype, measurement.l0_histogram.dtype) == (np.float64, np.int64)
    assert isinstance(measurement.top_feature_rows, tuple)


def test_a_point_result_carries_the_measurement_and_its_metrics(measurement) -> None:
    result = SAEEvalPointResult("key", measurement, worker="host-1", attempt=2)
    assert result.measurement is measurement
    assert result.metrics == measurement.metrics
    assert result.tokens == 12
