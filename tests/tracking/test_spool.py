"""The spool keeps finished results, arrays and all, until the next run logs them."""

import json

import numpy as np

from runner.results import PointResult, SAEEvalPointResult, SAEMeasurement
from runner.tracking.spool import Spool


def test_results_come_back_from_the_spool_as_they_went_in(tmp_path):
    steering = PointResult("a" * 16, "hello", (1, 2), {"steer/nll": 1.5}, tags={"t": "x"}, worker="w1", attempt=2)
    sae = SAEEvalPointResult("b" * 16, SAEMeasurement(
        {"sae/l0": 3.0}, density=np.array([0.0, 0.5]), density_histogram=np.array([1, 1]),
        density_histogram_edges=np.array([-10.0, -1.0, 0.0]), l0_histogram=np.array([0, 2, 0]),
        top_feature_rows=({"sequence": 0, "feature_ids": [1, 2]},),
    ))
    spool = Spool(tmp_path / "spool" / "sweep.jsonl")
    assert spool.read() == []

    spool.write([steering, sae])
    back_steering, back_sae = spool.read()

    assert back_steering == steering
    assert isinstance(back_sae, SAEEvalPointResult) and back_sae.point_key == sae.point_key
    assert back_sae.metrics == sae.metrics
    assert back_sae.measurement.top_feature_rows == sae.measurement.top_feature_rows
    for field in ("density", "density_histogram", "density_histogram_edges", "l0_histogram"):
        np.testing.assert_array_equal(getattr(back_sae.measurement, field), getattr(sae.measurement, field))
        assert getattr(back_sae.measurement, field).dtype == getattr(sae.measurement, field).dtype
    record = json.loads(spool.path.read_text(encoding="utf-8").splitlines()[1])
    assert record["kind"] == "sae_eval" and record["density"] == [0.0, 0.5], "one flat JSON object per result"


def test_writing_no_results_removes_the_spool(tmp_path):
    spool = Spool(tmp_path / "sweep.jsonl")
    spool.write([PointResult("a" * 16, "x", (1,), {})])
    assert spool.path.is_file()
    spool.write([])
    assert not spool.path.exists()
