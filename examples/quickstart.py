"""A small end-to-end use of the sfr API on synthetic data (CPU, a few seconds).

Each of 16 "contexts" (hidden states) has two valid futures (two unit target embeddings). The flow
head learns this bimodal future distribution with the SFR loss; we also fine-tune the hidden states
themselves with a small grad_scale, as the backbone would be in phase B.
"""
import torch

from sfr import FlowHead, SFRConfig, sfr_loss

torch.manual_seed(0)
D, E, CONTEXTS = 64, 32, 16
cfg = SFRConfig(head_width=128, num_samples=4)
head = FlowHead(D, E, **cfg.head_kwargs())
hidden = torch.nn.Parameter(torch.randn(CONTEXTS, D))
futures = torch.nn.functional.normalize(torch.randn(CONTEXTS, 2, E), dim=-1)  # two modes per context
opt = torch.optim.AdamW([*head.parameters(), hidden], lr=3e-3)

for step in range(301):
    mode = torch.randint(0, 2, (CONTEXTS,))
    target = futures[torch.arange(CONTEXTS), mode]  # one observed future per context
    loss = sfr_loss(hidden, target, head, seed=step, grad_scale=0.1, **cfg.loss_kwargs())
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 50 == 0:
        print(f"step {step:3d}  sfr_loss {loss.item():.4f}")

# Integrate the learned flow from several source draws: the endpoints should land near both modes.
with torch.no_grad():
    x = torch.randn(CONTEXTS, 64, E)
    for i in range(20):
        x = x + head(x, torch.full((CONTEXTS, 64), i / 20), hidden.detach()) / 20
    sims = torch.einsum("cse,cke->csk", torch.nn.functional.normalize(x, dim=-1), futures)
    hit = sims.argmax(-1)
    both = ((hit == 0).any(1) & (hit == 1).any(1)).float().mean()
print(f"contexts whose sampled futures reach both modes: {both.item():.0%}")
