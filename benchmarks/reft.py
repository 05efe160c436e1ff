"""ReFT (Luong et al., "ReFT: Reasoning with Reinforced Fine-Tuning", ACL 2024), the PPO stage,
written plainly as the cost baseline of bench_train_step.

Why not a library: the installed TRL (1.x) has dropped ``PPOTrainer``, the value-head model
classes and the PPO helpers (GAE, whitening, clipped losses) that earlier TRL versions had;
what is left (``trl.experimental.utils.create_reference_model``) is a ``deepcopy`` with frozen
parameters, which ``train_methods.build_step`` does itself.

One step = one batch of questions through ReFT's PPO iteration, as ``train_rl_reft.py``
(``rollout`` and ``train_one_epoch``) runs it:

1. sample one chain of thought per question from the policy: ReFT's prompt
   (``Question:\n{q}\nAnswer reasoning:\n``, natural length, left-padded), temperature 1, top-k
   0, top-p 1, stopping at EOS or at ``max_length`` tokens prompt included (``generate(...,
   max_length=max_gen_length)``, 700);
2. reward from the final answer (1 correct, 0.1 wrong but extractable, 0 none), placed on
   the last response token (the EOS, or the last one when the cap cut the response);
3. without gradient: the old policy's log-probs and values, the frozen reference model's
   log-probs; per-token reward ``-kl_coef * (log p_old - log p_ref)``;
4. GAE (gamma, lam) gives advantages and returns; the advantages are whitened over the whole
   batch (``adv_whitening='global'``: masked mean 0, unbiased masked variance 1);
5. ``ppo_epochs`` passes over the batch in mini-batches of ``mini_batch_size``, each one
   forward+backward with the clipped policy loss plus ``vf_coef`` times the clipped value loss
   (per-sample token means, then the batch mean), the gradient norm of policy and value head
   clipped to ``clip_grad_norm``, and one optimizer step.

Every hyperparameter is ReFT's (``REFT_SOURCES`` names the file and line of each): the shell
configuration ``exps/paper_exps/ReFT/_template.sh`` and ``gsm8k.sh`` of lqtrung1998/mwp_ReFT,
and ``train_rl_reft.py`` for what the configuration does not set.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from nlft_kernels.recipes.rule_judge import answers_equal, extract_answer, parse_number

# ReFT's code at the commit read (lqtrung1998/mwp_ReFT, main): where each setting comes from.
REFT_REPOSITORY = "https://github.com/lqtrung1998/mwp_ReFT/tree/bdc844e02e5c783d4361d7777f4ad486e7e116da"
REFT_SOURCES = {
    "batch_size": "exps/paper_exps/ReFT/_template.sh: batch_size=4 per process, num_processes=8 (32 questions "
    "per PPO iteration over the 8 GPUs)",
    "mini_batch_size": "exps/paper_exps/ReFT/_template.sh: mini_batch_size=4 (= the per-process batch: one "
    "optimizer step per PPO epoch)",
    "ppo_epochs": "exps/paper_exps/ReFT/_template.sh: ppo_epochs=2",
    "kl_coef": "exps/paper_exps/ReFT/gsm8k.sh: kl_coef=0.05 for the natural-language (NL) chains of thought "
    "(0.01 for Python programs; _template.sh: 'For NL should put 0.05')",
    "vf_coef": "exps/paper_exps/ReFT/_template.sh: vf_coef=5",
    "gamma_lam": "exps/paper_exps/ReFT/_template.sh: gamma=1.0, lam=0.95",
    "clip_grad_norm": "exps/paper_exps/ReFT/_template.sh: clip_grad_norm=1 (default_config_deepspeed.yaml: "
    "gradient_clipping 1.0)",
    "adv_whitening": "exps/paper_exps/ReFT/_template.sh: adv_whitening='global'; train_rl_reft.py "
    "train_one_epoch: allgather_masked_whiten (src/utils.py) over every process's batch",
    "max_length": "exps/paper_exps/ReFT/_template.sh: max_gen_length=700, passed to generate() as max_length "
    "(prompt included); max_input_length=300 truncates the prompt",
    "sampling": "train_rl_reft.py rollout: do_sample=True, top_k=0, top_p=1.0 (temperature 1), "
    "eos_token_id=tokenizer.eos_token_id",
    "prompt": "train_rl_reft.py setup_cot: instruction 'Question:\\n', cot_trigger '\\nAnswer reasoning:\\n'",
    "reward": "train_rl_reft.py rollout: 1 correct, 0.1 extractable but wrong, 0 otherwise, on the last response token",
    "cliprange": "train_rl_reft.py train_one_epoch: ratio clamp 1 +- 0.2, value clip +- 0.2",
    "loss_mean": "train_rl_reft.py train_one_epoch: token sums / response length per sample, then the batch mean",
    "learning_rate": "exps/paper_exps/ReFT/_template.sh: learning_rate=3e-7 (the benchmark uses 1e-6 for "
    "every method; the rate changes no cost)",
}

# ReFT's prompt for GSM8K (train_rl_reft.py, setup_cot: instruction + question + cot_trigger).
REFT_PROMPT = "Question:\n{question}\nAnswer reasoning:\n"


@dataclass(frozen=True)
class ReFTConfig:
    """ReFT's PPO settings; ``REFT_SOURCES`` gives the line of ReFT's code each comes from.

    temperature: sampling temperature of the chain of thought (1.0).
    max_length: prompt + sampled tokens at most (ReFT's max_gen_length, 700); sampling stops
      earlier at the EOS token. A CPU preset may lower it (bench_train_step records it).
    max_input_length: ReFT's prompt truncation (300 tokens).
    reward_correct / reward_wrong / reward_none: reward of a correct, a wrong but extractable,
      and an unextractable final answer (1, 0.1, 0).
    kl_coef: per-token KL penalty against the frozen reference model (beta = 0.05, GSM8K NL).
    vf_coef: weight of the value loss (5).
    cliprange_value: value clipping around the old values (0.2).
    cliprange: PPO policy ratio clipping (0.2).
    gamma, lam: GAE discount and lambda (1.0, 0.95).
    ppo_epochs: PPO passes per batch (2).
    mini_batch_size: questions per optimizer step within an epoch (4, the per-process batch).
    clip_grad_norm: max global norm of the policy's and value head's gradient (1.0).
    adv_whitening: "global" (over the batch), "local" (over the mini-batch) or "none".
    """

    temperature: float = 1.0
    max_length: int = 700
    max_input_length: int = 300
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
    mini_batch_size: int = 4
    clip_grad_norm: float | None = 1.0
    adv_whitening: str = "global"

    def __post_init__(self) -> None:
        if self.adv_whitening not in ("global", "local", "none"):
            raise ValueError(f"adv_whitening must be global, local or none, got {self.adv_whitening!r}")


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
    GSM8K judge, ``nlft_kernels.recipes.rule_judge.extract_answer``)."""
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


def masked_whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(values - mean) / sqrt(var + 1e-8)`` with the mean and the unbiased variance over the
    entries ``mask`` marks: trl.core.masked_whiten as ReFT's ``allgather_masked_whiten``
    (src/utils.py) applies it to the advantages of the whole batch (``adv_whitening='global'``;
    one process here, so the gathered batch is this batch)."""
    mask = mask.to(values.dtype)
    mean = _masked_mean(values, mask)
    count = mask.sum()
    if count < 2:
        raise ValueError("whitening needs at least two response tokens")
    var = _masked_mean((values - mean) ** 2, mask) * count / (count - 1)
    return (values - mean) * torch.rsqrt(var + 1e-8)


def response_mask(responses: torch.Tensor, eos_token_id: int | None) -> torch.Tensor:
    """[B, R] float: 1 on every sampled token up to and including the first EOS (ReFT masks
    what ``generate`` pads after it), all ones when ``eos_token_id`` is None."""
    if eos_token_id is None:
        return torch.ones(responses.shape, dtype=torch.float32, device=responses.device)
    is_eos = (responses == eos_token_id).long()
    after_eos = (is_eos.cumsum(1) - is_eos) > 0
    return (~after_eos).float()


def sample_responses(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    eos_token_id: int | None,
    max_length: int,
    temperature: float = 1.0,
    pad_token_id: int = 0,
) -> torch.Tensor:
    """[B, P + R] sequences sampled as ReFT's rollout samples them: temperature ``temperature``,
    no top-k / top-p filtering, each row stopping at ``eos_token_id`` (rows that stop early are
    padded with ``pad_token_id`` up to the longest) and none longer than ``max_length`` tokens,
    the (left-padded) prompt included. The model is put in eval mode for sampling (as ReFT's
    ``rollout``) and its training flag restored."""
    if prompt_ids.shape[1] >= max_length:
        raise ValueError(f"the prompt ({prompt_ids.shape[1]} tokens) leaves no room below max_length={max_length}")
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model.generate(
                input_ids=prompt_ids,
                attention_mask=prompt_mask,
                do_sample=True,
                temperature=temperature,
                top_k=0,
                top_p=1.0,
                max_length=max_length,
                eos_token_id=eos_token_id,
                pad_token_id=pad_token_id,
            )
    finally:
        model.train(training)


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
    """(policy loss, value loss): per sample the mean over its response tokens (``mask``), then
    the mean over samples, as ReFT's ``train_one_epoch``.

    policy: max(-A ratio, -A clip(ratio, 1 - c, 1 + c)), ratio = exp(logprobs - old_logprobs);
    value: 0.5 max((V - G)^2, (V_clip - G)^2), V_clip = V_old + clip(V - V_old, -c_v, c_v).
    """
    ratio = torch.exp(logprobs - old_logprobs)
    policy = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - cliprange, 1 + cliprange))
    clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    value = 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    lengths = mask.sum(1).clamp(min=1)
    return ((policy * mask).sum(1) / lengths).mean(), ((value * mask).sum(1) / lengths).mean()


def response_logprobs(
    model: nn.Module,
    sequences: torch.Tensor,
    prompt_len: int,
    value_head: ValueHead | None = None,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Float32 log-probs [B, R] of the response tokens of ``sequences`` [B, P + R] (log_softmax over
    the vocabulary, as PPO implementations do) and, with ``value_head``, the values [B, R] of
    the states before each response token."""
    out = model(input_ids=sequences, attention_mask=attention_mask, output_hidden_states=value_head is not None)
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
        eos_token_id: int | None = None,
    ) -> None:
        self.policy, self.value_head, self.reference = policy, value_head, reference
        self.optimizer, self.decode, self.config = optimizer, decode, config
        self.eos_token_id = eos_token_id

    def sample(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, P + R] sequences, EOS-terminated and at most ``config.max_length`` long (ReFT's rollout)."""
        if prompt_mask is None:
            prompt_mask = torch.ones_like(prompt_ids)
        return sample_responses(
            self.policy, prompt_ids, prompt_mask, self.eos_token_id, self.config.max_length, self.config.temperature
        )

    def step(
        self,
        prompt_ids: torch.Tensor,
        answers: list[str],
        prompt_mask: torch.Tensor | None = None,
        sequences: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """One PPO iteration; returns the last optimizer step's losses and gradient norm (before
        clipping), the mean score, the mean number of sampled tokens and the sampling time.
        ``sequences``: responses sampled before (the step then samples nothing: ReFT's training
        cost without its sampling)."""
        cfg, device, prompt_len = self.config, prompt_ids.device, prompt_ids.shape[1]
        if prompt_mask is None:
            prompt_mask = torch.ones_like(prompt_ids)
        sampled = sequences is None
        _sync(device)
        start = time.perf_counter()
        if sampled:
            sequences = self.sample(prompt_ids, prompt_mask)
        _sync(device)
        sampling_ms = (time.perf_counter() - start) * 1e3
        responses = sequences[:, prompt_len:]
        mask = response_mask(responses, self.eos_token_id)
        attention = torch.cat([prompt_mask.to(mask.dtype), mask], dim=1).long()
        lengths = mask.sum(1).long().tolist()
        scores = torch.tensor(
            [
                final_answer_reward(self.decode(r[:n].tolist()), a, cfg)
                for r, n, a in zip(responses, lengths, answers, strict=True)
            ],
            device=device,
        )
        with torch.no_grad():
            old_logprobs, old_values = response_logprobs(self.policy, sequences, prompt_len, self.value_head, attention)
            ref_logprobs, _ = response_logprobs(self.reference, sequences, prompt_len, None, attention)
            rewards = kl_penalised_rewards(old_logprobs, ref_logprobs, scores, mask, cfg.kl_coef)
            advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
            if cfg.adv_whitening == "global":
                advantages = masked_whiten(advantages, mask)
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        batch = sequences.shape[0]
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(batch)
            for first in range(0, batch, cfg.mini_batch_size):
                idx = order[first : first + cfg.mini_batch_size].to(device)
                adv = advantages[idx]
                if cfg.adv_whitening == "local":
                    adv = masked_whiten(adv, mask[idx])
                self.optimizer.zero_grad(set_to_none=True)
                logprobs, values = response_logprobs(
                    self.policy, sequences[idx], prompt_len, self.value_head, attention[idx]
                )
                policy_loss, value_loss = ppo_losses(
                    logprobs,
                    old_logprobs[idx],
                    adv,
                    values,
                    old_values[idx],
                    returns[idx],
                    mask[idx],
                    cfg.cliprange,
                    cfg.cliprange_value,
                )
                loss = policy_loss + cfg.vf_coef * value_loss
                loss.backward()
                grad_norm = float("nan")
                if cfg.clip_grad_norm is not None:
                    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad_norm).item()
                self.optimizer.step()
        return {
            "loss": loss.item(),
            "policy_loss": policy_loss.item(),
            "value_loss": value_loss.item(),
            "grad_norm": grad_norm,
            "mean_score": scores.mean().item(),
            "generated_tokens": sum(lengths) / len(lengths),
            "sampling_ms": sampling_ms if sampled else 0.0,
        }
