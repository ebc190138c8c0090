"""Bradley-Terry loss and its adaptive temperature against the formula worked by hand."""

from __future__ import annotations

import math

import pytest
import torch

from critic.config import LossConfig
from critic.loss import bradley_terry_loss, bt_temperature


def neg_log_sigmoid(x: float) -> float:
    return math.log1p(math.exp(-x))


def test_fixed_temperature_and_margin():
    teacher, student = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])  # differences +1, -1
    loss, temperature = bradley_terry_loss(teacher, student, LossConfig(temperature=2.0, margin=0.5))
    # ((1 - 0.5) / 2, (-1 - 0.5) / 2) = (0.25, -0.75)
    assert temperature.item() == 2.0
    assert loss.item() == pytest.approx((neg_log_sigmoid(0.25) + neg_log_sigmoid(-0.75)) / 2, rel=1e-6)


def test_default_loss_is_minus_log_sigmoid_of_the_difference():
    loss, temperature = bradley_terry_loss(torch.tensor([3.0]), torch.tensor([1.0]), LossConfig())
    assert temperature.item() == 1.0
    assert loss.item() == pytest.approx(neg_log_sigmoid(2.0), rel=1e-6)


def test_center_coef_adds_the_mean_squared_score_sum():
    teacher, student = torch.tensor([1.0, 2.0]), torch.tensor([0.5, -3.0])  # differences 0.5, 5; sums 1.5, -1
    loss, _ = bradley_terry_loss(teacher, student, LossConfig(center_coef=0.1))
    bt = (neg_log_sigmoid(0.5) + neg_log_sigmoid(5.0)) / 2
    assert loss.item() == pytest.approx(bt + 0.1 * (1.5**2 + 1.0**2) / 2, rel=1e-6)


@pytest.mark.parametrize("differences, expected_temperature", [
    ([1.0, 3.0], 0.5 + 0.5 * 2.0),      # mean 2 -> 1.5, inside [0.3, 2.0]
    ([-1.0, -3.0], 0.5 + 0.5 * 2.0),    # |mean| = 2 -> 1.5
    ([4.0, 6.0], 2.0),                  # 0.5 + 0.5 * 5 = 3.0 -> clamped to t_max
    ([3.0, -3.0], 0.5),                 # mean 0 -> t_a: the absolute value is taken of the mean, not per pair
])
def test_adaptive_temperature(differences, expected_temperature):
    cfg = LossConfig(adaptive_temperature=True, t_a=0.5, t_b=0.5, t_min=0.3, t_max=2.0)
    teacher = torch.tensor(differences)
    student = torch.zeros(len(differences))
    assert bt_temperature(teacher - student, cfg).item() == pytest.approx(expected_temperature)
    loss, temperature = bradley_terry_loss(teacher, student, cfg)
    assert temperature.item() == pytest.approx(expected_temperature)
    expected = sum(neg_log_sigmoid(d / expected_temperature) for d in differences) / len(differences)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_adaptive_temperature_clamps_at_t_min():
    cfg = LossConfig(adaptive_temperature=True, t_a=0.1, t_b=0.1, t_min=0.3, t_max=2.0)
    temperature = bt_temperature(torch.tensor([0.5, 0.5]), cfg)  # 0.1 + 0.05 = 0.15 -> 0.3
    assert temperature.item() == pytest.approx(0.3)


def test_fixed_temperature_ignores_the_adaptive_bounds():
    cfg = LossConfig(temperature=5.0, adaptive_temperature=False, t_min=0.3, t_max=2.0)
    assert bt_temperature(torch.tensor([10.0]), cfg).item() == 5.0


def test_adaptive_temperature_is_a_constant_for_the_gradient():
    # With T detached, d loss / d s_t = -(1 - sigmoid(d / T)) / (T * n) for each pair.
    cfg = LossConfig(adaptive_temperature=True, t_a=0.5, t_b=0.5, t_min=0.3, t_max=2.0)
    teacher = torch.tensor([2.0, 0.0], requires_grad=True)
    student = torch.tensor([0.0, 1.0], requires_grad=True)
    loss, temperature = bradley_terry_loss(teacher, student, cfg)
    loss.backward()
    t = 0.5 + 0.5 * abs((2.0 - 1.0) / 2)  # mean difference 0.5 -> T = 0.75
    assert temperature.item() == pytest.approx(t)
    expected = [-(1 - 1 / (1 + math.exp(-d / t))) / (t * 2) for d in (2.0, -1.0)]
    assert teacher.grad.tolist() == pytest.approx(expected, rel=1e-5)
    assert student.grad.tolist() == pytest.approx([-g for g in expected], rel=1e-5)
