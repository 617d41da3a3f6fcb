"""KDWeightSchedule: values of each schedule type against the formulas, and option errors."""
import math

import pytest

from dtkd_model.kd_schedule import KDWeightSchedule


def test_default_is_the_papers_linear_ramp():
    # Paper, Section 3.5: lambda(0) = 0, lambda(t) = t / T * lambda_KD for 1 <= t <= T.
    schedule = KDWeightSchedule.from_options(None, final_weight=2.0, total_iter=1000)
    assert schedule(0) == 0.0
    assert schedule(1) == pytest.approx(2.0 / 1000)
    assert schedule(250) == pytest.approx(0.5)
    assert schedule(500) == pytest.approx(1.0)
    assert schedule(1000) == 2.0
    assert schedule(1500) == 2.0
    assert KDWeightSchedule.from_options({}, 2.0, 1000)(500) == pytest.approx(1.0)


def test_linear_with_offsets():
    schedule = KDWeightSchedule.from_options({'type': 'linear', 'start_iter': 100, 'end_iter': 300}, 1.0, 1000)
    assert schedule(0) == 0.0
    assert schedule(99) == 0.0
    assert schedule(100) == 0.0
    assert schedule(150) == pytest.approx(0.25)
    assert schedule(200) == pytest.approx(0.5)
    assert schedule(300) == 1.0
    assert schedule(999) == 1.0
    # end_iter defaults to total_iter.
    ramp = KDWeightSchedule.from_options({'start_iter': 200}, 3.0, 1200)
    assert ramp(700) == pytest.approx(1.5)
    assert ramp(1200) == 3.0


def test_constant():
    schedule = KDWeightSchedule.from_options({'type': 'constant'}, 0.5, 1000)
    assert [schedule(t) for t in (0, 1, 500, 1000, 5000)] == [0.5] * 5
    delayed = KDWeightSchedule.from_options({'type': 'constant', 'start_iter': 10}, 0.5, 1000)
    assert delayed(9) == 0.0 and delayed(10) == 0.5 and delayed(2000) == 0.5


def test_cosine():
    schedule = KDWeightSchedule.from_options({'type': 'cosine', 'start_iter': 100, 'end_iter': 500}, 2.0, 1000)
    assert schedule(50) == 0.0
    assert schedule(100) == pytest.approx(0.0, abs=1e-15)
    assert schedule(200) == pytest.approx(2.0 * (1 - math.cos(math.pi * 0.25)) / 2)
    assert schedule(300) == pytest.approx(1.0)
    assert schedule(500) == 2.0
    assert schedule(800) == 2.0
    values = [schedule(t) for t in range(100, 501, 25)]
    assert all(a <= b for a, b in zip(values, values[1:]))


def test_zero_final_weight_and_repr():
    schedule = KDWeightSchedule.from_options(None, 0, 10)
    assert schedule(5) == 0.0 and isinstance(schedule(5), float)
    assert 'linear' in repr(schedule)


@pytest.mark.parametrize('block,message', [
    ({'type': 'foo'}, "train.kd_schedule.type: expected one of linear, constant, cosine, got 'foo'"),
    ({'start_iter': -1}, 'train.kd_schedule.start_iter'),
    ({'start_iter': 1.5}, 'train.kd_schedule.start_iter'),
    ({'end_iter': -5}, 'train.kd_schedule.end_iter'),
    ({'start_iter': 300, 'end_iter': 300}, 'train.kd_schedule.end_iter'),
    ({'start_iter': 400, 'end_iter': 300}, 'train.kd_schedule.end_iter'),
    ({'start_iter': 2000}, 'train.kd_schedule.end_iter'),
    ({'typ': 'linear'}, 'train.kd_schedule: unknown key'),
    ([1, 2], 'train.kd_schedule: expected a mapping'),
])
def test_option_errors(block, message):
    with pytest.raises(ValueError) as info:
        KDWeightSchedule.from_options(block, 1.0, 1000)
    assert message in str(info.value)


def test_other_errors():
    with pytest.raises(ValueError, match='train.total_iter'):
        KDWeightSchedule.from_options(None, 1.0, 0)
    with pytest.raises(ValueError, match='final_weight'):
        KDWeightSchedule.from_options(None, -1.0, 100)
    with pytest.raises(ValueError, match='current_iter'):
        KDWeightSchedule.from_options(None, 1.0, 100)(-1)
