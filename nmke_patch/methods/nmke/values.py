"""Target values z (as in MEMIT; docs/method.md): the residual at the last edited layer, at the subject's last
token, that makes the model produce the new target (optimised by normalized descent, NMKE's default, or Adam,
the baselines'; early stopping).

Only the subject's last token and what follows it depend on the optimised ``delta``, and only in the layers
above the edited one. So each prompt is run once in full; every optimisation step then replays the layers up
to the edited one from that run and feeds just the tokens from the subject's last token on, attending to the
earlier tokens through their cached keys and values, all prompts in one batch: a step costs a few tokens per
prompt instead of whole prompts (half the time on the default model; ``tests/test_engine.py`` checks it
equals optimising through full forward passes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel

from ...architectures import ArchitectureSpec, decoder_layers
from ...compat import cache_argument, returned_cache
from ...requests import EditRequest
from ...tracing import capture, replay_prefix
from .config import EditConfig
from .prompts import Batch, encode, target_positions


@dataclass(frozen=True)
class TargetValue:
    z: torch.Tensor  # [d]
    h: torch.Tensor  # [d] the unedited residual it replaces
    steps: int
    p_before: float  # mean target probability over the prompts before optimisation
    p_after: float


@dataclass
class _Split:
    """The prompts split at each one's subject's last token, laid out for one batched forward pass.

    The earlier tokens live in a key/value cache, left-padded so every row's subject's last token is
    the first suffix column; the suffix (subject's last token onwards) is right-padded. Padding is
    masked and never a query of the cached part, so no row attends to nothing.
    """

    suffix_ids: torch.Tensor  # [B, S]
    attention_mask: torch.Tensor  # [B, C + S]
    position_ids: torch.Tensor  # [B, S] each token's position in its own unpadded row
    past: list[tuple[torch.Tensor, torch.Tensor]] | None  # per layer (keys, values) [B, H, C, hd]
    layer_out: torch.Tensor  # [B, S, d] the edited layer's unedited output at the suffix tokens
    base_hidden: torch.Tensor  # [B, S, d] final hidden states of the unedited model
    rows: torch.Tensor  # (row, suffix position, token) of every scored target token
    positions: torch.Tensor
    tokens: torch.Tensor
    kl_position: int  # suffix position of the last row's (the KL prompt's) next-token distribution


def _split(model: PreTrainedModel, spec: ArchitectureSpec, layer: int, batch: Batch) -> _Split:
    backbone = model.base_model
    with torch.no_grad(), capture(model, outputs={"out": f"{spec.layers}.{layer}"}) as seen:
        result = backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=True)
    cache = returned_cache(result)
    lengths = batch.attention_mask.sum(dim=1).tolist()
    cuts = batch.subject_pos.tolist()
    n_rows, width = len(cuts), max(cuts)
    span = max(n - c for n, c in zip(lengths, cuts, strict=True))
    device = batch.input_ids.device

    def suffix_of(full: torch.Tensor, fill: float | int) -> torch.Tensor:
        out = full.new_full((n_rows, span, *full.shape[2:]), fill)
        for i, (n, c) in enumerate(zip(lengths, cuts, strict=True)):
            out[i, : n - c] = full[i, c:n]
        return out

    suffix_mask = suffix_of(batch.attention_mask, 0)
    prefix_mask = torch.zeros(n_rows, width, dtype=suffix_mask.dtype, device=device)
    for i, c in enumerate(cuts):
        prefix_mask[i, width - c :] = 1
    past = None
    if width > 0:
        past = []
        for lay in cache.layers:
            keys = lay.keys.new_zeros((n_rows, lay.keys.shape[1], width, lay.keys.shape[3]))
            values = lay.values.new_zeros((n_rows, lay.values.shape[1], width, lay.values.shape[3]))
            for i, c in enumerate(cuts):
                keys[i, :, width - c :] = lay.keys[i, :, :c]
                values[i, :, width - c :] = lay.values[i, :, :c]
            past.append((keys, values))
    rows, positions, tokens = target_positions(batch, device)
    cut_of_row = torch.tensor(cuts, dtype=torch.long, device=device)

    return _Split(
        suffix_ids=suffix_of(batch.input_ids, 0),
        attention_mask=torch.cat([prefix_mask, suffix_mask], dim=1),
        position_ids=cut_of_row[:, None] + torch.arange(span, device=device)[None, :],
        past=past,
        layer_out=suffix_of(seen["out"].detach(), 0.0),
        base_hidden=suffix_of(result.last_hidden_state.detach(), 0.0),
        rows=rows,
        positions=positions - cut_of_row[rows],  # in suffix coordinates
        tokens=tokens,
        kl_position=int(batch.last_pos[-1]) - cuts[-1],
    )


class NormalizedDescent(torch.optim.Optimizer):
    """Steepest descent in the L2 norm: each step moves ``step`` along the unit gradient, averaged with the
    previous direction (``momentum``).

    Adam's per-coordinate scaling moves every coordinate about equally, so it reaches the target with a
    longer ``delta`` than the gradient direction needs; a longer ``delta`` is a larger weight change.
    """

    def __init__(self, params: list[torch.Tensor], step: float, momentum: float) -> None:
        super().__init__(params, {"step": step, "momentum": momentum})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                direction = param.grad / param.grad.norm().clamp_min(1e-12)
                state = self.state[param]
                if "direction" in state:
                    direction = direction + group["momentum"] * state["direction"]
                    direction = direction / direction.norm().clamp_min(1e-12)
                state["direction"] = direction
                param.sub_(group["step"] * direction)


def reached(p_rows: torch.Tensor, config: EditConfig) -> bool:
    """Early stop: the mean target probability over the prompts ``[P]`` (bare prompt first) passes
    ``z_stop_prob``, and with ``z_stop_bare`` the bare prompt's too."""
    p_mean = float(p_rows.mean())
    return p_mean >= config.z_stop_prob and (not config.z_stop_bare or float(p_rows[0]) >= config.z_stop_prob)


def _reference_norm(rows: torch.Tensor, sink_ratio: float | None) -> torch.Tensor:
    """The length that sets z's step and clamp: the bare prompt's output at the subject ``rows[0]``, unless
    (``sink_ratio``) it is more than that many times the prefixed rows' median, as at a text's first token
    where that position is the attention sink (SmolLM2-135M layer 11); then that median. The one delta is
    added to every row, and a step sized by the sink would be far too long for the others."""
    bare = rows[0].norm()
    if sink_ratio is None or len(rows) < 2:
        return bare
    others = rows[1:].norm(dim=1).median()
    return others if bool(bare > sink_ratio * others) else bare


def compute_target_value(
    model: PreTrainedModel,
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
    batch = encode(
        tokenizer,
        [*texts, f"{request.subject} is a"],
        [request.subject] * (len(texts) + 1),
        [request.target_new] * len(texts) + [None],
    ).to(device)
    split = _split(model, spec, layer, batch)
    n_prompts = len(texts)
    counts = torch.tensor([len(t) for t in batch.target_ids[:n_prompts]], device=device, dtype=torch.float32)
    unembed = model.get_output_embeddings()
    backbone = model.base_model
    cache_arg = cache_argument(backbone)

    def scores(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean target log-probability per prompt ``[P]`` and the KL prompt's next-token log-probabilities."""
        logp = torch.log_softmax(unembed(hidden[split.rows, split.positions]).float(), dim=-1)
        picked = logp.gather(1, split.tokens[:, None]).squeeze(1)
        per_row = torch.zeros(n_prompts, device=device).index_add(0, split.rows, picked) / counts
        return per_row, torch.log_softmax(unembed(hidden[-1, split.kl_position]).float(), dim=-1)

    with torch.no_grad():
        lp0, kl_ref = scores(split.base_hidden)
        p_before = float(lp0.exp().mean())
    h = split.layer_out[0, 0].float()
    delta = torch.zeros_like(h, requires_grad=True)
    h_norm = _reference_norm(split.layer_out[:n_prompts, 0].float(), config.sink_ratio)
    opt: torch.optim.Optimizer = (
        NormalizedDescent([delta], step=config.z_step * float(h_norm), momentum=config.z_momentum)
        if config.z_optimizer == "normalized"
        else torch.optim.Adam([delta], lr=config.z_lr)
    )
    max_norm = config.z_clamp_norm * h_norm

    def edited_layer_output() -> torch.Tensor:
        out = split.layer_out.clone()
        out[:, 0] = out[:, 0] + delta.to(out.dtype)
        return out

    def run() -> torch.Tensor:
        extra = {} if split.past is None else {cache_arg: DynamicCache(ddp_cache_data=split.past)}
        return backbone(
            input_ids=split.suffix_ids,
            attention_mask=split.attention_mask,
            position_ids=split.position_ids,
            use_cache=split.past is not None,
            **extra,
        ).last_hidden_state

    steps, p_now = 0, p_before
    with replay_prefix(decoder_layers(model, spec), layer, edited_layer_output):
        for steps in range(1, config.z_steps + 1):
            lp, kl_new = scores(run())
            p_rows = torch.exp(lp.detach() * counts) if config.z_stop_whole else torch.exp(lp.detach())
            p_now = float(p_rows.mean())
            if reached(p_rows, config):
                steps -= 1
                break
            kl = torch.sum(torch.exp(kl_ref) * (kl_ref - kl_new))
            loss = (
                -lp.mean() + config.z_kl_factor * kl + config.z_weight_decay * delta.pow(2).sum() / h_norm**2
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                norm = delta.norm()
                if norm > max_norm:
                    delta.mul_(max_norm / norm)
    return TargetValue(z=(h + delta.detach()), h=h, steps=steps, p_before=p_before, p_after=p_now)
