"""The experience crosses ranks as tensors (training/experience.py ``broadcast_experience``):
every rank gets the same token ids, engine log-probs and scalars, the first pipeline stage the
images' exact pixels, later stages blanks of the same size, and nothing else is pickled but a
small header."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from megatron_ivr.model_providers.parallel import free_port


def _experience():
    from megatron_ivr.training.experience import Experience, Trajectory

    generator = torch.Generator().manual_seed(0)
    images = [Image.fromarray(torch.randint(0, 256, (28, 56, 3), generator=generator, dtype=torch.uint8).numpy()),
              Image.fromarray(torch.randint(0, 256, (56, 28, 3), generator=generator, dtype=torch.uint8).numpy())]
    gray = Image.fromarray(torch.randint(0, 256, (28, 28), generator=generator, dtype=torch.uint8).numpy())
    trajectories = [
        Trajectory("a", 0, "how many?", images, [5, 6, 7], [-0.1, -0.2, -1 / 3], 1.0, 1.0, 1.0, 0.7071, False,
                   "stop", 2, [2, 3, 3]),  # a partial rollout: a push after its first token
        Trajectory("a", 0, "how many?", images, [8], [-2.5], 0.0, 0.0, 1.0, -0.7071, True, "length", 3, [3]),
        Trajectory("b", 1, "what color?", [gray], [9, 10], [-0.01, -1e-9], 0.5, 0.0, 1.0, 0.0, False, "stop", 2,
                   [2, 2]),
    ]
    return Experience(trajectories, ["a", "b"], {"reward/mean": 0.5, "rollout/responses": 3})


def _worker(rank: int, world: int, port: int, pp: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from megatron.core import parallel_state as ps

    from megatron_ivr.config.schema import ParallelismConfig
    from megatron_ivr.model_providers.parallel import destroy_parallel, init_parallel
    from megatron_ivr.training.experience import broadcast_experience

    init_parallel(ParallelismConfig(pipeline_parallel=pp))
    try:
        got = broadcast_experience(_experience() if rank == 0 else None)
        record = {"first_stage": ps.is_pipeline_first_stage(), "sample_ids": got.sample_ids, "metrics": got.metrics,
                  "trajectories": [{**{k: v for k, v in t.__dict__.items() if k != "images"},
                                    "images": [(im.mode, im.size, im.tobytes().hex()) for im in t.images]}
                                   for t in got.trajectories]}
        with open(f"{out}/rank{rank}.json", "w") as fh:
            json.dump(record, fh)
    finally:
        destroy_parallel()


@pytest.mark.parametrize("pp", [1, 2])
def test_every_rank_gets_the_experience_and_the_first_stage_the_pixels(tmp_path, pp):
    mp.start_processes(_worker, args=(2, free_port(), pp, str(tmp_path)), nprocs=2, start_method="spawn")
    sent, got = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert got["sample_ids"] == sent["sample_ids"] and got["metrics"] == sent["metrics"]
    for a, b in zip(sent["trajectories"], got["trajectories"], strict=True):
        images_a, images_b = a.pop("images"), b.pop("images")
        assert a == b  # token ids, log-probs and every scalar, exactly
        assert [(mode, size) for mode, size, _ in images_a] == [(mode, size) for mode, size, _ in images_b]
        if got["first_stage"]:  # data parallel: the same pixels
            assert [p for *_, p in images_a] == [p for *_, p in images_b]
        else:  # a later pipeline stage runs no vision tower: blanks of the same size
            assert all(set(bytes.fromhex(p)) == {0} for *_, p in images_b)
    assert got["first_stage"] == (pp == 1)
