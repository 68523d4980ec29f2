"""Token-budget sampler: invariants, statistics against 4M's algorithm, determinism, format, errors."""
import random

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import requires_cuda
from fourm_fast.masking import (
    FOURM7_ALPHAS_IN,
    FOURM7_ALPHAS_TG,
    ModalitySpec,
    TokenBudgetSampler,
    fourm7_sampler,
    fourm7_specs,
    to_ml4m_batch,
)
from fourm_fast.ops.masking import SPAN_PAD, sample_budgets, span_mask, token_layout
from fourm_fast.reference.masking import budgets_4m, sequence_mask_4m

SENTINELS = list(range(5000, 5000 + 600))  # entry s is the id of [S_s]
PAD = 7  # not 0: a pad_id the code ignored (writing 0) would pass with 0


def check_budgets(sampler, b, input_total=None, target_total=None):
    size = sampler.size.cpu()
    img = sampler.is_image.cpu()
    inp, tgt, comp = b.input.cpu(), b.target.cpu(), b.component.cpu().long()
    assert (inp >= 0).all() and (tgt >= 0).all()
    assert (inp <= size).all() and (tgt <= size).all()
    assert ((inp + tgt)[:, img] <= size[img]).all(), "image inputs and targets must be disjoint"
    lo, hi = sampler.input_range
    assert (inp.sum(1) <= hi).all()
    assert (tgt.sum(1) <= sampler.target_range[1]).all()
    # alpha 0 never gets tokens
    a_in, a_tg = sampler.alpha_in.cpu()[comp], sampler.alpha_tg.cpu()[comp]
    assert (inp[a_in == 0] == 0).all() and (tgt[a_tg == 0] == 0).all()
    if input_total is not None:
        assert (inp.sum(1) == input_total).all()
    if target_total is not None:
        assert (tgt.sum(1) == target_total).all()


def check_sequence(source, n_in, n_tg, b_in, b_tg, length):
    """Sentinel structure of one span-masked sequence (source codes: j token, -s sentinel)."""
    inp = source[:n_in].tolist()
    tgt = source[b_in:b_in + n_tg].tolist()
    assert all(c == SPAN_PAD for c in source[n_in:b_in].tolist())
    assert all(c == SPAN_PAD for c in source[b_in + n_tg:].tolist())
    assert n_in <= b_in and n_tg <= max(b_tg, 0)
    in_tokens = [c for c in inp if c >= 0]
    in_sent = [-c for c in inp if c < 0]
    assert in_tokens == sorted(set(in_tokens)) and all(0 <= t < length for t in in_tokens)
    assert in_sent == list(range(1, len(in_sent) + 1)), "input sentinels are S_1, S_2, ... in order"
    for a, b2 in zip(inp, inp[1:]):
        assert not (a < 0 and b2 < 0), "two sentinels in a row: runs are maximal"
    if not tgt:
        return
    assert tgt[0] < 0, "a target starts at a sentinel"
    t_sent = [-c for c in tgt if c < 0]
    assert t_sent == list(range(t_sent[0], t_sent[0] + len(t_sent))), "target sentinels are consecutive"
    t_tokens = [c for c in tgt if c >= 0]
    assert t_tokens == sorted(set(t_tokens)) and not set(t_tokens) & set(in_tokens)
    if b_in > 0 and t_sent[0] == 1 and len(t_sent) == len(in_sent) + 1 and tgt[-1] == -(len(in_sent) + 1):
        # the target was not cut: input and target together are the whole sequence
        assert sorted(in_tokens + t_tokens) == list(range(length))


