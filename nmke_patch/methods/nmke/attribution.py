"""Neuron attribution (NMKE; docs/method.md): how much amplifying one neuron raises the old answer.

``S[p, i] = log softmax(f(h_mid + A m_i w_i))[y] - log softmax(f(h_mid))[y]`` with ``f`` the logit lens
(final norm using the statistics of the real final residual, then the unembedding). With those statistics
fixed, ``f`` is affine in its input, so every neuron's logit shift is ``A m_i U_i`` with
``U_i = W_U norm_lin(w_i)``; the scores of all neurons come from one ``[d_ff, vocab]`` block per layer.
"""

from __future__ import annotations

import torch

from ...architectures import ArchitectureSpec


def _norm_lin(x: torch.Tensor, kind: str, gain: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The final norm's linear part with a fixed scale: ``gain * x / scale`` (LayerNorm centres ``x`` first)."""
    if kind == "layernorm":
        x = x - x.mean(dim=-1, keepdim=True)
    return x * gain / scale


def final_norm_scale(final_resid: torch.Tensor, kind: str, eps: float) -> torch.Tensor:
    """The per-prompt scale the final norm divides by (RMS, or standard deviation for LayerNorm): ``[P, 1]``."""
    x = final_resid.float()
    if kind == "layernorm":
        x = x - x.mean(dim=-1, keepdim=True)
    return torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)


@torch.no_grad()
def neuron_scores(
    *,
    spec: ArchitectureSpec,
    values: torch.Tensor,
    activations: torch.Tensor,
    h_mid: torch.Tensor,
    final_resid: torch.Tensor,
    answers: torch.Tensor,
    norm_gain: torch.Tensor,
    norm_bias: torch.Tensor | None,
    norm_eps: float,
    unembed: torch.Tensor,
    amplification: float,
    vocab_limit: int,
    chunk: int = 512,
) -> torch.Tensor:
    """Attribution scores ``S`` of shape ``[P, d_ff]`` for one layer.

    Args:
        values: ``[d_ff, d]`` the neurons' value vectors (neuron-major).
        activations: ``[P, d_ff]`` neuron activations ``m`` at each prompt's last token.
        h_mid: ``[P, d]`` residual stream after the layer's attention, at the last token.
        final_resid: ``[P, d]`` the real final residual (input of the final norm), at the last token.
        answers: ``[P]`` token ids of the current top-1 answers ``y``.
        unembed: ``[vocab, d]`` the unembedding matrix.
        vocab_limit: 0 for the exact log-softmax over the whole vocabulary; otherwise the union of each
            prompt's top ``vocab_limit`` tokens by ``f(h_mid)`` plus the answers.
    """
    kind = spec.final_norm_kind
    dev = values.device
    gain = norm_gain.float().to(dev)
    scale = final_norm_scale(final_resid.to(dev), kind, norm_eps)  # [P, 1]
    unembed = unembed.float().to(dev)
    hm = h_mid.float().to(dev)
    base_hidden = _norm_lin(hm, kind, gain, scale)
    if norm_bias is not None:
        base_hidden = base_hidden + norm_bias.float().to(dev)
    base_logits = base_hidden @ unembed.T  # [P, V]
    if vocab_limit and vocab_limit < unembed.shape[0]:
        top = base_logits.topk(vocab_limit, dim=-1).indices.flatten()
        vocab = torch.unique(torch.cat([top, answers.to(dev)]))
    else:
        vocab = torch.arange(unembed.shape[0], device=dev)
    sub_unembed = unembed[vocab]  # [V', d]
    answer_col = torch.searchsorted(vocab, answers.to(dev))
    sub_base = base_logits[:, vocab]  # [P, V']
    base_lp = sub_base.gather(1, answer_col[:, None]).squeeze(1) - torch.logsumexp(sub_base, dim=-1)
    vals = values.float()
    if kind == "layernorm":
        vals = vals - vals.mean(dim=-1, keepdim=True)
    neuron_logits = (vals * gain) @ sub_unembed.T  # [d_ff, V'] before the per-prompt 1/scale
    d_ff = vals.shape[0]
    scores = torch.empty(hm.shape[0], d_ff, device=dev)
    for p in range(hm.shape[0]):
        coef = amplification * activations[p].float().to(dev) / scale[p]  # [d_ff]
        y = answer_col[p]
        for s in range(0, d_ff, chunk):
            block = sub_base[p][None, :] + coef[s : s + chunk, None] * neuron_logits[s : s + chunk]
            lp = block[:, y] - torch.logsumexp(block, dim=-1)
            scores[p, s : s + chunk] = lp - base_lp[p]
    return torch.nan_to_num(scores, nan=0.0, posinf=0.0, neginf=0.0)
