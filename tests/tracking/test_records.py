"""Point records: a batch file is read back as written, each point once (FINISHED over FAILED), and a file that
cannot be read is skipped, not half-read."""

import json
import math

from runner.plan.points import SteeringPoint
from runner.results import PointResult
from runner.tracking.records import PointRecord, batch_name, read_batch_directory, table_document, write_batch


def point(feature: int, scale: float = 8.0) -> SteeringPoint:
    return SteeringPoint(prompt_index=0, prompt="Once upon a time", layer=1, feature=feature, scale=scale, seed=0,
                         mode="add", positions="all", temperature=0.0, top_k=None, top_p=None, max_new_tokens=2,
                         model_id="tiny", sae_id="synthetic", neuronpedia_url=f"https://np/1/{feature}")


def finished(feature: int, text: str = "hi", **metrics: float) -> PointRecord:
    p = point(feature)
    return PointRecord.finished(p, PointResult(p.point_key, text, (7, 8), {"steer/nll": 1.5, **metrics},
                                               tags={"logit_lens_tokens": '["a"]', "runner.preemptions": "1"},
                                               worker="w1", attempt=2))


def test_a_batch_file_reads_back_as_written(tmp_path) -> None:
    records = [finished(3, text="line\r\nbreak \x00 \"quoted\" \U0001f600"),
               PointRecord.failed(point(5), "RuntimeError: OOM", attempt=3)]
    path = write_batch(records, tmp_path)
    assert path.name == batch_name(records) == batch_name(records[::-1]), "the same batch, the same file"
    back = read_batch_directory(tmp_path)
    assert back == {record.point_key: record for record in records}
    assert back[records[0].point_key].params["scale"] == 8.0 and back[records[0].point_key].token_ids == (7, 8)
    assert back[records[1].point_key].error == "RuntimeError: OOM"


def test_each_point_is_read_once_its_finished_record_first(tmp_path) -> None:
    failed, first, second = PointRecord.failed(point(3), "boom", 1), finished(3, "first"), finished(3, "second")
    for name, record in (("a", failed), ("b", first), ("c", second)):
        (tmp_path / name).mkdir()
        write_batch([record], tmp_path / name).rename(tmp_path / f"{name}.json")
    assert read_batch_directory(tmp_path) == {first.point_key: first}, "FINISHED wins, then the first file"
    (tmp_path / "b.json").unlink()
    (tmp_path / "c.json").unlink()
    assert read_batch_directory(tmp_path)[failed.point_key].status == "FAILED"


def test_an_unreadable_file_is_skipped_and_its_points_count_as_not_logged(tmp_path, caplog) -> None:
    good, cut = finished(3), finished(5)
    write_batch([good], tmp_path)
    whole = write_batch([cut], tmp_path)
    whole.write_text(whole.read_text()[:-20])  # a driver killed during the upload
    (tmp_path / "other.json").write_text(json.dumps({"format": 99, "records": []}))
    assert read_batch_directory(tmp_path) == {good.point_key: good}
    assert sum("skipping the unreadable point record file" in message for message in caplog.messages) == 2
    assert read_batch_directory(tmp_path / "missing") == {}


def test_a_table_has_a_row_per_record_and_null_for_what_is_not_finite() -> None:
    records = [finished(5, **{"steer/kl_steered_base": math.inf}), finished(3)]
    table = table_document(records)
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    assert [row["feature"] for row in rows] == [3, 5], "sorted like the sweep"
    assert rows[1]["steer/kl_steered_base"] is None and rows[0]["steer/kl_steered_base"] is None
    assert rows[0]["token_ids"] == [7, 8] and rows[0]["runner.preemptions"] == "1"
    assert "logit_lens_tokens" not in table["columns"], "a curve run's tag, not a column"
    json.dumps(table, allow_nan=False)