def check_layout(sampler, lay):
    s = lay.slots
    B = lay.batch_size
    inp, tgt = lay.budgets.input.cpu(), lay.budgets.target.cpu()
    enc_index, enc_mod, enc_pos, enc_valid = (t.cpu() for t in (s.enc_index, s.enc_modality, s.enc_position, s.enc_valid))
    dec = {k: getattr(s, k).cpu() for k in ("dec_index", "dec_modality", "dec_position", "dec_valid", "dec_segment",
                                              "dec_rank", "dec_limit")}
    offsets = torch.tensor(lay.offsets)
    widths = torch.tensor([sp.buffer_size for sp in lay.specs])
    for b in range(B):
        ev, dv = enc_valid[b], dec["dec_valid"][b]
        # valid slots first, then padding
        assert ev.tolist() == sorted(ev.tolist(), reverse=True) and dv.tolist() == sorted(dv.tolist(), reverse=True)
        ei, em, ep = enc_index[b][ev], enc_mod[b][ev].long(), enc_pos[b][ev]
        di, dm, dp = dec["dec_index"][b][dv], dec["dec_modality"][b][dv].long(), dec["dec_position"][b][dv]
        assert (ei == offsets[em] + ep).all() and (di == offsets[dm] + dp).all()
        assert ((ep >= 0) & (ep < widths[em])).all() and ((dp >= 0) & (dp < widths[dm])).all()
        assert len(set(ei.tolist())) == ei.numel() and len(set(di.tolist())) == di.numel()
        assert not set(ei.tolist()) & set(di.tolist()), "an input is never a target"
        assert (em[1:] >= em[:-1]).all() and (dm[1:] >= dm[:-1]).all(), "slots are grouped by modality"
        assert (dec["dec_segment"][b][dv] == dm).all() and (dec["dec_segment"][b][~dv] == -1).all()
        assert (dec["dec_limit"][b][~dv] == -1).all()
        for m, spec in enumerate(lay.specs):
            n_e, n_d = int((em == m).sum()), int((dm == m).sum())
            rank, limit = dec["dec_rank"][b][dv][dm == m], dec["dec_limit"][b][dv][dm == m]
            if spec.kind == "image":
                assert n_e == inp[b, m] and n_d == tgt[b, m]
                assert (rank == 0).all() and (limit == 0).all(), "bidirectional inside an image modality"
            else:
                assert n_e == lay.sequence_input[spec.name][b] and n_d == lay.sequence_target[spec.name][b]
                assert ep[em == m].tolist() == list(range(n_e))
                assert dp[dm == m].tolist() == list(range(int(inp[b, m]), int(inp[b, m]) + n_d))
                assert rank.tolist() == list(range(n_d)) and limit.tolist() == list(range(n_d)), "causal"


@pytest.mark.parametrize("tokens", [128, 256])
def test_fourm7_invariants_on_every_sample(tokens):
    sampler = fourm7_sampler(tokens)
    gen = torch.Generator().manual_seed(tokens)
    lengths = {"caption": torch.randint(1, 80, (300,), generator=gen), "det": torch.randint(1, 257, (300,), generator=gen)}
    lay = sampler.sample(300, seed=11, lengths=lengths)
    # Every input slot is filled unless a modality hit its cap (4M drops the excess): rgb -> all
    # at 256 tokens caps rgb at 196.
    comp = lay.budgets.component.cpu()
    inp = lay.budgets.input.cpu()
    at_cap = (inp == sampler.size.cpu()).any(1)
    assert ((inp.sum(1) == tokens) | at_cap).all()
    assert (inp.sum(1)[comp == 1] == min(tokens, 196)).all()
    assert set(comp.tolist()) == {0, 1}
    check_budgets(sampler, lay.budgets)
    check_layout(sampler, lay)
    for m, spec in enumerate(lay.specs):
        if spec.kind != "sequence":
            continue
        for b in range(300):
            check_sequence(lay.sequence_source[spec.name][b], int(lay.sequence_input[spec.name][b]),
                           int(lay.sequence_target[spec.name][b]), int(lay.budgets.input[b, m]),
                           int(lay.budgets.target[b, m]), min(int(lengths[spec.name][b]), spec.num_tokens))


def _reference_budget_stats(sampler, n, seed):
    """n samples of the per-sample restatement of 4M's budget draw (its own randomness)."""
    random.seed(seed)
    torch.manual_seed(seed)
    weights = None if sampler.weights is None else sampler.weights.tolist()
    args = (sampler.size.tolist(), sampler.is_image.tolist(), sampler.alpha_in.T.tolist(), sampler.alpha_tg.T.tolist(),
            sampler.input_range, sampler.target_range, weights)
    rows_in, rows_tg = [], []
    for _ in range(n):
        _, i, t = budgets_4m(*args)
        rows_in.append(i)
        rows_tg.append(t)
    return torch.tensor(rows_in, dtype=torch.float64), torch.tensor(rows_tg, dtype=torch.float64)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["fourm7_128", "ranges_weights_small_alpha"])
