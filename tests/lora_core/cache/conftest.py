"""Shared inputs of the cache tests: one small real dataset (H.264 clips + captions) per session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lora_core.data.sample_data import make_sample_dataset


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_sample_dataset(tmp_path_factory.mktemp("sample"), num_clips=4)


@pytest.fixture
def data_dir(sample_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the sample dataset, free to edit."""
    return Path(shutil.copytree(sample_dir, tmp_path / "data"))
