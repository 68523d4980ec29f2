"""Generation: 4M's schedules (parity vectors from the reference), MaskGIT / ROAR / autoregressive
steps, guidance, the key/value cache, and agreement with the restated 4M loop."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fourm_fast.generate import (Generator, TargetSpec, build_chained_schedule, cosine_schedule, linear_schedule,
                                 linear_temp_schedule, onex_temp_schedule, per_sample_table)
from fourm_fast.generate.kv_cache import CachedDecoder, UncachedDecoder
from fourm_fast.model import FourM, ModalityConfig, preset
from fourm_fast.reference.generate import empty_target, generate_4m, image_input

PARITY = json.loads((Path(__file__).parent / "data" / "schedules_4m.json").read_text())
SENTINELS = {"caption": [0] + list(range(40, 50))}


# ---- schedules ---------------------------------------------------------------------------------
@pytest.mark.parametrize("case", PARITY["token_schedules"]["cases"], ids=lambda c: f"{c['n_steps']}x{c['n_tokens']}")
def test_token_schedules_match_4m(case):
    assert cosine_schedule(case["n_steps"], case["n_tokens"]).tolist() == case["cosine"]
    assert linear_schedule(case["n_steps"], case["n_tokens"]).tolist() == case["linear"]
    assert cosine_schedule(case["n_steps"], case["n_tokens"]).sum() == case["n_tokens"]


@pytest.mark.parametrize("i", range(len(PARITY["temperature_schedules"]["cases"])))
def test_temperature_schedules_match_4m_bitwise(i):
    case = PARITY["temperature_schedules"]["cases"][i]
    tokens = np.array(case["token_schedule"])
    if "onex_temp_schedule" in case:
        got, want = onex_temp_schedule(case["max_t"], case["min_t"], tokens, case["power"]), case["onex_temp_schedule"]
    else:
        got, want = linear_temp_schedule(case["temp"], tokens), case["linear_temp_schedule"]
    assert got.tolist() == want  # float64, same operations: equal to the last bit


def test_chained_schedule_matches_4m():
    # the reference's call: caption -> tok_clip (roar), tok_rgb (maskgit), det (autoregressive)
    targets = [TargetSpec("tok_clip@224", "roar", 25, "linear", 5.0, "onex:0.5:0.5", 3.0),
               TargetSpec("tok_rgb@224", "maskgit", 8, "cosine", 3.0, "linear", 2.0),
               TargetSpec("det", "autoregressive", 1, "linear", 1.0, "constant", 1.0)]
    got = build_chained_schedule(["caption"], targets, [196, 196, 256], cfg_grow_conditioning=True)
    assert got == PARITY["chained_generation_schedule_example"]["result"]


def test_per_sample_tables_are_each_samples_own_schedule():
    spec = TargetSpec("x", "maskgit", steps=8, token_schedule="cosine", temperature=3.0, temp_schedule="linear")
    unknown = [196, 7, 0, 100, 196]
    table = per_sample_table(spec, unknown)
    for b, n in enumerate(unknown):
        assert table.counts[:, b].sum() == n
        own = cosine_schedule(8, n) if n else np.zeros(0)
        assert table.counts[: len(own), b].tolist() == list(own)
        if n:
            assert table.temps[: len(own), b].tolist() == linear_temp_schedule(3.0, own).tolist()


@pytest.mark.parametrize("steps,n", [(40, 25), (5, 6), (6, 3), (49, 196), (12, 196)])
def test_per_sample_tables_cap_4m_cosine_overshoot(steps, n):
    """4M's cosine counts can add up past n before a negative last step; the table never commits
    more than is left, never a negative count, and agrees with 4M up to the overshoot."""
    raw = cosine_schedule(steps, n)
    got = per_sample_table(TargetSpec("x", "maskgit", steps=steps), [n]).counts[:, 0]
    assert got.sum() == n and (got >= 0).all()
    over = np.flatnonzero(np.cumsum(raw) > n)
    agree = over[0] if over.size else len(raw)
    assert got[:agree].tolist() == raw[:agree].tolist()


def test_bad_specs_raise():
    with pytest.raises(ValueError, match="scheme"):
        TargetSpec("x", "beam")
    with pytest.raises(ValueError, match="steps"):
        TargetSpec("x", "maskgit", steps=0)
    with pytest.raises(ValueError, match="token schedule"):
        TargetSpec("x", "maskgit", token_schedule="square")
    with pytest.raises(ValueError, match="temperature schedule"):
        TargetSpec("x", "maskgit", temp_schedule="onex:0.5")
    with pytest.raises(ValueError, match="temperature"):
        TargetSpec("x", "maskgit", temperature=-1.0)
    with pytest.raises(ValueError, match="n_tokens"):
        cosine_schedule(4, -1)


# ---- a small random model ----------------------------------------------------------------------
def _model(qk_norm: bool = False, seed: int = 0, sharp: bool = True) -> FourM:
    torch.manual_seed(seed)
    mods = [ModalityConfig("rgb", "image", 64, grid=4), ModalityConfig("depth", "image", 37, grid=5),
            ModalityConfig("caption", "sequence", 50, max_length=12)]
    cfg = preset("tiny", mods, dim=64, encoder_depth=2, decoder_depth=2, num_heads=2, qk_norm=qk_norm)
    model = FourM(cfg).eval()
    if sharp:  # larger weights: decisive logits, so greedy decoding has no near-ties
        for p in model.parameters():
            p.data.normal_(0, 0.3)
    return model


@pytest.fixture(scope="module")
def model():
    return _model()


def _run(model, targets, seed=0, B=3, use_cache=True, rgb_seed=1, caption=None):
    g = Generator(model, SENTINELS, use_cache=use_cache)
    st = g.new_state(B)
    st.set_image("rgb", torch.randint(0, 64, (B, 16), generator=torch.Generator().manual_seed(rgb_seed)))
    if caption is not None:
        st.set_sequence("caption", caption)
    g.generate(st, targets, seed=seed)
    return g, st


CHAIN = [TargetSpec("depth", "maskgit", steps=4, temperature=2.0, temp_schedule="linear", cfg_scale=2.0),
         TargetSpec("caption", "autoregressive", temperature=1.0, cfg_scale=1.5, top_p=0.9)]


def test_same_seed_same_tokens_other_seed_other_tokens(model):
    _, a = _run(model, CHAIN, seed=3)
    _, b = _run(model, CHAIN, seed=3)
    _, c = _run(model, CHAIN, seed=4)
    for n in ("depth", "caption"):
        assert torch.equal(a.tokens[n], b.tokens[n]) and torch.equal(a.known[n], b.known[n])
    assert not torch.equal(a.tokens["depth"], c.tokens["depth"])


@pytest.mark.parametrize("scheme", ["maskgit", "roar"])
def test_image_targets_fully_decided_and_in_range(model, scheme):
    _, st = _run(model, [TargetSpec("depth", scheme, steps=7, temperature=1.0, cfg_scale=3.0)], B=4)
    assert bool(st.known["depth"].all())
    assert int(st.tokens["depth"].min()) >= 0 and int(st.tokens["depth"].max()) < 37


def test_sequence_tokens_in_range(model):
    _, st = _run(model, [TargetSpec("caption", "autoregressive", temperature=1.5)], B=5)
    t = st.tokens["caption"]
    assert int(t.min()) >= 0 and int(t.max()) < 50
    for b in range(5):  # known is a prefix; [S_2] never lands in the sequence
        k = st.known["caption"][b]
        assert not bool(k[int(k.sum()):].any())
        assert SENTINELS["caption"][2] not in st.sequence("caption", b)


def _record_commits(monkeypatch):
    """Each commit of the generator: (positions, candidates, chosen mask), candidates being the
    positions still unknown when the step ran."""
    from fourm_fast.generate.state import GenerationState

    seen = []
    orig = GenerationState.commit

    def commit(self, name, positions, values, mask):
        seen.append((positions.clone(), ~self.known[name].gather(1, positions), mask.clone()))
        return orig(self, name, positions, values, mask)

    monkeypatch.setattr(GenerationState, "commit", commit)
    return seen


def _record_sampling(monkeypatch):
    """Each sample_tokens call of the generator: its keyword arguments and the probs it returned."""
    import fourm_fast.generate.sampler as sampler

    calls = []
    real = sampler.sample_tokens

    def spy(logits, **kw):
        tokens, probs = real(logits, **kw)
        calls.append(dict(kw, rows=logits.shape[0], probs=probs.clone()))
        return tokens, probs

    monkeypatch.setattr(sampler, "sample_tokens", spy)
    return calls


def _own_schedules(kind: str, steps: int, unknown: list[int]) -> list[np.ndarray]:
    """Each sample's 4M schedule over its own unknown tokens, written out from the parity-tested
    schedule functions (not through per_sample_table, which the generator itself calls)."""
    out = [(cosine_schedule if kind == "cosine" else linear_schedule)(steps, n) for n in unknown]
    for n, own in zip(unknown, out):  # these sizes stay clear of 4M's cosine overshoot
        assert (np.cumsum(own) <= n).all() and own.sum() == n
    return out


def _partly_known_depth(model, known_rows: list[slice]):
    g = Generator(model, SENTINELS)
    B = len(known_rows)
    st = g.new_state(B)
    gen = torch.Generator().manual_seed(4)
    st.set_image("rgb", torch.randint(0, 64, (B, 16), generator=gen))
    known = torch.zeros(B, 25, dtype=torch.bool)
    for b, rows in enumerate(known_rows):
        known[b, rows] = True
    st.set_image("depth", torch.randint(0, 37, (B, 25), generator=gen), known=known)
    return g, st, known, [25 - int(k.sum()) for k in known]


@pytest.mark.parametrize("scheme", ["maskgit", "roar"])
def test_per_sample_counts_honoured(model, monkeypatch, scheme):
    """Samples with different numbers of given tokens each follow their own schedule: MaskGIT the
    token schedule asked for, ROAR 4M's linear one whatever is asked (as 4M's chained schedules)."""
    seen = _record_commits(monkeypatch)
    g, st, known, unknown = _partly_known_depth(model, [slice(0, 0), slice(0, 5), slice(0, 24)])
    assert unknown == [25, 20, 1]
    g.generate(st, [TargetSpec("depth", scheme, steps=6, token_schedule="cosine", temperature=1.0)])
    own = _own_schedules("cosine" if scheme == "maskgit" else "linear", 6, unknown)
    S = max(len(o) for o in own)
    want = [[int(o[s]) if s < len(o) else 0 for o in own] for s in range(S)]
    assert [m.sum(1).tolist() for _, _, m in seen] == [w for w in want if any(w)]
    assert bool(st.known["depth"].all())
    assert torch.equal(st.known["depth"] & known, known)


def test_maskgit_commits_each_samples_most_confident_candidates(model, monkeypatch):
    """Each MaskGIT step commits, per sample, its own count of the still-unknown positions whose
    sampled tokens had the highest probability (ties to the lower position), and samples its rows
    at that sample's own temperature of the step (linear schedule over its own counts)."""
    commits = _record_commits(monkeypatch)
    calls = _record_sampling(monkeypatch)
    g, st, _, unknown = _partly_known_depth(model, [slice(0, 0), slice(0, 5), slice(3, 24)])
    assert unknown == [25, 20, 4]
    g.generate(st, [TargetSpec("depth", "maskgit", steps=6, temperature=3.0, temp_schedule="linear")], seed=5)
    own = _own_schedules("cosine", 6, unknown)
    steps = [s for s in range(max(len(o) for o in own)) if any(s < len(o) and o[s] for o in own)]
    assert len(commits) == len(calls) == len(steps)
    for s, (positions, candidates, chosen), call in zip(steps, commits, calls):
        B, Q = positions.shape
        probs = call["probs"].reshape(B, Q)
        temps = call["temperature"].reshape(B, Q)
        for b in range(B):
            count = int(own[b][s]) if s < len(own[b]) else 0
            ranked = sorted((j for j in range(Q) if candidates[b, j]), key=lambda j: (-float(probs[b, j]), j))
            want = torch.zeros(Q, dtype=torch.bool)
            want[ranked[:count]] = True
            assert torch.equal(chosen[b], want), (s, b)
            if count:
                t = float(np.float32(linear_temp_schedule(3.0, own[b])[s]))
                assert temps[b].tolist() == [t] * Q, (s, b)
    # the samples' temperatures differ within a step, so a row order mixed up across samples shows
    assert any(len({float(call["temperature"].reshape(3, -1)[b, 0]) for b in range(3)}) > 1 for call in calls[:3])