def test_budget_statistics_match_4m(config):
    """Mean, variance and zero-input fraction of every modality's counts, 1e5 samples of the op
    against 1e5 of the per-sample restatement of 4M's algorithm (independent randomness). Means
    and zero fractions: within 5 standard errors of the difference. Variances: within 5 %
    relative (the standard error of a variance at n = 1e5 is about 0.5 % for these counts)."""
    if config == "fourm7_128":
        sampler = fourm7_sampler(128)
    else:
        specs = [ModalitySpec("a", "image", 50), ModalitySpec("b", "image", 17), ModalitySpec("c", "sequence", 40),
                 ModalitySpec("d", "image", 9)]
        sampler = TokenBudgetSampler(
            specs, (10, 60), (5, 40), {"a": [0.2, 2.0], "b": [0.2, 0.0], "c": [1.0, 0.5], "d": [0.05, 3.0]},
            {"a": [0.7, 1.0], "b": [0.7, 1.0], "c": [0.1, 1.0], "d": [0.7, 1.0]}, weights=[0.3, 0.7])
    n = 100_000
    b = sampler.budgets(n, seed=2024)
    ref_in, ref_tg = _reference_budget_stats(sampler, n, seed=7)
    for name, ours, ref in (("input", b.input.double(), ref_in), ("target", b.target.double(), ref_tg)):
        se = (ours.var(0) / n + ref.var(0) / n).sqrt()
        diff = (ours.mean(0) - ref.mean(0)).abs()
        assert (diff <= 5 * se + 1e-9).all(), f"{name} means {ours.mean(0).tolist()} vs 4M {ref.mean(0).tolist()}"
        rel = (ours.var(0) - ref.var(0)).abs() / ref.var(0).clamp(min=1e-3)
        assert (rel <= 0.05).all(), f"{name} variances {ours.var(0).tolist()} vs 4M {ref.var(0).tolist()}"
        z_ours, z_ref = (ours == 0).double().mean(0), (ref == 0).double().mean(0)
        se_z = (z_ours * (1 - z_ours) / n + z_ref * (1 - z_ref) / n).sqrt()
        assert ((z_ours - z_ref).abs() <= 5 * se_z + 1e-4).all(), f"{name} zero fractions {z_ours.tolist()} vs 4M {z_ref.tolist()}"


def test_determinism_and_batch_independence():
    sampler = fourm7_sampler(128)
    a = sampler.sample(64, seed=5)
    b = sampler.sample(64, seed=5)
    c = sampler.sample(64, seed=6)
    d = sampler.sample(64, seed=5, offset=1)
    e = sampler.sample(64, seed=5, offset=2**32)  # the offset's high bits make another stream too
    for x, y in zip(a.slots, b.slots):
        assert torch.equal(x, y)
    assert not torch.equal(a.slots.enc_index, c.slots.enc_index)
    assert not torch.equal(a.slots.enc_index, d.slots.enc_index)
    assert not torch.equal(a.slots.enc_index, e.slots.enc_index)
    # a sample depends on its index only, not on the batch size or thread split
    small = sampler.sample(10, seed=5)
    for x, y in zip(a.slots, small.slots):
        assert torch.equal(x[:10], y)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = sampler.sample(64, seed=5)
    finally:
        torch.set_num_threads(threads)
    for x, y in zip(a.slots, single.slots):
        assert torch.equal(x, y)


