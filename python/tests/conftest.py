"""Shared helpers of the Python package's tests.

The tests that compare with the `tpo` tool need its binary: $TPO_TOOL, or build/release/tools/tpo/tpo
(scripts/test builds it first). Where neither exists they are skipped, unless TPO_TOOL names a
missing file, which is an error.
"""

import json
import os
import pathlib
import subprocess

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _tool_path():
    named = os.environ.get("TPO_TOOL")
    if named:
        if not os.access(named, os.X_OK):
            raise RuntimeError(f"TPO_TOOL={named} is not an executable file")
        return named
    default = ROOT / "build" / "release" / "tools" / "tpo" / "tpo"
    return str(default) if os.access(default, os.X_OK) else None


@pytest.fixture(scope="session")
def tool():
    path = _tool_path()
    if path is None:
        pytest.skip("the tpo tool is not built (build/release/tools/tpo/tpo; set TPO_TOOL to its path)")

    def run(*args, check=True):
        done = subprocess.run([path, *map(str, args)], capture_output=True, text=True)
        if check and done.returncode != 0:
            raise AssertionError(f"tpo {' '.join(map(str, args))} exited {done.returncode}: {done.stderr}")
        return done

    run.path = path
    run.json = lambda *args: json.loads(run(*args).stdout)
    return run


def make_batch(rng, pairs=3, lengths=(6, 5), vocab=11, dtype=np.float64, noisy=True, masked=True, scale=2.0):
    """A random preference batch: logits (P, L, V) per role, labels (P, L) with a masked prompt."""
    batch = {}
    for side, length in zip(("chosen", "rejected"), lengths):
        roles = ["policy", "reference"] + (["policy_noisy", "reference_noisy"] if noisy else [])
        for role in roles:
            name = role.replace("_noisy", f"_{side}_noisy") if "noisy" in role else f"{role}_{side}"
            batch[name] = (scale * rng.standard_normal((pairs, length, vocab))).astype(dtype)
        labels = rng.integers(0, vocab, (pairs, length)).astype(np.int64)
        if masked:
            labels[:, :2] = -100  # the prompt
            labels[0, -1] = -100  # padding
        batch[f"labels_{side}"] = labels
    return batch


def save_batch(directory, batch):
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, array in batch.items():
        np.save(directory / f"{name}.npy", array)
    return directory


def forward_args(batch):
    """Keyword arguments of Objective.forward for a batch made by make_batch."""
    return dict(batch)