@pytest.mark.parametrize("scheme", ["maskgit", "autoregressive"])
def test_filters_reach_sample_tokens_in_its_convention(model, monkeypatch, scheme):
    """TargetSpec takes 4M's conventions (top_p 0 or 1 is off); the op's "off" is top_p 1."""
    calls = _record_sampling(monkeypatch)
    name = "depth" if scheme == "maskgit" else "caption"
    for top_p, top_k, min_p, want_p in ((0.0, 0, 0.0, 1.0), (1.0, 5, 0.2, 1.0), (0.9, 0.25, 0.0, 0.9)):
        calls.clear()
        _run(model, [TargetSpec(name, scheme, steps=2, temperature=1.0, top_p=top_p, top_k=top_k, min_p=min_p)], B=2)
        assert calls and all((c["top_p"], c["top_k"], c["min_p"]) == (want_p, top_k, min_p) for c in calls)


def test_given_tokens_are_kept(model):
    g = Generator(model, SENTINELS)
    st = g.new_state(2)
    st.set_image("rgb", torch.randint(0, 64, (2, 16)))
    given = torch.randint(0, 37, (2, 25))
    known = torch.rand(2, 25) < 0.5
    st.set_image("depth", given, known=known)
    g.generate(st, [TargetSpec("depth", "maskgit", steps=3)])
    assert torch.equal(st.tokens["depth"][known], given[known])