def test_seeds_lengths_and_empty_batches_at_the_edges():
    sampler = fourm7_sampler(128)
    # any 64-bit seed, as sample_tokens takes them: 2**63 and up wrap to the same bits as int64
    # (they raised the dispatcher's "Expected a value of type 'int' ... found type 'int'")
    for big, same in ((2**64 - 1, -1), (2**63, -(2**63))):
        for x, y in zip(sampler.sample(4, seed=big).slots, sampler.sample(4, seed=same).slots):
            assert torch.equal(x, y)
    assert torch.equal(sampler.sample(4, seed=np.int64(5)).slots.enc_index, sampler.sample(4, seed=5).slots.enc_index)
    for bad, kind, message in [(2**64, ValueError, "seed must fit in 64 bits"), (5.0, TypeError, "seed must be an int, got float"),
                               (True, TypeError, "seed must be an int, got bool")]:
        with pytest.raises(kind, match=message):
            sampler.sample(4, seed=bad)
    with pytest.raises(TypeError, match="offset must be an int"):
        sampler.sample(4, seed=1, offset=0.5)
    with pytest.raises(TypeError, match="batch_size must be an int"):
        sampler.budgets(4.0, seed=1)
    # lengths past int32: cut to the modality's tokens like any long sequence (2**32 + 3 wrapped to 3)
    spec = next(s for s in sampler.specs if s.kind == "sequence")
    full = torch.full((4,), spec.num_tokens, dtype=torch.int64)
    for huge in (2**32 + 3, 2**32, spec.num_tokens + 1):
        a = sampler.sample(4, seed=3, lengths={spec.name: torch.full((4,), huge, dtype=torch.int64)})
        b = sampler.sample(4, seed=3, lengths={spec.name: full})
        assert torch.equal(a.sequence_source[spec.name], b.sequence_source[spec.name]), huge
    # an empty batch gets through to ml-4m's format (a max() over no elements raised)
    layout = sampler.sample(0, seed=1)
    tokens = {s.name: torch.zeros(0, s.num_tokens, dtype=torch.int64) for s in sampler.specs}
    batch = to_ml4m_batch(layout, tokens, list(range(100)), 0)
    assert all(d["tensor"].shape[0] == 0 for d in batch.values())


def test_mixture_weights_split_by_weight_at_float32_extremes():
    # The kernel scales a uniform by the float32 sum of the weights: 2e38 + 2e38 overflowed and
    # every sample drew the last component; a subnormal sum sent half the draws to a weight of 0
    specs = fourm7_specs()
    for weights, want in [([2e38, 2e38], (0.5, 0.5)), ([1e-45, 0.0], (1.0, 0.0)), ([3.0, 1.0], (0.75, 0.25))]:
        sampler = TokenBudgetSampler(specs, 128, 128, FOURM7_ALPHAS_IN, FOURM7_ALPHAS_TG, weights=weights)
        share = torch.bincount(sampler.budgets(4000, seed=1).component.long(), minlength=2).double() / 4000
        assert abs(share[0] - want[0]) < 0.03 and abs(share[1] - want[1]) < 0.03, (weights, share.tolist())
    size = torch.tensor([4, 6], dtype=torch.int32)
    a = torch.ones(2, 2)
    for w in ([2e38, 2e38], [1e-45, 0.0]):  # the op itself, given such weights directly, refuses them
        with pytest.raises(ValueError, match="weights must add up to a finite, normal float32 number"):
            sample_budgets(3, a, a, torch.tensor(w), size, torch.tensor([True, False]), (1, 2), (1, 2), 0)


def test_image_selection_is_uniform():
    """Every position of a 9-token grid is an input 3/9 and a target 2/9 of the time."""
    B = 20000
    size = torch.tensor([9], dtype=torch.int32)
    img = torch.tensor([True])
    inp = torch.full((B, 1), 3, dtype=torch.int32)
    tgt = torch.full((B, 1), 2, dtype=torch.int32)
    z = torch.zeros_like(inp)
    lay = token_layout(inp, tgt, z, z, size, img, 3, 2, seed=1)
    counts_in = torch.bincount(lay.enc_index.flatten(), minlength=9).double() / B
    counts_tg = torch.bincount(lay.dec_index.flatten(), minlength=9).double() / B
    se = (1 / 3 * 2 / 3 / B) ** 0.5
    assert ((counts_in - 1 / 3).abs() < 5 * se).all(), counts_in
    assert ((counts_tg - 2 / 9).abs() < 5 * se).all(), counts_tg


