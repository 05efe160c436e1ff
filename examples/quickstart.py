"""A first run of the fused NLFT loss on random logits: loss, gradient and per-token details.

python examples/quickstart.py
"""

import torch

import nlft_kernels
from nlft_kernels import NLFTConfig, nlft_loss
from nlft_kernels.reference import nlft_loss_reference

torch.manual_seed(0)
batch, steps, vocab = 4, 32, 1000
device = "cuda" if torch.cuda.is_available() else "cpu"

base_logits = torch.randn(batch, steps, vocab, device=device, requires_grad=True)
labels = torch.randint(0, vocab, (batch, steps), device=device)
labels[:, -5:] = -100  # padding
correct = torch.tensor([True, True, False, False], device=device)
standard = base_logits.detach() + torch.randn_like(base_logits)
judge = base_logits.detach() + torch.randn_like(base_logits)
# Make the teachers opinionated on a few tokens: the standard view is sure of them (saliency of
# correct samples), the judge view expects them in a bad answer (unlikelihood in wrong ones).
samples = torch.arange(batch, device=device)[:, None]
rows = torch.arange(0, steps - 5, 4, device=device)
standard[samples[:2], rows, labels[:2, rows]] += 12.0
judge[samples[2:], rows[::3], labels[2:, rows[::3]]] += 12.0

loss, details = nlft_loss(
    base_logits, labels, correct, standard=standard, judge=judge, config=NLFTConfig(), return_details=True
)
loss.backward()
reference = nlft_loss_reference(base_logits.detach().double(), labels, correct, standard, judge)

print(f"backends: {nlft_kernels.backends()}")
print(f"NLFT loss {loss.item():.6f} (float64 reference {reference.item():.6f})")
print(f"gradient norm {base_logits.grad.norm().item():.4f}")
print(f"saliency tokens per sample {details.saliency.sum(1).tolist()}")
print(f"unlikelihood tokens per sample {details.unlikelihood.sum(1).tolist()}")
print(f"tokens zeroed by the saliency-fraction rule {details.killed.sum(1).tolist()}")
print(f"mean weight of sample 0: {details.weight[0][labels[0] != -100].mean().item():.4f}")