def test_chained_targets_see_earlier_outputs(model, monkeypatch):
    encoded = []
    orig = FourM.encode

    def encode(self, b):
        encoded.append((b.enc_modality.clone(), b.enc_valid.clone()))
        return orig(self, b)

    monkeypatch.setattr(FourM, "encode", encode)
    g, st = _run(model, [TargetSpec("depth", "roar", steps=2), TargetSpec("caption", "autoregressive")], B=2)
    mod, valid = encoded[-1]  # the caption's encoder pass
    depth_id = model.modalities.index("depth")
    assert bool(((mod == depth_id) & valid).sum(1).eq(25).all())  # every depth token is an input now


def test_kv_cache_equals_full_decoding_in_fp32():
    """Same tokens with and without the cache (greedy and sampled, guided), and per-step logits
    that agree to float32 rounding (the GEMMs differ in shape, so bitwise equality is not promised)."""
    for qk in (False, True):
        model = _model(qk_norm=qk, seed=5)
        for temp, cfg in ((0.0, 1.0), (1.0, 1.0), (1.0, 2.5), (0.7, 3.0)):
            spec = [TargetSpec("caption", "autoregressive", temperature=temp, cfg_scale=cfg)]
            _, a = _run(model, spec, seed=11, B=4, use_cache=True)
            _, b = _run(model, spec, seed=11, B=4, use_cache=False)
            assert torch.equal(a.tokens["caption"], b.tokens["caption"]) and torch.equal(a.known["caption"], b.known["caption"])
        g = Generator(model, SENTINELS)
        st = g.new_state(3)
        st.set_image("rgb", torch.randint(0, 64, (3, 16)))
        ctx, valid = g._encode(st, [{"rgb"}])
        c, u = CachedDecoder(model, "caption", ctx, valid, 11), UncachedDecoder(model, "caption", ctx, valid, 11)
        with torch.no_grad():
            for _ in range(11):
                ids = torch.randint(0, 50, (3,))
                lc, lu = c.step(ids), u.step(ids)
                torch.testing.assert_close(lc, lu, rtol=1e-5, atol=1e-5)