def test_sequence_buffers_match_4m_deterministic_cases():
    """keep='all' with room for the whole sequence, and input budget 0, have one outcome in 4M:
    compare the ml-4m buffer's tensor token for token, decoded here from span_mask's codes (the
    masks' meaning is test_to_ml4m_batch_format_and_meaning's)."""
    ids = torch.tensor([[101, 102, 103, 104, 105, 2, 0, 0]] * 2)
    lengths = torch.tensor([6, 6])
    for b_in, b_tg in ((10, 3), (0, 10), (0, 4)):
        L = lengths.int()
        src, n_in, n_tg, _ = span_mask(L, torch.tensor([b_in] * 2, dtype=torch.int32),
                                       torch.tensor([b_tg] * 2, dtype=torch.int32), torch.ones(2, dtype=torch.int32), 12, 1, 3)
        ref = sequence_mask_4m(ids[0, :6].tolist(), 12, b_in, b_tg, "all", SENTINELS, PAD)
        # (0, 4): the 8-token target is cut; 4M's random sentinel pick has one choice here (S_1)
        codes = src[0]
        tok = torch.where(codes >= 0, ids[0].gather(0, codes.clamp(min=0).long()),
                          torch.where(codes == SPAN_PAD, torch.full_like(codes, PAD).long(),
                                      torch.tensor(SENTINELS)[(-codes).clamp(min=0, max=599).long()]))
        assert tok.int().tolist() == ref["tensor"].tolist(), (b_in, b_tg)


def test_to_ml4m_batch_format_and_meaning():
    sampler = fourm7_sampler(128)
    B = 16
    gen = torch.Generator().manual_seed(0)
    lengths = {"caption": torch.randint(1, 30, (B,), generator=gen), "det": torch.randint(1, 60, (B,), generator=gen)}
    lay = sampler.sample(B, seed=3, lengths=lengths)
    tokens = {n: torch.randint(0, 1000, (B, 196), generator=gen) for n in ("rgb", "depth", "normal", "semseg", "clip")}
    tokens["caption"] = torch.randint(10, 900, (B, 30), generator=gen)
    tokens["det"] = torch.randint(10, 900, (B, 60), generator=gen)
    batch = to_ml4m_batch(lay, tokens, SENTINELS, PAD)
    for m, spec in enumerate(lay.specs):
        d = batch[spec.name]
        assert set(d) == {"tensor", "input_mask", "target_mask", "decoder_attention_mask"}
        assert d["input_mask"].dtype == torch.bool and d["target_mask"].dtype == torch.bool
        assert d["decoder_attention_mask"].dtype == torch.int32
        assert not (~d["input_mask"] & ~d["target_mask"]).any(), "disjoint"
        n_in = (~d["input_mask"]).sum(1)
        n_tg = (~d["target_mask"]).sum(1)
        dam = d["decoder_attention_mask"]
        if spec.kind == "image":
            assert torch.equal(n_in, lay.budgets.input[:, m].long()) and torch.equal(n_tg, lay.budgets.target[:, m].long())
            assert torch.equal(dam.sum(1), n_tg.int())
            for b in range(B):
                if n_tg[b] > 0:
                    first = int((~d["target_mask"][b]).nonzero()[0])
                    assert dam[b, first] == n_tg[b] and (dam[b].count_nonzero() == 1)
            assert torch.equal(d["tensor"], tokens[spec.name])
        else:
            assert d["tensor"].dtype == torch.int32 and d["tensor"].shape == (B, 2 * (spec.num_tokens + 1))
            assert torch.equal(dam, (~d["target_mask"]).int())
            assert torch.equal(n_in, lay.sequence_input[spec.name].long())
            assert (d["tensor"][d["input_mask"] & d["target_mask"]] == PAD).all()
    # the encoder gather reads exactly the input tokens
    buf = lay.build_buffer(tokens, SENTINELS, PAD)
    enc = lay.encoder_tokens(buf)
    for b in range(B):
        n = int(lay.slots.enc_valid[b].sum())
        expect = torch.cat([batch[s.name]["tensor"][b].long()[~batch[s.name]["input_mask"][b]] for s in lay.specs])
        assert torch.equal(enc[b, :n], expect)


