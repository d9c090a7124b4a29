"""Target values z [design note section 1]: the residual at the last edited layer, at the subject's last
token, that makes the model produce the new target (optimised with Adam, early stopping)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...architectures import ArchitectureSpec, decoder_layers
from ...requests import EditRequest
from ...tracing import capture, replay_prefix
from .config import EditConfig
from .prompts import encode, target_logprobs_from_hidden


@dataclass(frozen=True)
class TargetValue:
    z: torch.Tensor  # [d]
    h: torch.Tensor  # [d] the unedited residual it replaces
    steps: int
    p_before: float  # mean target probability over the prompts before optimisation
    p_after: float


def compute_target_value(
    model: nn.Module,
    tokenizer: Any,
    spec: ArchitectureSpec,
    layer: int,
    request: EditRequest,
    prefixes: list[str],
    config: EditConfig,
) -> TargetValue:
    """Optimise ``delta`` added to layer ``layer``'s output at the subject's last token."""
    device = next(model.parameters()).device
    texts = [p + request.text for p in ["", *prefixes]]
    kl_text = f"{request.subject} is a"
    batch = encode(
        tokenizer,
        [*texts, kl_text],
        [request.subject] * (len(texts) + 1),
        [request.target_new] * len(texts) + [None],
    ).to(device)
    n = len(texts)
    rows = torch.arange(n + 1, device=device)
    kl_pos = int(batch.last_pos[n])
    token_counts = torch.tensor([len(t) for t in batch.target_ids[:n]], device=device, dtype=torch.float32)
    layers = decoder_layers(model, spec)
    backbone = model.base_model
    unembed = model.get_output_embeddings()
    sub = type(batch)(
        batch.input_ids[:n],
        batch.attention_mask[:n],
        batch.subject_pos[:n],
        batch.last_pos[:n],
        batch.target_ids[:n],
    )

    def run() -> torch.Tensor:
        return backbone(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
        ).last_hidden_state

    with torch.no_grad(), capture(model, outputs={"out": f"{spec.layers}.{layer}"}) as seen:
        hidden = run()
    cached = seen["out"].detach()
    h_rows = cached[rows, batch.subject_pos].float()
    h = h_rows[0]
    kl_ref = torch.log_softmax(unembed(hidden[n, kl_pos]).float(), dim=-1)
    p_before = float(torch.exp(target_logprobs_from_hidden(model, hidden[:n], sub) / token_counts).mean())

    delta = torch.zeros_like(h, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=config.z_lr)
    h_norm = h.norm()
    max_norm = config.z_clamp_norm * h_norm

    def edited_output() -> torch.Tensor:
        out = cached.clone()
        out[rows, batch.subject_pos] = out[rows, batch.subject_pos] + delta.to(out.dtype)
        return out

    steps, p_now = 0, p_before
    with replay_prefix(layers, layer, edited_output):
        for steps in range(1, config.z_steps + 1):
            hidden = run()
            lp = target_logprobs_from_hidden(model, hidden[:n], sub) / token_counts
            p_now = float(torch.exp(lp.detach()).mean())
            if p_now >= config.z_stop_prob:
                steps -= 1
                break
            nll = -lp.mean()
            kl_new = torch.log_softmax(unembed(hidden[n, kl_pos]).float(), dim=-1)
            kl = torch.sum(torch.exp(kl_ref) * (kl_ref - kl_new))
            loss = nll + config.z_kl_factor * kl + config.z_weight_decay * delta.pow(2).sum() / h_norm**2
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                norm = delta.norm()
                if norm > max_norm:
                    delta.mul_(max_norm / norm)
    return TargetValue(z=(h + delta.detach()), h=h, steps=steps, p_before=p_before, p_after=p_now)
