"""Shared fixtures: checkpoints written by the reference oracle (tests/oracle.py)."""

from __future__ import annotations

import oracle
import pytest


@pytest.fixture(scope="session")
def ref_checkpoint(tmp_path_factory):
    """Factory: (variant, image_size) -> (reference model, path of its official-format checkpoint)."""
    made = {}

    def make(variant: str, image_size: int):
        key = (variant, image_size)
        if key not in made:
            ref = oracle.reference_model(variant, image_size)
            path = tmp_path_factory.mktemp("ckpt") / f"{variant}_{image_size}.pt"
            made[key] = (ref, oracle.save_checkpoint(ref, path))
        return made[key]

    return make