# derandomize: the same 40 configurations every run (CI must not turn red on an unrelated change);
# widen the search locally with more examples or another seed when touching the sampler
@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_configs_keep_invariants(data):
    M = data.draw(st.integers(1, 5))
    C = data.draw(st.integers(1, 3))
    specs = []
    for m in range(M):
        kind = data.draw(st.sampled_from(["image", "sequence"]))
        specs.append(ModalitySpec(f"m{m}", kind, data.draw(st.integers(1, 40)),
                                  keep=data.draw(st.sampled_from(["random", "all", "binary"]))))
    alpha = st.sampled_from([0.0, 0.01, 0.5, 1.0, 7.0])

    def table():
        rows = [[data.draw(alpha) for _ in range(C)] for _ in range(M)]
        for c in range(C):
            if all(rows[m][c] == 0 for m in range(M)):
                rows[data.draw(st.integers(0, M - 1))][c] = 1.0
        return {f"m{m}": rows[m] for m in range(M)}

    total = sum(s.num_tokens for s in specs)
    lo = data.draw(st.integers(0, total))
    hi = data.draw(st.integers(lo, total))
    tlo = data.draw(st.integers(0, total))
    thi = data.draw(st.integers(tlo, total))
    weights = data.draw(st.one_of(st.none(), st.lists(st.floats(0.1, 3.0), min_size=C, max_size=C)))
    sampler = TokenBudgetSampler(specs, (lo, hi), (tlo, thi), table(), table(), weights=weights)
    B = data.draw(st.integers(0, 40))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**32)))  # replayable with the example
    lengths = {s.name: torch.randint(0, s.num_tokens + 3, (B,), generator=gen) for s in specs if s.kind == "sequence"}
    lay = sampler.sample(B, seed=data.draw(st.integers(0, 2**40)), lengths=lengths)
    check_budgets(sampler, lay.budgets)
    check_layout(sampler, lay)
    for m, spec in enumerate(specs):
        if spec.kind == "sequence":
            for b in range(B):
                check_sequence(lay.sequence_source[spec.name][b], int(lay.sequence_input[spec.name][b]),
                               int(lay.sequence_target[spec.name][b]), int(lay.budgets.input[b, m]),
                               int(lay.budgets.target[b, m]), min(int(lengths[spec.name][b]), spec.num_tokens))


def test_bad_configs_raise_clear_errors():
    specs = fourm7_specs()
    with pytest.raises(ValueError, match="alphas must be finite and >= 0"):
        TokenBudgetSampler(specs, 128, 128, {**FOURM7_ALPHAS_IN, "rgb": [-0.5, 1.0]}, FOURM7_ALPHAS_TG)
    zero = {k: [0.0, v[1]] for k, v in FOURM7_ALPHAS_IN.items()}
    with pytest.raises(ValueError, match="all-zero alphas"):
        TokenBudgetSampler(specs, 128, 128, zero, FOURM7_ALPHAS_TG)
    with pytest.raises(ValueError, match="alphas must be 0 or at least 1e-30"):
        TokenBudgetSampler(specs, 128, 128, {**FOURM7_ALPHAS_IN, "rgb": [1e-35, 1.0]}, FOURM7_ALPHAS_TG)
    with pytest.raises(ValueError, match="unknown modalities \\['sound'\\]"):
        TokenBudgetSampler(specs, 128, 128, {**FOURM7_ALPHAS_IN, "sound": [1.0, 1.0]}, FOURM7_ALPHAS_TG)
    with pytest.raises(ValueError, match="missing modalities \\['det'\\]"):
        TokenBudgetSampler(specs, 128, 128, {k: v for k, v in FOURM7_ALPHAS_IN.items() if k != "det"}, FOURM7_ALPHAS_TG)
    with pytest.raises(ValueError, match="budgets cannot be met"):
        TokenBudgetSampler(specs, 2000, 128, FOURM7_ALPHAS_IN, FOURM7_ALPHAS_TG)
    with pytest.raises(ValueError, match="0 <= min <= max"):
        TokenBudgetSampler(specs, (100, 50), 128, FOURM7_ALPHAS_IN, FOURM7_ALPHAS_TG)
    with pytest.raises(ValueError, match="same number of mixture components"):
        TokenBudgetSampler(specs, 128, 128, {**FOURM7_ALPHAS_IN, "rgb": [0.5]}, FOURM7_ALPHAS_TG)
    with pytest.raises(ValueError, match="weights has 3 entries"):
        TokenBudgetSampler(specs, 128, 128, FOURM7_ALPHAS_IN, FOURM7_ALPHAS_TG, weights=[1, 1, 1])
    with pytest.raises(ValueError, match="kind must be"):
        ModalitySpec("x", "audio", 4)
    with pytest.raises(ValueError, match="keep must be among"):
        ModalitySpec("x", "sequence", 4, keep="some")
    sampler = fourm7_sampler(128)
    with pytest.raises(ValueError, match=r"lengths\['caption'\] must be an integer tensor of shape \(4,\)"):
        sampler.sample(4, seed=0, lengths={"caption": torch.tensor([1, 2, 3])})
    with pytest.raises(ValueError, match="not sequence modalities"):
        sampler.sample(4, seed=0, lengths={"rgb": torch.tensor([1, 2, 3, 4])})
    lay = sampler.sample(2, seed=0)
    with pytest.raises(ValueError, match="missing modalities"):
        lay.build_buffer({"rgb": torch.zeros(2, 196, dtype=torch.long)}, SENTINELS)
    with pytest.raises(ValueError, match="sentinel ids were given"):
        tokens = {n: torch.zeros(2, 196, dtype=torch.long) for n in ("rgb", "depth", "normal", "semseg", "clip")}
        tokens.update(caption=torch.ones(2, 256, dtype=torch.long), det=torch.ones(2, 256, dtype=torch.long))
        lay.build_buffer(tokens, SENTINELS[:1])