def test_kv_cache_in_bfloat16_streams_weights_through_rows_linear(monkeypatch):
    """A bf16 model decodes its steps through rows_linear (the threshold lowered so this small
    model's weights take it), and the cached steps are as close to a float32 run of the same
    weights as 4M's way (the whole prefix re-run in bf16) is: FlashAttention's rule, error at most
    twice the low-precision baseline's plus eps."""
    import fourm_fast.nn.few_rows as few_rows

    monkeypatch.setattr(few_rows, "HALF_ROWS_MIN_BYTES", 0)
    calls = []
    real = few_rows.rows_linear
    monkeypatch.setattr(few_rows, "rows_linear", lambda x, w: calls.append(x.dtype) or real(x, w))
    model = _model(seed=5).to(torch.bfloat16)
    exact = copy.deepcopy(model).float()  # the same (bf16-representable) weights in float32
    st = None
    outs = {}
    for name, m in (("bf16", model), ("fp32", exact)):
        g = Generator(m, SENTINELS)
        st = g.new_state(3)
        st.set_image("rgb", torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(2)))
        ctx, valid = g._encode(st, [{"rgb"}])
        outs[name] = (CachedDecoder(m, "caption", ctx, valid, 11), UncachedDecoder(m, "caption", ctx, valid, 11))
    ids_gen = torch.Generator().manual_seed(8)
    cached_err = baseline_err = 0.0
    with torch.no_grad():
        for _ in range(11):
            ids = torch.randint(0, 50, (3,), generator=ids_gen)
            cached, uncached = (d.step(ids) for d in outs["bf16"])
            ref = outs["fp32"][1].step(ids).double()
            assert cached.dtype == torch.bfloat16
            cached_err = max(cached_err, (cached.double() - ref).abs().max().item())
            baseline_err = max(baseline_err, (uncached.double() - ref).abs().max().item())
    assert calls and set(calls) == {torch.bfloat16}
    assert cached_err <= 2 * baseline_err + 1e-3, (cached_err, baseline_err)


def test_autoregressive_stops_per_sample_at_end_sentinel(model, monkeypatch):
    """Row b emits [S_2] at step b + 1: its sequence is the b + 1 tokens before it."""
    s2 = SENTINELS["caption"][2]
    calls = {"t": 0}

    def logits(self, name, y, P, weights):
        t = calls["t"]
        calls["t"] += 1
        out = torch.full((y.shape[0], 50), -30.0)
        for r in range(y.shape[0]):
            out[r, s2 if t == r % 3 + 1 else 7 + t] = 30.0
        return out

    monkeypatch.setattr(Generator, "_guided_logits", logits)
    _, st = _run(model, [TargetSpec("caption", "autoregressive", temperature=1.0)], B=3)
    assert [st.sequence("caption", b) for b in range(3)] == [[7], [7, 8], [7, 8, 9]]
    assert calls["t"] == 4  # stopped once every sample ended


def test_sentinel_ids_outside_the_vocabulary_are_refused(model):
    # [S_1] goes into the cached decoder step unchecked: an id past the vocabulary was clamped
    vocab = model.cfg.modality("caption").vocab_size
    for bad in ([0, vocab, 41], [0, -1, 41], [0, 40.0, 41]):
        with pytest.raises(ValueError, match=r"sentinel ids .* must be ints in \[0, "):
            Generator(model, {"caption": bad})
    Generator(model, {"caption": [0, vocab - 1, 41]})
    Generator(model, {"caption": list(np.arange(40, 50))})  # numpy integers are ints too


def test_guidance_scale_one_equals_unguided(model):
    _, a = _run(model, [TargetSpec("depth", "maskgit", steps=4, cfg_scale=1.0, cfg_conditions=["rgb"])], seed=2)
    _, b = _run(model, [TargetSpec("depth", "maskgit", steps=4)], seed=2)
    assert torch.equal(a.tokens["depth"], b.tokens["depth"])
    # forced through the two-pass path: u + 1 (c - u) rounds to c, so the draws match
    g, c = _run(model, [TargetSpec("depth", "maskgit", steps=4, guidance=[(["rgb"], 1.0)])], seed=2)
    assert g.stats["sampled_rows"] == _run(model, [TargetSpec("depth", "maskgit", steps=4)], seed=2)[0].stats["sampled_rows"]
    assert torch.equal(c.tokens["depth"], b.tokens["depth"])


def test_guidance_batches_passes_into_one_forward(model, monkeypatch):
    sizes = []
    orig = FourM.decode

    def decode(self, b, context, valid):
        sizes.append(b.dec_valid.shape[0])
        return orig(self, b, context, valid)

    monkeypatch.setattr(FourM, "decode", decode)
    g, st = _run(model, [TargetSpec("depth", "maskgit", steps=3, guidance=[(["rgb"], 2.0), (["caption"], 1.0)])],
                 B=2, caption=[5, 6, 3])
    assert set(sizes) == {3 * 2} and len(sizes) == 3  # c_rgb, c_caption, u stacked: one decoder pass per step
    assert bool(st.known["depth"].all())
    _, one = _run(model, [TargetSpec("depth", "maskgit", steps=3, guidance=[(["rgb"], 2.0)])], seed=7)
    _, cfg = _run(model, [TargetSpec("depth", "maskgit", steps=3, cfg_scale=2.0, cfg_conditions=["rgb"])], seed=7)
    assert torch.equal(one.tokens["depth"], cfg.tokens["depth"])


