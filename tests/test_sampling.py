"""Seeded sampling that does not depend on the device: equal to ``generate`` on the CPU, prefixes left out."""

from __future__ import annotations

import pytest
import torch
from conftest import MODEL_FACTORIES

from nmke_patch.errors import ModelLoadError
from nmke_patch.sampling import end_token_ids, sample_continuations
from nmke_patch.stats import StatsSource, sample_text


@pytest.mark.parametrize("top_k", [5, 40])
@pytest.mark.parametrize("arch", sorted(MODEL_FACTORIES))
def test_cpu_draws_equal_generate(arch: str, top_k: int, tiny_tokenizer) -> None:
    """The statistics cached before this sampler existed came from ``generate``: same tokens on the CPU."""
    model = MODEL_FACTORIES[arch](init_range=0.2)
    starts = [3, 7, 11, 3]
    torch.manual_seed(5)
    expected = model.generate(
        torch.tensor(starts)[:, None],
        attention_mask=torch.ones(len(starts), 1, dtype=torch.long),
        do_sample=True,
        top_k=top_k,
        max_new_tokens=12,
        min_new_tokens=12,
        pad_token_id=tiny_tokenizer.pad_token_id,
    )
    banned = end_token_ids(model, tiny_tokenizer)
    rows = sample_continuations(
        model, starts, 12, top_k=top_k, generator=torch.Generator().manual_seed(5), banned=banned
    )
    assert rows == expected.tolist()
    assert all(t not in banned for row in rows for t in row[1:])


def test_one_generator_continues_one_stream_and_prefixes_are_left_out(tiny_tokenizer) -> None:
    model = MODEL_FACTORIES["llama"](init_range=0.2)
    gen = torch.Generator().manual_seed(0)
    first, second = (sample_continuations(model, [3, 4], 6, top_k=8, generator=gen) for _ in range(2))
    assert first != second  # the generator advanced
    again = sample_continuations(model, [3, 4], 6, top_k=8, generator=torch.Generator().manual_seed(0))
    assert again == first
    prefixed = sample_continuations(
        model, [3, 4], 6, top_k=8, generator=torch.Generator().manual_seed(0), prefix_ids=[9, 10, 11]
    )
    assert [len(r) for r in prefixed] == [7, 7] and [r[0] for r in prefixed] == [3, 4]
    assert prefixed != first  # the prefix is context the model continues from


def test_sampled_text_prefix_is_part_of_the_cache_key(tiny_tokenizer) -> None:
    plain = StatsSource(None, 300, 0)
    assert plain.key == "model-sampled-s0-300"  # statistics cached before prefixes existed stay valid
    assert StatsSource(None, 300, 0, "From Wikipedia\n").key != plain.key
    model = MODEL_FACTORIES["gpt2"](init_range=0.2)
    rows = sample_text(model, tiny_tokenizer, 40, 0, seq_len=8, batch=3, prefix="w5 w6 w7")
    assert len(rows) == 6 and all(len(r) == 8 for r in rows)
    assert rows != sample_text(model, tiny_tokenizer, 40, 0, seq_len=8, batch=3)


def test_prefix_takes_positions_from_the_sampled_rows(tiny_tokenizer) -> None:
    model = MODEL_FACTORIES["gpt2"](init_range=0.2)  # 64 positions
    rows = sample_text(model, tiny_tokenizer, 100, 0, seq_len=128, batch=2, prefix=" ".join(["w5"] * 10))
    assert all(len(r) == 64 - 10 for r in rows)
    with pytest.raises(ModelLoadError, match="stats_prefix"):
        sample_text(model, tiny_tokenizer, 100, 0, prefix=" ".join(["w5"] * 63))


def test_sampling_reports_its_progress_in_tokens(tiny_tokenizer) -> None:
    model = MODEL_FACTORIES["gpt2"](init_range=0.2)
    seen: list[tuple[int, int]] = []
    rows = sample_text(
        model, tiny_tokenizer, 40, 0, seq_len=8, batch=3, progress=lambda d, t: seen.append((d, t))
    )
    assert rows == sample_text(model, tiny_tokenizer, 40, 0, seq_len=8, batch=3)  # the same text either way
    done = [d for d, _ in seen]
    assert {t for _, t in seen} == {40} and done == sorted(done) and len(done) == 2 * 7  # 2 batches x 7 steps
    assert done[0] == 3 * 2 and done[-1] == 40  # 3 rows of their start token and one drawn; capped at 40


def test_statistics_computed_together_share_one_draw_of_text(
    tiny_tokenizer, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """C0, the first-position statistics and the key bank are computed from one sample of preservation
    text (one progress bar, not one per kind), and each equals what it is when computed on its own."""
    import nmke_patch.stats as stats
    from nmke_patch.methods.nmke.config import EditConfig

    monkeypatch.setenv("NMKE_PATCH_HOME", str(tmp_path / "home"))
    model = MODEL_FACTORIES["llama"](init_range=0.2)
    config = EditConfig(stats_tokens=64, first_token_weight=0.5, contrast_bank=2, bank_size=16, layers=(1,))
    draws: list[int] = []
    real = stats.sample_text

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        draws.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(stats, "sample_text", counted)
    together = stats.load_statistics(model, tiny_tokenizer, [1], [config])
    assert len(draws) == 1
    source = StatsSource.of(config)
    monkeypatch.setenv("NMKE_PATCH_HOME", str(tmp_path / "other"))  # nothing cached: each kind draws again
    assert torch.equal(stats.load_or_compute_c0(model, tiny_tokenizer, [1], source)[1], together.c0[1])
    bank = stats.load_or_compute_bank(model, tiny_tokenizer, [1], source, 16)
    assert together.bank is not None and torch.equal(bank[1], together.bank[1])
    assert together.c_first is not None and together.c_first[1].shape == together.c0[1].shape
    assert len(draws) == 3