def test_ops_reject_bad_inputs():
    size = torch.tensor([4, 6], dtype=torch.int32)
    img = torch.tensor([True, False])
    a = torch.ones(1, 2)
    with pytest.raises(TypeError, match="alpha_in must be"):
        sample_budgets(3, a.double(), a, None, size, img, (1, 2), (1, 2), 0)
    with pytest.raises(ValueError, match="all zero in mixture component"):
        sample_budgets(3, torch.zeros(1, 2), a, None, size, img, (1, 2), (1, 2), 0)
    with pytest.raises(ValueError, match="must be finite and >= 0"):
        sample_budgets(3, torch.tensor([[1.0, float("nan")]]), a, None, size, img, (1, 2), (1, 2), 0)
    # a positive alpha so small that every log-gamma draw is -inf left no modality to take tokens
    # (an index of -1 into the budgets: a write before the array)
    with pytest.raises(ValueError, match="alpha_tg must be 0 or at least 1e-30"):
        sample_budgets(3, a, torch.tensor([[1e-40, 0.0]]), None, size, img, (1, 2), (1, 2), 0)
    ok = sample_budgets(64, torch.tensor([[1e-30, 0.0]]), a, None, size, img, (2, 2), (1, 2), 0)
    assert ok[1][:, 0].eq(2).all()  # the only modality with alpha > 0 takes every input token
    with pytest.raises(ValueError, match="input token range"):
        sample_budgets(3, a, a, None, size, img, (3, 2), (1, 2), 0)
    with pytest.raises(ValueError, match="is_image has 1 entries"):
        sample_budgets(3, a, a, None, size, img[:1], (1, 2), (1, 2), 0)
    inp = torch.tensor([[5, 0]], dtype=torch.int32)  # 5 inputs from a 4-token grid
    z = torch.zeros_like(inp)
    with pytest.raises(ValueError, match=r"sample 0: a budget outside its modality.*; input_budget \[5, 0\], "
                                         r"target_budget \[0, 0\], seq_input \[0, 0\], seq_target \[0, 0\], slots 8/8$"):
        token_layout(inp, z, z, z, size, img, 8, 8, 0)
    inp = torch.tensor([[3, 0]], dtype=torch.int32)
    with pytest.raises(ValueError, match="more input or target tokens than encoder / decoder slots"):
        token_layout(inp, z, z, z, size, img, 2, 8, 0)
    # two failing samples in different chunks: the error names the first with its own reason
    many = torch.tensor([[1, 0]], dtype=torch.int32).repeat(256, 1)
    many[0], many[255] = torch.tensor([5, 0]), torch.tensor([3, 0])
    zz = torch.zeros_like(many)
    with pytest.raises(ValueError, match="sample 0: a budget outside its modality"):
        token_layout(many, zz, zz, zz, size, img, 2, 8, 0)
    with pytest.raises(ValueError, match="must be \\[batch, 2\\]"):
        token_layout(inp, z[:, :1], z, z, size, img, 8, 8, 0)
    one = torch.ones(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="input_budget must be in \\[0, max_tokens"):
        span_mask(one, one * 9, one, one, 4, 0, 0)
    with pytest.raises(ValueError, match="keep_mode must be"):
        span_mask(one, one, one, one * 3, 4, 0, 0)


