import json
import random

import numpy as np
import pytest
import torch

from megatron_ivr.model_providers.checkpoint import (
    COMPLETE,
    Checkpointer,
    complete_checkpoints,
    rng_state,
    set_rng_state,
)
from megatron_ivr.model_providers.manifest import CheckpointRefused, content_problem, write_manifest


def _fake(root, step, complete=True):
    folder = root / f"step_{step:08d}"
    (folder / "dist").mkdir(parents=True)
    (folder / "dist" / "shard.distcp").write_bytes(b"x" * 100)
    (folder / "trainer_state.json").write_text("{}")
    if complete:
        write_manifest(folder, step=step)
    return folder


def test_manifest_lists_size_and_content_hash(tmp_path):
    folder = _fake(tmp_path, 1)
    files = json.loads((folder / COMPLETE).read_text())["files"]
    assert files["dist/shard.distcp"]["size"] == 100
    assert files["dist/shard.distcp"]["sha256"] == "09ecb6ebc8bcefc733f6f2ec44f791abeed6a99edf0cc31519637898aebd52d8"
    assert content_problem(folder) is None
    (folder / "dist" / "shard.distcp").write_bytes(b"y" + b"x" * 99)  # same size, other bytes
    assert "content differs" in content_problem(folder)
    (folder / "dist" / "shard.distcp").write_bytes(b"x" * 100)
    (folder / "dist" / ".metadata").write_bytes(b"planted")  # a file the save did not write
    assert "not in the manifest" in content_problem(folder)


def test_resume_falls_back_past_a_same_size_corruption_and_refuses_when_none_passes(tmp_path):
    from megatron_ivr.config.schema import ParallelismConfig
    from megatron_ivr.model_providers.parallel import destroy_parallel, init_parallel

    for step in (1, 2):
        _fake(tmp_path, step)
    shard = tmp_path / "step_00000002" / "dist" / "shard.distcp"
    shard.write_bytes(b"z" * 100)  # damaged without a change of size: listed, but not loadable
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [1, 2]
    init_parallel(ParallelismConfig())
    try:
        told = []
        assert Checkpointer(tmp_path).newest_verified(told.append) == (1, tmp_path / "step_00000001")
        assert len(told) == 1 and "step_00000002" in told[0] and "content differs" in told[0]
        (tmp_path / "step_00000001" / "trainer_state.json").write_text("[]")
        with pytest.raises(CheckpointRefused, match="no checkpoint passes its manifest"):
            Checkpointer(tmp_path).newest_verified(told.append)
        assert Checkpointer(tmp_path / "none").newest_verified() is None
    finally:
        destroy_parallel()


def test_only_complete_and_undamaged_checkpoints_count(tmp_path):
    _fake(tmp_path, 1)
    _fake(tmp_path, 2)
    _fake(tmp_path, 3, complete=False)  # crashed mid-save
    (tmp_path / "step_00000004.tmp").mkdir()
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [1, 2]
    shard = tmp_path / "step_00000002" / "dist" / "shard.distcp"
    shard.write_bytes(b"x" * 10)  # truncated
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [1]
    (tmp_path / "step_00000001" / "dist" / "shard.distcp").unlink()
    assert complete_checkpoints(tmp_path) == []


def test_rng_states_round_trip_through_json():
    torch.manual_seed(1), random.seed(2), np.random.seed(3)
    saved = json.loads(json.dumps(rng_state()))
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(9), random.seed(9), np.random.seed(9)
    set_rng_state(saved)
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1] and np.random.rand() == expected[2]


def test_model_parallel_rng_streams_round_trip():
    """megatron's tracker streams (dropout and init inside tensor-parallel regions draw from
    them) are saved with the other RNG states and restored: a resumed run draws the same."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    from megatron_ivr.config.schema import ParallelismConfig
    from megatron_ivr.model_providers.parallel import destroy_parallel, init_parallel

    init_parallel(ParallelismConfig(), seed=5)
    try:
        with get_cuda_rng_tracker().fork():
            torch.rand(4)  # move the stream off its seed
        saved = json.loads(json.dumps(rng_state()))
        assert saved["model_parallel"]
        with get_cuda_rng_tracker().fork():
            expected = torch.rand(4)
        with get_cuda_rng_tracker().fork():
            torch.rand(4)  # the stream moves on
        set_rng_state(saved)
        with get_cuda_rng_tracker().fork():
            assert torch.equal(torch.rand(4), expected)
    finally:
        destroy_parallel()
