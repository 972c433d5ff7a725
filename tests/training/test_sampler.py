from megatron_ivr.training.sampler import EpochSampler


def test_each_epoch_draws_every_sample_once_in_a_seeded_order():
    sampler = EpochSampler(10, seed=3)
    first = sampler.draw(4) + sampler.draw(6)
    assert sorted(first) == list(range(10))
    second = sampler.draw(10)
    assert sorted(second) == list(range(10)) and second != first and sampler.epoch == 1
    assert EpochSampler(10, seed=3).draw(10) == first
    assert EpochSampler(10, seed=4).draw(10) != first


def test_a_draw_crosses_the_epoch_boundary():
    sampler = EpochSampler(5, seed=0)
    sampler.draw(3)
    batch = sampler.draw(4)  # 2 from epoch 0, 2 from epoch 1
    assert sampler.epoch == 1 and sampler.position == 2
    assert len(batch) == 4


def test_state_dict_resumes_the_same_order():
    whole = EpochSampler(7, seed=1)
    expected = [whole.draw(3) for _ in range(6)]
    part = EpochSampler(7, seed=1)
    got = [part.draw(3) for _ in range(2)]
    resumed = EpochSampler(7, seed=1)
    resumed.load_state_dict(part.state_dict())
    got += [resumed.draw(3) for _ in range(4)]
    assert got == expected


def test_state_of_another_dataset_is_refused():
    import pytest

    with pytest.raises(ValueError, match="8 samples"):
        EpochSampler(7, seed=1).load_state_dict(EpochSampler(8, seed=1).state_dict())