def test_opcheck():
    size = torch.tensor([9, 5], dtype=torch.int32)
    img = torch.tensor([True, False])
    a = torch.tensor([[0.5, 1.0], [2.0, 0.0]])
    torch.library.opcheck(torch.ops.fourm_fast.sample_budgets.default, (7, a, a, torch.tensor([1.0, 2.0]), size, img, 2, 5, 1, 4, 3, 0))
    c, i, t = sample_budgets(7, a, a, None, size, img, (2, 5), (1, 4), 3)
    L = torch.full((7,), 5, dtype=torch.int32)
    torch.library.opcheck(torch.ops.fourm_fast.span_mask.default, (L, i[:, 1].contiguous(), t[:, 1].contiguous(), torch.zeros(7, dtype=torch.int32), 5, 1, 3, 0))
    _, n_in, n_tg, _ = span_mask(L, i[:, 1].contiguous(), t[:, 1].contiguous(), torch.zeros(7, dtype=torch.int32), 5, 1, 3)
    s_in = torch.zeros_like(i)
    s_tg = torch.zeros_like(t)
    s_in[:, 1], s_tg[:, 1] = n_in, n_tg
    torch.library.opcheck(torch.ops.fourm_fast.token_layout.default, (i, t, s_in, s_tg, size, img, 5, 4, 3, 0))


def test_compile_sampler_ops():
    size = torch.tensor([9, 7], dtype=torch.int32)
    img = torch.tensor([True, True])
    a = torch.tensor([[0.5, 1.0]])

    def step(seed_offset: int):
        _, i, t = sample_budgets(5, a, a, None, size, img, (4, 4), (3, 3), 1, seed_offset)
        z = torch.zeros_like(i)
        return token_layout(i, t, z, z, size, img, 4, 3, 1, seed_offset).enc_index

    eager = step(2)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(2)
    assert torch.equal(eager, compiled)


@requires_cuda
@pytest.mark.cuda
def test_cuda_equals_cpu():
    cpu = fourm7_sampler(256)
    gpu = fourm7_sampler(256, device="cuda")
    a = cpu.sample(2048, seed=77, lengths={"caption": torch.randint(1, 60, (2048,), generator=torch.Generator().manual_seed(0))})
    b = gpu.sample(2048, seed=77, lengths={"caption": torch.randint(1, 60, (2048,), generator=torch.Generator().manual_seed(0))})
    assert torch.equal(a.budgets.input, b.budgets.input.cpu()) and torch.equal(a.budgets.target, b.budgets.target.cpu())
    assert torch.equal(a.budgets.component, b.budgets.component.cpu())
    for x, y in zip(a.slots, b.slots):
        assert y.is_cuda and torch.equal(x, y.cpu())


def test_fakes_check_dtypes_like_the_kernels():
    # traced with an int64 lengths, span_mask's fake returned int64 outputs for a graph the kernel
    # then refused at run time
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        l, i32 = torch.ones(4, dtype=torch.int64), torch.ones(4, dtype=torch.int32)
        with pytest.raises(TypeError, match="span_mask: lengths must be torch.int32, got torch.int64"):
            torch.ops.fourm_fast.span_mask(l, i32, i32, i32, 8, 0, 0, 0)
        outs = torch.ops.fourm_fast.span_mask(i32, i32, i32, i32, 8, 0, 0, 0)
        assert [o.dtype for o in outs] == [torch.int32] * 4 and outs[0].shape == (4, 18)
        size, img, a = torch.ones(2, dtype=torch.int32), torch.ones(2, dtype=torch.bool), torch.ones(1, 2)
        with pytest.raises(TypeError, match="sample_budgets: alpha_in must be torch.float32"):
            torch.ops.fourm_fast.sample_budgets(3, a.double(), a, None, size, img, 1, 2, 1, 2, 0, 0)
        t = torch.ones(3, 2, dtype=torch.int32)
        with pytest.raises(ValueError, match="token_layout: seq_target must have 2 dimension"):
            torch.ops.fourm_fast.token_layout(t, t, t, t[0], size, img, 8, 8, 0, 0)
