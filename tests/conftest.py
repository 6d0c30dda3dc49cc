"""Shared pytest fixtures.

Base model: a random-weight miniature of SD1.5 (see ``lorasynth.worlds.tiny_sd``), built once per test
session (under 5 s) and loaded fresh for each test that asks for ``tiny_pipeline`` (about
0.2 s), so tests may change the pipeline (LoRAs, scheduler, dtype) without restoring it.
"""

from __future__ import annotations

import os

import pytest


def pytest_configure(config):
    """One torch thread per test process (``make test`` runs ``-n 2`` on 2 cores).

    Two workers with two threads each oversubscribe the cores and torch's threads spin-wait on
    each other: measured 3x slower on the tiny pipeline tests (and 10x+ when anything else runs).
    One thread also makes results independent of how the suite is run. OMP_NUM_THREADS, if set, wins.
    """
    if "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """Path of a saved tiny SD1.5-architecture diffusers pipeline (random weights, seed 0)."""
    from lorasynth.worlds.tiny_sd import build_sd_pipeline

    return build_sd_pipeline(tmp_path_factory.mktemp("tiny_sd"), "tiny")


@pytest.fixture
def tiny_pipeline(tiny_pipeline_dir):
    """A fresh fp32 ``StableDiffusionPipeline`` loaded from ``tiny_pipeline_dir`` via ``load_pipeline``."""
    from lorasynth.runtime.pipeline import load_pipeline

    return load_pipeline(str(tiny_pipeline_dir), dtype="fp32")
