"""Fixtures of the tracking tests: a real sqlite tracking store."""

import pytest


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite database per module (its first initialisation costs ~2 s); artifacts under the same folder."""
    root = tmp_path_factory.mktemp("mlflow")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)  # MLflow puts artifacts of new experiments in ./mlruns
        yield f"sqlite:///{root / 'mlflow.db'}"
