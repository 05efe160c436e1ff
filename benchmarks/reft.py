"""ReFT (Luong et al., "ReFT: Reasoning with Reinforced Fine-Tuning", ACL 2024), the PPO stage,
written plainly as the cost baseline of bench_train_step.

Why not a library: the installed TRL (1.x) has dropped ``PPOTrainer``, the value-head model
classes and the PPO helpers (GAE, whitening, clipped losses) that earlier TRL versions had;
what is left (``trl.experimental.utils.create_reference_model``) is a ``deepcopy`` with frozen
parameters, which ``train_methods.build_step`` does itself.

One step = one batch of questions through ReFT's PPO iteration:

1. sample one chain of thought per question from the policy (temperature 1);
2. reward from the final answer (1 correct, 0.1 wrong but extractable, 0 none), placed on
   the last response token;
3. without gradient: the old policy's log-probs and values, the frozen reference model's
   log-probs; per-token reward ``-kl_coef * (log p_old - log p_ref)``;
4. GAE (gamma, lam) gives advantages and returns;
5. ``ppo_epochs`` passes over the batch, each one forward+backward with the clipped policy loss
   plus ``vf_coef`` times the clipped value loss, and one optimizer step.

Every hyperparameter below is ReFT's, as given in the project's spec (docs/nlft-spec.md,
"ReFT, the baseline to benchmark against"), which takes them from the ReFT paper.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from nlft_kernels.judge import answers_equal, extract_answer, parse_number


@dataclass(frozen=True)
class ReFTConfig:
    """ReFT's PPO settings (source of each: the ReFT paper, as quoted in the spec).

    temperature: sampling temperature of the chain of thought (1.0).
    max_length: prompt + response tokens at most (700); the benchmark's lengths stay below it.
    reward_correct / reward_wrong / reward_none: reward of a correct, a wrong but extractable,
      and an unextractable final answer (1, 0.1, 0).
    kl_coef: per-token KL penalty against the frozen reference model (beta = 0.05).
    vf_coef: weight of the value loss (5).
    cliprange_value: value clipping around the old values (0.2).
    cliprange: PPO policy ratio clipping (0.2).
    gamma, lam: GAE discount and lambda (1.0, 0.95).
    ppo_epochs: PPO passes (optimizer steps) per batch (2).
    """

    temperature: float = 1.0
    max_length: int = 700
    reward_correct: float = 1.0
    reward_wrong: float = 0.1
    reward_none: float = 0.0
    kl_coef: float = 0.05
    vf_coef: float = 5.0
    cliprange_value: float = 0.2
    cliprange: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    ppo_epochs: int = 2


class ValueHead(nn.Module):
    """The critic: a linear map of the policy's last hidden state to a scalar value per token."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.summary(hidden).squeeze(-1).float()


def final_answer_reward(text: str, reference: str, config: ReFTConfig = ReFTConfig()) -> float:
    """ReFT's reward: ``reward_correct`` for the right final answer, ``reward_wrong`` for a wrong
    but extractable one, ``reward_none`` when no answer can be extracted (by the package's
    GSM8K judge, ``nlft_kernels.judge.extract_answer``)."""
    predicted = extract_answer(text)
    if predicted is None:
        return config.reward_none
    return config.reward_correct if answers_equal(predicted, parse_number(reference)) else config.reward_wrong


def kl_penalised_rewards(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Per-token rewards [B, R]: ``-kl_coef * (logprobs - ref_logprobs)`` on every response token,
    plus the sample's score on its last token (``mask`` [B, R] marks response tokens)."""
    rewards = -kl_coef * (logprobs - ref_logprobs) * mask
    last = (mask.long().cumsum(1) == mask.long().sum(1, keepdim=True)) & mask.bool()
    return rewards + last * scores[:, None]


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over [B, R] tokens; the value after the last token is 0.

    delta_t = r_t + gamma V_{t+1} - V_t; A_t = delta_t + gamma lam A_{t+1}; returns = A + V.
    """
    values = values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, advantages + values


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def ppo_losses(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
    cliprange_value: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(policy loss, value loss), token means over ``mask``.

    policy: max(-A ratio, -A clip(ratio, 1 - c, 1 + c)), ratio = exp(logprobs - old_logprobs);
    value: 0.5 max((V - G)^2, (V_clip - G)^2), V_clip = V_old + clip(V - V_old, -c_v, c_v).
    """
    ratio = torch.exp(logprobs - old_logprobs)
    policy = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - cliprange, 1 + cliprange))
    clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    value = 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    return _masked_mean(policy, mask), _masked_mean(value, mask)