# the head's three paths: F.linear (3 rows), rows_linear (4 rows of a 4 MiB float32 weight), the
# logits buffer (40 rows)
@pytest.mark.parametrize("rows,vocab,path", [(3, 37, "F.linear"), (4, 16384, "rows_linear"), (40, 37, "buffer")])
def test_guidance_in_hidden_space_equals_guidance_of_the_logits(monkeypatch, rows, vocab, path):
    """u + sum_i w_i (c_i - u) taken before the head equals it taken on the logits (in float64
    here), for 4M's bias-free head and for an affine one (the weights add up to 1, so a bias
    passes through)."""
    import torch.nn as nn
    import torch.nn.functional as F

    import fourm_fast.nn.few_rows as few_rows

    streamed = []
    real = few_rows.rows_linear
    monkeypatch.setattr(few_rows, "rows_linear", lambda x, w: streamed.append(x.shape[0]) or real(x, w))
    model = _model(seed=3)
    g = Generator(model, SENTINELS)
    gen = torch.Generator().manual_seed(6)
    weights = [2.5, -0.75]
    y = torch.randn(3 * rows, 64, generator=gen)
    for bias in (False, True):
        head = nn.Linear(64, vocab, bias=bias)
        with torch.no_grad():
            head.weight.normal_(0, 0.3, generator=gen)
            if bias:
                head.bias.normal_(0, 3.0, generator=gen)
        model.decoder_embeddings["depth"].to_logits = head
        with torch.no_grad():
            got = g._guided_logits("depth", y, 3, weights)
            logits = F.linear(y.double(), head.weight.double(), head.bias.double() if bias else None)
        u = logits[-rows:]
        want = u + sum(w * (logits[i * rows:(i + 1) * rows] - u) for i, w in enumerate(weights))
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    assert streamed == ([rows, rows] if path == "rows_linear" else [])


def test_multi_condition_guidance_values(model):
    """guidance [(rgb, 2), (caption, -0.5)] is u + 2 (c_rgb - u) - 0.5 (c_caption - u), each c_i
    seeing its own condition only: a greedy one-step MaskGIT against logits of 4M-format batches
    built with the restated 4M loop's helpers (the condition left out shown as 4M empties it)."""
    from fourm_fast.reference.generate import _image_logits, _uncond, sequence_input

    B, caption = 3, [5, 6, 3]
    rgb = torch.randint(0, 64, (B, 16), generator=torch.Generator().manual_seed(1))
    g = Generator(model, SENTINELS)
    st = g.new_state(B)
    st.set_image("rgb", rgb)
    st.set_sequence("caption", caption)
    g.generate(st, [TargetSpec("depth", "maskgit", steps=1, temperature=0.0, guidance=[(["rgb"], 2.0), (["caption"], -0.5)])])
    ids = torch.zeros(B, 12, dtype=torch.int64)
    ids[:, :3] = torch.tensor(caption)
    md = {"rgb": image_input(rgb), "caption": sequence_input(ids), "depth": empty_target(model, "depth", B, SENTINELS)}
    pos = torch.arange(25).expand(B, 25)
    with torch.no_grad():
        u, c_rgb, c_cap = (_image_logits(model, _uncond(md, model, hide, SENTINELS), "depth", pos)
                           for hide in (["rgb", "caption"], ["caption"], ["rgb"]))
    guided = u + 2.0 * (c_rgb - u) - 0.5 * (c_cap - u)
    expected = guided.argmax(-1)
    # Exact wherever the best logit leads the runner-up by more than float rounding of the two
    # computations; on a near-tie (another BLAS may order sums differently) either token is right.
    top2 = guided.topk(2, dim=-1).values
    decisive = (top2[..., 0] - top2[..., 1]) > 1e-4
    assert decisive.float().mean() > 0.9
    assert torch.equal(st.tokens["depth"][decisive], expected[decisive])
    picked = guided.gather(-1, st.tokens["depth"][..., None]).squeeze(-1)
    assert bool((picked >= top2[..., 0] - 1e-4).all())
    # the caption's term matters here: dropping it would change tokens, so the check can fail
    assert not torch.equal(expected, (u + 2.0 * (c_rgb - u)).argmax(-1))


def test_greedy_generation_matches_the_4m_loop(model):
    """Greedy decoding is deterministic, so fourm_fast and the restated 4M loop must agree token for
    token: guided autoregressive caption, then a guided one-step MaskGIT depth seeing it."""
    B = 3
    rgb = torch.randint(0, 64, (B, 16), generator=torch.Generator().manual_seed(1))
    targets = [TargetSpec("caption", "autoregressive", temperature=0.0, cfg_scale=2.0, cfg_conditions=["rgb"]),
               TargetSpec("depth", "maskgit", steps=1, temperature=0.0, cfg_scale=1.5, cfg_conditions=["rgb", "caption"])]
    g = Generator(model, SENTINELS)
    st = g.new_state(B)
    st.set_image("rgb", rgb)
    g.generate(st, targets)
    md = {"rgb": image_input(rgb)}
    for t in targets:
        md[t.name] = empty_target(model, t.name, B, SENTINELS)
    schedule = build_chained_schedule(["rgb"], targets, [0, 25])
    schedule[1]["cfg_cond_domains"] = ["rgb", "caption"]
    out = generate_4m(model, md, schedule, SENTINELS)
    for b in range(B):
        n = int(st.known["caption"][b].sum())
        assert st.sequence("caption", b) == out["caption"]["tensor"][b, :n].tolist()
        assert bool(out["caption"]["input_mask"][b, n:].all())
    assert torch.equal(st.tokens["depth"], out["depth"]["tensor"])


