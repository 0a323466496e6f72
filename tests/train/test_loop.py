"""training: the learning-rate schedule, warm-up and decay, plateau included."""

from __future__ import annotations

import math

import pytest

from pcam_pipeline.train.loop import Plateau, learning_rate, lr_factor
from tests.tiny_pipeline import small_run_params

STEPS = 10  # steps per epoch


def train_params(**train):
    return small_run_params(train={"epochs": 4, "warmup_epochs": 1, **train}).train


def test_warmup_rises_linearly_then_cosine_falls_to_zero():
    params = train_params(schedule="cosine")
    assert [lr_factor(params, step, STEPS) for step in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert lr_factor(params, 10, STEPS) == 1.0, "the cosine starts where the warm-up ends"
    assert lr_factor(params, 25, STEPS) == pytest.approx(0.5)
    assert lr_factor(params, 40, STEPS) == pytest.approx(0.0)


def test_step_schedule_decays_by_gamma_every_step_size_epochs():
    params = train_params(schedule="step", step_size=2, gamma=0.5)
    factors = [lr_factor(params, epoch * STEPS + STEPS // 2, STEPS) for epoch in range(1, 5)]
    assert factors == [1.0, 1.0, 0.5, 0.5]


def after(params, plateau: Plateau, losses: list[float]) -> list[Plateau]:
    """The plateau state after each epoch of `losses` (val_loss), starting from `plateau`."""
    states = []
    for epoch, loss in enumerate(losses):
        plateau = plateau.after_epoch(params, loss, losses[:epoch])
        states.append(plateau)
    return states


def test_plateau_with_patience_2_waits_for_two_bad_epochs_in_a_row():
    params = train_params(schedule="plateau", gamma=0.5, plateau_patience=2)
    # best, bad, best (the count starts again), bad, bad (decay), bad, bad (decay)
    states = after(params, Plateau(), [0.5, 0.6, 0.4, 0.45, 0.4, 0.7, 0.8])
    assert [state.bad_epochs for state in states] == [0, 1, 0, 1, 0, 1, 0]
    assert [state.scale for state in states] == [1, 1, 1, 1, 0.5, 0.5, 0.25]


def test_plateau_with_patience_1_decays_after_every_bad_epoch():
    params = train_params(schedule="plateau", gamma=0.5, plateau_patience=1)
    states = after(params, Plateau(), [0.5, 0.6, 0.4, 0.4])  # equal to the best is not better
    assert [state.scale for state in states] == [1, 0.5, 0.5, 0.25]
    assert {state.bad_epochs for state in states} == {0}


def test_nan_never_counts_against_the_plateau_and_other_schedules_never_decay():
    plateau = train_params(schedule="plateau", plateau_patience=1)
    assert after(plateau, Plateau(), [0.5, math.nan])[-1] == Plateau()
    cosine = train_params(schedule="cosine", plateau_patience=1)
    assert after(cosine, Plateau(), [0.5, 0.6, 0.7]) == [Plateau()] * 3


def test_the_learning_rate_is_the_schedule_times_the_plateau_decay():
    params = train_params(schedule="plateau", lr=0.002)
    assert learning_rate(params, 25, STEPS, Plateau(0.25, 1)) == 0.002 * 1.0 * 0.25
    assert learning_rate(params, 4, STEPS, Plateau()) == 0.002 * 0.5, "warm-up still applies"