def response_logprobs(
    model: nn.Module, sequences: torch.Tensor, prompt_len: int, value_head: ValueHead | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Float32 log-probs [B, R] of the response tokens of ``sequences`` [B, P + R] (log_softmax over
    the vocabulary, as PPO implementations do) and, with ``value_head``, the values [B, R] of
    the states before each response token."""
    out = model(input_ids=sequences, output_hidden_states=value_head is not None)
    logits = out.logits[:, prompt_len - 1 : -1]
    logprobs = torch.log_softmax(logits.float(), dim=-1).gather(-1, sequences[:, prompt_len:, None]).squeeze(-1)
    values = None if value_head is None else value_head(out.hidden_states[-1][:, prompt_len - 1 : -1])
    return logprobs, values


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ReFTTrainer:
    """ReFT's PPO stage on one batch of prompts per :meth:`step`."""

    def __init__(
        self,
        policy: nn.Module,
        value_head: ValueHead,
        reference: nn.Module,
        optimizer: torch.optim.Optimizer,
        decode: Callable[[list[int]], str],
        config: ReFTConfig = ReFTConfig(),
    ) -> None:
        self.policy, self.value_head, self.reference = policy, value_head, reference
        self.optimizer, self.decode, self.config = optimizer, decode, config

    def sample(self, prompt_ids: torch.Tensor, response_tokens: int) -> torch.Tensor:
        """[B, P + R] sequences: exactly ``response_tokens`` sampled tokens per prompt (the
        benchmark fixes the length so every method trains on as many tokens)."""
        if prompt_ids.shape[1] + response_tokens > self.config.max_length:
            raise ValueError(f"prompt + response = {prompt_ids.shape[1] + response_tokens} > ReFT's max_length")
        return self.policy.generate(
            input_ids=prompt_ids,
            attention_mask=torch.ones_like(prompt_ids),
            do_sample=True,
            temperature=self.config.temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=response_tokens,
            min_new_tokens=response_tokens,
            pad_token_id=0,
        )

    def step(self, prompt_ids: torch.Tensor, answers: list[str], response_tokens: int) -> dict[str, float]:
        """One PPO iteration; returns the last epoch's losses, the mean score and the sampling time."""
        cfg, device, prompt_len = self.config, prompt_ids.device, prompt_ids.shape[1]
        _sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            sequences = self.sample(prompt_ids, response_tokens)
        _sync(device)
        sampling_ms = (time.perf_counter() - start) * 1e3
        responses = sequences[:, prompt_len:]
        mask = torch.ones(responses.shape, dtype=torch.float32, device=device)
        scores = torch.tensor(
            [final_answer_reward(self.decode(r.tolist()), a, cfg) for r, a in zip(responses, answers, strict=True)],
            device=device,
        )
        with torch.no_grad():
            old_logprobs, old_values = response_logprobs(self.policy, sequences, prompt_len, self.value_head)
            ref_logprobs, _ = response_logprobs(self.reference, sequences, prompt_len)
            rewards = kl_penalised_rewards(old_logprobs, ref_logprobs, scores, mask, cfg.kl_coef)
            advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
        for _ in range(cfg.ppo_epochs):
            self.optimizer.zero_grad(set_to_none=True)
            logprobs, values = response_logprobs(self.policy, sequences, prompt_len, self.value_head)
            policy_loss, value_loss = ppo_losses(
                logprobs,
                old_logprobs,
                advantages,
                values,
                old_values,
                returns,
                mask,
                cfg.cliprange,
                cfg.cliprange_value,
            )
            loss = policy_loss + cfg.vf_coef * value_loss
            loss.backward()
            self.optimizer.step()
        return {
            "loss": loss.item(),
            "policy_loss": policy_loss.item(),
            "value_loss": value_loss.item(),
            "mean_score": scores.mean().item(),
            "sampling_ms": sampling_ms,
        }