def test_4m_loop_commits_the_most_confident_samples(model, monkeypatch):
    """The restated 4M loop (the benchmark's baseline) keeps, at each sampled MaskGIT step, the
    step's count of decoded positions whose draws had the highest probability (4M's top-k); its
    greedy comparison above cannot see this, every probability being 1 at temperature 0."""
    import fourm_fast.reference.generate as ref

    seen, sample, step_fn = [], ref._sample, ref._image_step

    def recording_sample(logits, *args):
        samples, probs = sample(logits, *args)
        seen[-1]["probs"] = probs.clone()
        return samples, probs

    def recording_step(model_, mod_dict, step, *args):
        seen.append({"before": mod_dict[step["target_domain"]]["input_mask"].clone(), "count": step["num_tokens"]})
        out = step_fn(model_, mod_dict, step, *args)
        seen[-1]["after"] = out[step["target_domain"]]["input_mask"].clone()
        return out

    monkeypatch.setattr(ref, "_sample", recording_sample)
    monkeypatch.setattr(ref, "_image_step", recording_step)
    B = 3
    targets = [TargetSpec("depth", "maskgit", steps=4, temperature=2.0)]
    md = {"rgb": image_input(torch.randint(0, 64, (B, 16), generator=torch.Generator().manual_seed(2))),
          "depth": empty_target(model, "depth", B, SENTINELS)}
    generate_4m(model, md, build_chained_schedule(["rgb"], targets, [25]), SENTINELS, seed=3)
    assert len(seen) == 4
    for s in seen:
        candidates = [s["before"][b].nonzero().flatten() for b in range(B)]  # undecided, in position order
        probs = s["probs"].reshape(B, -1)
        for b in range(B):
            ranked = sorted(range(len(candidates[b])), key=lambda j: -float(probs[b, j]))
            want = sorted(candidates[b][ranked[:s["count"]]].tolist())
            assert (s["before"][b] & ~s["after"][b]).nonzero().flatten().tolist() == want


def test_4m_loop_runs_every_scheme(model):
    """The restated loop (the benchmark's baseline) completes sampled MaskGIT, ROAR and guided
    autoregressive targets."""
    B = 2
    targets = [TargetSpec("depth", "roar", steps=5, temperature=1.0, cfg_scale=2.0),
               TargetSpec("caption", "autoregressive", temperature=1.0, cfg_scale=2.0, top_p=0.8)]
    md = {"rgb": image_input(torch.randint(0, 64, (B, 16)))}
    for t in targets:
        md[t.name] = empty_target(model, t.name, B, SENTINELS)
    out = generate_4m(model, md, build_chained_schedule(["rgb"], targets, [25, 0], True), SENTINELS, top_p=0.8)
    assert not bool(out["depth"]["target_mask"].logical_not().any())
    assert int(out["depth"]["tensor"].max()) < 37


def test_bad_generation_requests_raise(model):
    g = Generator(model, SENTINELS)
    st = g.new_state(2)
    st.set_image("rgb", torch.randint(0, 64, (2, 16)))
    with pytest.raises(ValueError, match="sequence modality"):
        g.generate(st, [TargetSpec("caption", "maskgit")])
    with pytest.raises(ValueError, match="image modality"):
        g.generate(st, [TargetSpec("depth", "autoregressive")])
    with pytest.raises(ValueError, match="sentinel"):
        Generator(model).generate(g.new_state(1), [TargetSpec("caption", "autoregressive")])
    with pytest.raises(ValueError, match="neither given .* nor generated"):
        g.generate(st, [TargetSpec("depth", "maskgit", cfg_scale=2.0, cfg_conditions=["caption"])])
    with pytest.raises(ValueError, match=r"guidance names \['normal'\], which the model's encoder does not take"):
        g.generate(st, [TargetSpec("depth", "maskgit", cfg_scale=2.0, cfg_conditions=["normal"])])
    with pytest.raises(ValueError, match="guide itself"):
        g.generate(st, [TargetSpec("depth", "maskgit", cfg_scale=2.0, cfg_conditions=["depth"])])
    with pytest.raises(ValueError, match=r"tokens must be \(B, 25\) or \(B, 5, 5\)"):
        st.set_image("depth", torch.zeros(2, 24, dtype=torch.long))
    with pytest.raises(ValueError, match="outside"):
        st.set_image("depth", torch.full((2, 25), 37))
    with pytest.raises(ValueError, match="exceeds max_length"):
        st.set_sequence("caption", list(range(13)))
    with pytest.raises(KeyError, match="unknown modality"):
        st.add_empty("semseg")
    with pytest.raises(ValueError, match="at least"):
        Generator(model, {"caption": [0, 40]})


