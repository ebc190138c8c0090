"""Bradley-Terry loss with fixed or adaptive temperature; a pure function of the scores."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from critic.config import LossConfig


def bt_temperature(score_diff: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """Fixed T, or T = clamp(t_a + t_b * |mean(s_t - s_s)|, t_min, t_max) on the detached batch difference."""
    if not cfg.adaptive_temperature:
        return torch.tensor(cfg.temperature, device=score_diff.device)
    spread = score_diff.detach().mean().abs()
    return (cfg.t_a + cfg.t_b * spread).clamp(cfg.t_min, cfg.t_max)


def bradley_terry_loss(teacher_scores: torch.Tensor, student_scores: torch.Tensor, cfg: LossConfig,
                       temperature: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of -logsigmoid((s_t - s_s - margin) / T) + center_coef * mean((s_t + s_s)^2); returns (loss, T).

    `temperature` overrides T: a micro-batch scored in several forwards passes the T of the whole micro-batch.
    """
    diff = teacher_scores - student_scores  # (pairs,)
    temperature = bt_temperature(diff, cfg) if temperature is None else temperature
    loss = -F.logsigmoid((diff - cfg.margin) / temperature).mean()
    if cfg.center_coef > 0:
        loss = loss + cfg.center_coef * ((teacher_scores + student_scores) ** 2).mean()
    return loss, temperature
