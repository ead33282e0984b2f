"""Credentials never reach a log, a tag or the terminal."""

import logging

import pytest

from runner.redaction import redact_uri, scrub, scrub_log_records


def test_scrub_removes_credentials_from_error_texts():
    text = "fetch https://bob:pw@hf.co failed; token=abc123 hf_abcdefghijklmnopqrstuv"
    assert scrub(text) == "fetch https://***@hf.co failed; token=*** hf_***"


def test_scrub_masks_query_parameters_named_like_a_secret_and_keeps_the_others():
    text = "GET http://mlflow:5000/api?experiment=x&access_token=t0k3n&X-Amz-Signature=s1g&page=2 failed"
    assert scrub(text) == "GET http://mlflow:5000/api?experiment=x&access_token=***&X-Amz-Signature=***&page=2 failed"


@pytest.mark.parametrize(
    ("uri", "printed"),
    [
        ("http://mlflow:5000/?token=s3cr3t&page=2#runs", "http://mlflow:5000/?token=***&page=2#runs"),
        ("https://bob:pw@mlflow/x?api_key=k&sig=z&auth=a", "https://***@mlflow/x?api_key=***&sig=***&auth=***"),
        ("http://mlflow:5000?Password=p&experiment=e", "http://mlflow:5000?Password=***&experiment=e"),
        ("sqlite:///mlflow.db", "sqlite:///mlflow.db"),
        ("sqlite:////data/mlflow.db?mode=ro", "sqlite:////data/mlflow.db?mode=ro"),
        ("file:///tmp/mlruns", "file:///tmp/mlruns"),
    ],
)
def test_a_uri_is_printed_without_user_info_or_secret_parameters(uri, printed):
    assert redact_uri(uri) == printed


def test_every_log_record_is_scrubbed_whoever_logs_it(caplog):
    scrub_log_records()
    with caplog.at_level(logging.WARNING):
        logging.getLogger("some.library").warning("cannot reach %s", "http://mlflow:5000/?token=s3cr3t")
    assert caplog.records[-1].getMessage() == "cannot reach http://mlflow:5000/?token=***"
    assert "s3cr3t" not in caplog.text