def test_guidance_on_what_cannot_guide_raises_before_anything_is_generated(model):
    g = Generator(model, SENTINELS)
    st = g.new_state(2)
    st.set_image("rgb", torch.randint(0, 64, (2, 16)))
    before = {n: t.clone() for n, t in st.tokens.items()}
    # caption comes after depth in the chain: guiding depth by it used to pass (every target is
    # added to the state up front) and ran a second pass that changed nothing
    with pytest.raises(ValueError, match=r"target 'depth': guidance names \['caption'\], which are neither given"):
        g.generate(st, [TargetSpec("depth", "maskgit", cfg_scale=3.0, cfg_conditions=["caption"]),
                        TargetSpec("caption", "autoregressive")])
    with pytest.raises(ValueError, match="neither given"):  # multi-condition guidance too
        g.generate(st, [TargetSpec("depth", "maskgit", guidance=[(["rgb"], 2.0), (["caption"], 1.0)]),
                        TargetSpec("caption", "autoregressive")])
    # a bad setting of the last target leaves the first ungenerated
    with pytest.raises(ValueError, match="encoder does not take"):
        g.generate(st, [TargetSpec("depth", "maskgit"), TargetSpec("caption", "autoregressive", cfg_scale=2.0,
                                                                    cfg_conditions=["normal"])])
    with pytest.raises(ValueError, match=r"targets \['depth'\] appear more than once"):
        g.generate(st, [TargetSpec("depth", "maskgit"), TargetSpec("depth", "roar")])
    assert set(st.tokens) == set(before) and all(torch.equal(st.tokens[n], before[n]) for n in before)
    # given tokens with none known cannot guide either
    st.set_image("depth", torch.zeros(25, dtype=torch.long), known=torch.zeros(25, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"guidance names \['depth'\]"):
        g.generate(st, [TargetSpec("caption", "autoregressive", cfg_scale=2.0, cfg_conditions=["depth"])])
    # guiding by an earlier target of the same chain is fine
    g.generate(st, [TargetSpec("caption", "autoregressive", max_length=3),
                    TargetSpec("depth", "maskgit", steps=2, cfg_scale=2.0, cfg_conditions=["caption"])])
    assert bool(st.known["depth"].all())


def test_a_sequence_target_with_tokens_raises_before_the_chain_changes_the_state(model):
    g = Generator(model, SENTINELS)
    st = g.new_state(2)
    st.set_image("rgb", torch.randint(0, 64, (2, 16)))
    st.set_sequence("caption", [5, 6, 7])
    before = {n: (st.tokens[n].clone(), st.known[n].clone()) for n in st.tokens}
    # the caption used to be refused only after depth had been generated into the state
    with pytest.raises(ValueError, match="target 'caption' already has tokens"):
        g.generate(st, [TargetSpec("depth", "maskgit", steps=1), TargetSpec("caption", "autoregressive")])
    assert set(st.tokens) == set(before)
    assert all(torch.equal(st.tokens[n], t) and torch.equal(st.known[n], k) for n, (t, k) in before.items())


def test_new_state_wants_a_whole_batch_size(model):
    g = Generator(model, SENTINELS)
    for bad in (2.5, 0, True, "2"):  # 2.5 was accepted
        with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
            g.new_state(bad)
    assert g.new_state(np.int64(2)).B == 2


def test_onex_schedules_with_numbers_4m_cannot_use_raise_in_the_spec():
    for kind in ("onex:0.5:0.5", "onex:0:1", "onex:0.01:2", "onex:1:0.25", "onex:0.5:-1"):  # settings 4M computes pass
        TargetSpec("depth", temp_schedule=kind)
    # these passed the spec and gave NaN or inf temperatures to sample_tokens in the middle of a chain
    for kind in ("onex:-1:nan", "onex:nan:0.5", "onex:inf:0.5", "onex:-0.5:0.5", "onex:0.5:0", "onex:0.5:inf"):
        with pytest.raises(ValueError, match="MIN_T must be finite and >= 0 and POWER finite and not 0"):
            TargetSpec("depth", temp_schedule=kind)


def test_target_spec_checks_and_normalises_its_settings():
    t = TargetSpec("rgb", steps=np.int64(4), temperature=np.float32(0.5), top_k=np.int64(5), top_p=np.float64(0.9),
                   cfg_scale=np.float32(2.0), max_length=np.int64(3))
    assert (type(t.steps), type(t.temperature), type(t.top_k), type(t.top_p), type(t.cfg_scale), type(t.max_length)) == \
        (int, float, int, float, float, int)
    assert TargetSpec("rgb", top_k=7.0).top_k == 7 and TargetSpec("rgb", top_k=0.25).top_k == 0.25
    assert TargetSpec("rgb", temperature=torch.tensor(0.5)).temperature == 0.5
    assert TargetSpec("caption", "autoregressive", steps=None).steps is None  # ignored there
    for kwargs, message in [({"top_p": 90}, "top_p must be in \\[0, 1\\]"), ({"top_p": -0.3}, "top_p"),
                            ({"top_p": float("nan")}, "top_p"), ({"top_k": 2.5}, "whole count"),
                            ({"top_k": -1}, "top_k"), ({"min_p": 1.5}, "min_p"), ({"max_length": 0}, "max_length must be >= 1"),
                            ({"max_length": 2.0}, "max_length must be an integer"), ({"steps": 2.0}, "steps must be an integer"),
                            ({"temperature": "1"}, "temperature must be a number"), ({"cfg_conditions": "rgb"}, "a list of modality names"),
                            ({"guidance": [("rgb", 2.0)]}, "a list of modality names"), ({"top_k": True}, "top_k must be a number")]:
        with pytest.raises(ValueError, match=message):
            TargetSpec("depth", **kwargs)


def test_state_accepts_the_documented_shapes_and_refuses_others(model):
    g = Generator(model, SENTINELS)
    st = g.new_state(3)
    grid = torch.arange(25).reshape(5, 5)
    for value in (grid, grid.reshape(25), grid[None], grid.reshape(1, 25), grid.expand(3, 5, 5), grid.reshape(1, 25).expand(3, 25)):
        st.set_image("depth", value)
        assert torch.equal(st.tokens["depth"], grid.reshape(1, 25).expand(3, 25)) and bool(st.known["depth"].all())
    known = torch.rand(3, 25) < 0.5  # one grid for all, a known mask per sample
    st.set_image("depth", grid, known=known)
    assert torch.equal(st.known["depth"], known)
    st.set_image("depth", grid.reshape(1, 25).expand(3, 25), known=known[0].reshape(5, 5))
    assert torch.equal(st.known["depth"], known[:1].expand(3, 25))
    # an 8 x 8 grid for a 5 x 5 modality holds 64 ids, not 3 x 25: it used to be cut into strips
    # across the samples when the counts happened to divide
    for bad in (torch.zeros(10, 10, dtype=torch.long), torch.zeros(3, 5, 6, dtype=torch.long), torch.zeros(2, 25, dtype=torch.long),
                torch.zeros(5, 5, 3, dtype=torch.long), torch.zeros(75, dtype=torch.long)):
        with pytest.raises(ValueError, match=r"depth: tokens must be \(B, 25\) or \(B, 5, 5\) with B = 3"):
            st.set_image("depth", bad)
    with pytest.raises(ValueError, match="must be integer ids, got torch.float32"):
        st.set_image("depth", grid.float())
    with pytest.raises(ValueError, match="known must be"):
        st.set_image("depth", grid, known=torch.ones(2, 25, dtype=torch.bool))
    st.set_sequence("caption", torch.tensor([5, 6, 3]))
    assert st.sequence("caption", 2) == [5, 6, 3]
    st.set_sequence("caption", np.array([[5, 6], [7, 8], [9, 3]]))
    assert [st.sequence("caption", b) for b in range(3)] == [[5, 6], [7, 8], [9, 3]]
    st.set_sequence("caption", [torch.tensor([5]), [6, 7], np.array([8, 9, 3])])
    assert [st.sequence("caption", b) for b in range(3)] == [[5], [6, 7], [8, 9, 3]]
    st.set_sequence("caption", list(torch.tensor([5, 6, 3])))  # a list of 0-d tensors is one sequence
    assert st.sequence("caption", 0) == [5, 6, 3]
    with pytest.raises(ValueError, match="not a mix"):
        st.set_sequence("caption", [5, [6, 7], 3])
    with pytest.raises(ValueError, match="must be integers"):
        st.set_sequence("caption", [5.5, 3])


def test_encoder_runs_once_per_input_change(model):
    """Autoregressive decoding encodes once per pass for the whole sequence (inputs do not change);
    MaskGIT encodes once per pass per step that commits tokens."""
    g, st = _run(model, [TargetSpec("caption", "autoregressive", temperature=1.0, cfg_scale=2.0)], B=2)
    assert g.stats["encoder_passes"] == 2 and g.stats["decoder_passes"] >= 1
    g, st = _run(model, [TargetSpec("depth", "maskgit", steps=40, token_schedule="cosine")], B=2)
    committing = int((per_sample_table(TargetSpec("depth", "maskgit", steps=40), [25, 25]).counts.sum(1) > 0).sum())
    assert committing < 40 and g.stats["encoder_passes"] == committing == g.stats["decoder_passes"]


def test_one_generator_many_states_matches_fresh_generators(model):
    g = Generator(model, SENTINELS)
    outs = []
    for i in range(4):
        st = g.new_state(2)
        st.set_image("rgb", torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(i)))
        outs.append(g.generate(st, [TargetSpec("depth", "maskgit", steps=2)], seed=0).tokens["depth"])
    for i in range(4):
        fresh = Generator(model, SENTINELS)
        st = fresh.new_state(2)
        st.set_image("rgb", torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(i)))
        assert torch.equal(fresh.generate(st, [TargetSpec("depth", "maskgit", steps=2)], seed=0).tokens["depth"], outs[i])


def test_onex_steps_past_the_token_count_keep_its_coolest_temperature():
    # 4M's onex gives one temperature per token; the steps past them committed tokens at
    # spec.temperature, the hottest value of the schedule
    table = per_sample_table(TargetSpec("rgb", steps=32, temp_schedule="onex:0.1:0.5", temperature=3.0), [16])
    committing = table.temps[table.counts[:, 0] > 0, 0]
    assert table.counts[:, 0].sum() == 16
    assert np.all(np.diff(committing) <= 1e-12), committing
    assert committing[-1] == pytest.approx(0.1)


def test_a_bad_seed_leaves_the_state_as_it_was(model):
    g = Generator(model, SENTINELS)
    st = g.new_state(2)
    st.set_image("rgb", torch.randint(0, 64, (2, 16)))
    before = set(st.tokens)
    with pytest.raises(ValueError, match="seed must fit in 64 bits"):
        g.generate(st, [TargetSpec("caption", "autoregressive"), TargetSpec("depth")], seed=2**64)
    assert set(st.tokens) == before  # the targets' empty entries were added before the seed was checked
