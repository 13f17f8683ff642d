"""Shared fixtures: synthetic data and the tiny model are built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mpo.synth import generate

    out = tmp_path_factory.mktemp("synth")
    generate(out, count=10, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random-weight tiny model (no warm-up): fast, and enough for plumbing tests."""
    from mpo.tiny_model import build_tiny_model

    out = tmp_path_factory.mktemp("tiny-model")
    build_tiny_model(out, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir: Path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    return model.eval(), processor


@pytest.fixture(scope="session")
def prompts_dir(synth_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`mpo ingest` of the synthetic train split: 40 closed and 8 open prompts."""
    from mpo.ingest import ingest

    out = tmp_path_factory.mktemp("ingested")
    ingest(synth_dir / "meta.json", out)
    return out / "prompts"


@pytest.fixture(scope="session")
def hf_engine(tiny_model_dir: Path):
    from mpo.engines.hf import TransformersEngine

    engine = TransformersEngine(str(tiny_model_dir))
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def gold_pairs_dir(synth_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Pairs from the synthetic train split (40 pairs: solution vs. a wrong final answer), no ref log-probs."""
    from mpo.synth import solution_pairs

    return solution_pairs(synth_dir, tmp_path_factory.mktemp("gold-pairs"))


@pytest.fixture(scope="session")
def ref_pairs_dir(
    gold_pairs_dir: Path, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The gold pairs with the random tiny model's reference log-probs (max_length 512). Copy before changing."""
    import shutil

    from mpo.ref_logps import compute_reference_logps

    out = tmp_path_factory.mktemp("ref-pairs") / "pairs"
    shutil.copytree(gold_pairs_dir, out)
    compute_reference_logps(out, tiny_model_dir, max_length=512)
    return out


@pytest.fixture(scope="session")
def prefect_api():
    """One Prefect test harness (temporary database and API server) for the whole session.

    Its start was measured at 18-24 s on 2 cores: the default timeout is raised to 120 s.
    """
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
