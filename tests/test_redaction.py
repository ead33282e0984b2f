"""Credentials never reach a log, a tag or the terminal."""

from runner.redaction import scrub


def test_scrub_removes_credentials_from_error_texts():
    text = "fetch https://bob:pw@hf.co failed; token=abc123 hf_abcdefghijklmnopqrstuv"
    assert scrub(text) == "fetch https://***@hf.co failed; token=*** hf_***"
