"""FourM: parity with the reference 4M (shared/parity/fourm_tiny_A*), native path, errors."""
import json

import pytest
import torch
from parity import DATA, load_safetensors

from fourm_fast.masking import ModalitySpec, TokenBudgetSampler, to_ml4m_batch
from fourm_fast.model import FourM, FourMConfig, ModalityConfig, batch_from_layout, preset
from fourm_fast.model.ml4m import batch_from_ml4m

META = json.loads((DATA / "fourm_tiny_A.json").read_text())


def ml4m_config():
    m = META["model"]
    return dict(domains_in=META["in_domains"], domains_out=META["out_domains"], image_size=224, patch_size=16,
                dim=m["dim"], encoder_depth=m["encoder_depth"], decoder_depth=m["decoder_depth"],
                num_heads=m["num_heads"], mlp_ratio=m["mlp_ratio"], qkv_bias=False, proj_bias=False, mlp_bias=False,
                norm_bias=False, act_layer="SiLU", gated_mlp=True, qk_norm=False, decoder_causal_mask=False,
                decoder_sep_mask=True, num_register_tokens=0, share_modality_embeddings=True)


@pytest.fixture(scope="module")
def tiny_a():
    sd = load_safetensors("fourm_tiny_A.safetensors")  # tied tensors stored once: the loader fills them
    io = load_safetensors("fourm_tiny_A_io.safetensors")
    model = FourM.from_ml4m(sd, ml4m_config()).eval()
    mod_dict = {name: {f: io[f"{name}.{f}"] for f in ("tensor", "input_mask", "target_mask", "decoder_attention_mask")}
                for name in META["inputs"]["mod_dict_order"]}
    return model, mod_dict, io


@pytest.mark.parametrize("loss_type", ["mod", "token"])
def test_losses_match_reference_4m(tiny_a, loss_type):
    model, mod_dict, io = tiny_a
    with torch.no_grad():
        loss, per_mod = model.forward_ml4m(mod_dict, META["num_encoder_tokens"], META["num_decoder_tokens"], loss_type)
    prefix = "mod_loss" if loss_type == "mod" else "token_mod_loss"
    assert abs(loss.item() - io[f"out.loss_{loss_type}"].item()) <= 1e-5
    assert list(per_mod) == META["inputs"]["mod_dict_order"]
    for name, value in per_mod.items():
        assert abs(value.item() - io[f"out.{prefix}.{name}"].item()) <= 1e-5, name


def test_logits_match_reference_4m(tiny_a):
    model, mod_dict, io = tiny_a
    with torch.no_grad():
        logits = model.forward_ml4m(mod_dict, 128, 128, return_logits=True)
        b = batch_from_ml4m(model, mod_dict, 128, 128)
    for name in META["out_domains"]:
        rows = b.dec_valid & (b.dec_modality == model.modalities.index(name))
        ours = logits[name][rows]
        ref = io[f"out.logits_valid.{name}"]
        assert ours.shape == ref.shape, name
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4, msg=name)
        assert torch.equal(b.dec_targets[rows], io[f"out.target_ids_valid.{name}"]), name
        batch_index = torch.arange(rows.shape[0])[:, None].expand_as(rows)[rows]
        assert torch.equal(batch_index, io[f"out.valid_batch_index.{name}"]), name


def test_encoder_selection_matches_reference(tiny_a):
    model, mod_dict, io = tiny_a
    b = batch_from_ml4m(model, mod_dict, 128, 128)
    with torch.no_grad():
        x, emb = model.embed_encoder(b)
    torch.testing.assert_close(x, io["inter.encoder_tokens"], rtol=0, atol=1e-6)
    torch.testing.assert_close(emb, io["inter.encoder_emb"], rtol=0, atol=1e-6)
    assert torch.equal(~b.enc_valid, io["inter.encoder_mask"][:, 0])


def tiny_model(**overrides):
    mods = (ModalityConfig("rgb", "image", 64, grid=4), ModalityConfig("depth", "image", 32, grid=4),
            ModalityConfig("caption", "sequence", 50, max_length=12))
    domains = {"domains_in": ("caption", "depth", "rgb"), "domains_out": ("caption", "depth", "rgb"), **overrides}
    cfg = FourMConfig(dim=32, encoder_depth=2, decoder_depth=2, num_heads=2, modalities=mods, **domains)
    torch.manual_seed(0)
    return FourM(cfg)


def sampled_batch(B=6, seed=3):
    specs = [ModalitySpec("caption", "sequence", 12), ModalitySpec("depth", "image", 16), ModalitySpec("rgb", "image", 16)]
    alphas = {"caption": [0.5], "depth": [0.5], "rgb": [0.5]}
    sampler = TokenBudgetSampler(specs, 12, 10, alphas, alphas)
    g = torch.Generator().manual_seed(seed)
    lengths = {"caption": torch.randint(2, 12, (B,), generator=g)}
    layout = sampler.sample(B, seed=seed, lengths=lengths)
    tokens = {"rgb": torch.randint(0, 64, (B, 16), generator=g), "depth": torch.randint(0, 32, (B, 16), generator=g),
              "caption": torch.randint(5, 40, (B, 12), generator=g)}
    sentinels = list(range(40, 50))
    return layout, tokens, sentinels


def test_native_path_equals_ml4m_path():
    """The sampler's gather layout and the same draw in ml-4m's format give the same losses."""
    model = tiny_model().eval()
    layout, tokens, sentinels = sampled_batch()
    buffer = layout.build_buffer(tokens, sentinels, pad_id=0)
    native = batch_from_layout(layout, buffer, model.modalities)
    ml4m = to_ml4m_batch(layout, tokens, sentinels, pad_id=0)
    with torch.no_grad():
        loss_n, per_n = model(native, "mod")
        loss_m, per_m = model.forward_ml4m(dict(sorted(ml4m.items())), 12, 10, "mod")
    torch.testing.assert_close(loss_n, loss_m, rtol=1e-6, atol=1e-6)
    for name in per_m:
        torch.testing.assert_close(per_n[name], per_m[name], rtol=1e-6, atol=1e-6)


def test_fresh_position_tables_equal_4m_s():
    """A fresh model's fixed sin-cos tables are 4M's (the tiny_A checkpoint stores them: 14 x 14
    image grids and the caption's 1D table); the parity tests load the stored ones, so a drifted
    formula (sin/cos order, the grid's axes) would show only here."""
    from fourm_fast.model.embeddings import sincos_1d, sincos_2d

    sd = load_safetensors("fourm_tiny_A.safetensors")
    for side in ("encoder", "decoder"):
        for name in ("tok_rgb@224", "tok_depth@224", "tok_semseg@224"):
            torch.testing.assert_close(sincos_2d(14, 14, 64), sd[f"{side}_embeddings.{name}.pos_emb"], rtol=0, atol=1e-6)
        table = sd[f"{side}_embeddings.caption.pos_emb"]
        torch.testing.assert_close(sincos_1d(table.shape[1], 64), table, rtol=0, atol=1e-6)


def test_modality_embeddings_are_shared_by_encoder_and_decoder():
    """4M's share_modality_embeddings: one mod_emb per modality seen by both sides (trained as one)."""
    model = tiny_model()
    for name in model.modalities:
        assert model.decoder_embeddings[name].mod_emb is model.encoder_embeddings[name].mod_emb
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.startswith("decoder_embeddings.") and n.endswith(".mod_emb") for n in names)
    only_in = tiny_model(domains_in=("caption", "rgb"), domains_out=("depth", "rgb"))
    assert only_in.decoder_embeddings["rgb"].mod_emb is only_in.encoder_embeddings["rgb"].mod_emb
    assert only_in.decoder_embeddings["depth"].mod_emb is not only_in.encoder_embeddings["rgb"].mod_emb


def test_native_token_loss_is_the_mean_over_all_targets():
    """loss_type "token" on the native path: the mean cross-entropy over every target token of every
    modality, here from each decoder slot's full logits under its own head (not modality_losses'
    chunks); modalities with unequal target counts make it differ from the mean of the means."""
    model = tiny_model().eval()
    layout, tokens, sentinels = sampled_batch()
    b = batch_from_layout(layout, layout.build_buffer(tokens, sentinels, pad_id=0), model.modalities)
    with torch.no_grad():
        loss, per_mod = model(b, "token")
        logits = model.logits(b)
    total, count, means = 0.0, 0, []
    for i, name in enumerate(model.modalities):
        sel = b.dec_valid & (b.dec_modality == i)
        ce = torch.nn.functional.cross_entropy(logits[name][sel].double(), b.dec_targets[sel].long(), reduction="sum")
        n = int(sel.sum())
        assert n > 0
        torch.testing.assert_close(per_mod[name].double(), ce / n, rtol=1e-5, atol=1e-6)
        total, count = total + ce, count + n
        means.append(ce / n)
    torch.testing.assert_close(loss.double(), total / count, rtol=1e-5, atol=1e-6)
    assert abs(float(total / count) - float(sum(means) / len(means))) > 1e-3


def test_full_length_caption_target_reads_position_zero_past_the_table():
    """ml-4m's TransferMasking writes a full caption target as [S_1] t_1 .. t_11 [EOS] [S_2], which
    fills the whole target half of the 2 (max_length + 1) buffer: the slot predicting [S_2] has
    position max_length, past the table. ml-4m (SequenceDecoderEmbedding.forward_embed) sets such
    positions to 0 and keeps the slot's loss; so does forward_ml4m (without that, it refused the batch)."""
    model = tiny_model().eval()
    M, s1, s2, eos = 12, 40, 41, 3
    target = [s1] + list(range(5, 5 + M - 1)) + [eos, s2]
    tensor = torch.zeros(1, 2 * (M + 1), dtype=torch.int32)
    tensor[0, M:] = torch.tensor(target)
    tm = torch.ones(1, 2 * (M + 1), dtype=torch.bool)
    tm[0, M:] = False
    rgb = {"tensor": torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(0)),
           "input_mask": torch.zeros(1, 16, dtype=torch.bool), "target_mask": torch.ones(1, 16, dtype=torch.bool),
           "decoder_attention_mask": torch.zeros(1, 16, dtype=torch.int32)}
    caption = {"tensor": tensor, "input_mask": torch.ones_like(tm), "target_mask": tm, "decoder_attention_mask": (~tm).int()}
    md = {"rgb": rgb, "caption": caption}
    b = batch_from_ml4m(model, md, 16, 16 + 2 * (M + 1) - 1)
    cap = b.dec_valid[0] & (b.dec_modality[0] == model.modalities.index("caption"))
    assert b.dec_targets[0][cap].tolist() == target[1:]
    assert b.dec_position[0][cap].tolist() == list(range(M)) + [0]  # the [S_2] slot: position M read as 0
    with torch.no_grad():
        loss, per_mod = model.forward_ml4m(md, 16, 16 + 2 * (M + 1) - 1)
    assert torch.isfinite(loss) and per_mod["caption"] > 0


def test_native_path_refuses_slots_it_would_misread():
    # The lookups clamp ids and index one concatenated position table: an id beyond the vocabulary
    # or a position beyond the modality's read another row without a word before this check.
    import dataclasses

    model = tiny_model().eval()
    layout, tokens, sentinels = sampled_batch()
    b = batch_from_layout(layout, layout.build_buffer(tokens, sentinels, pad_id=0), model.modalities)
    v = b.enc_valid.nonzero()[0].tolist()
    d = (b.dec_valid & model._is_sequence[b.dec_modality.long()]).nonzero()[0].tolist()
    img = (b.dec_valid & ~model._is_sequence[b.dec_modality.long()]).nonzero()[0].tolist()

    def poke(field, at, value):
        t = getattr(b, field).clone()
        t[at[0], at[1]] = value
        return dataclasses.replace(b, **{field: t})

    with torch.no_grad():
        model(b)
        for field, at, value in (("enc_ids", v, 10**6), ("enc_ids", v, -1), ("enc_position", v, 10**4),
                                 ("enc_position", v, -1), ("dec_ids", d, 10**6), ("dec_position", img, 10**4)):
            with pytest.raises(RuntimeError, match="slot has a modality .* position beyond .* outside its vocabulary"):
                model(poke(field, at, value))
        model(poke("dec_ids", img, 10**6))  # an image target slot's id is never read (the mask token is)
        pad = (~b.enc_valid).nonzero()
        if len(pad):  # padding slots are never read either
            model(poke("enc_ids", pad[0].tolist(), 10**6))
        # a modality the encoder does not embed (it took the first modality's table before)
        out_only = tiny_model(domains_in=("caption", "rgb")).eval()
        depth = model.modalities.index("depth")
        assert (b.enc_valid & (b.enc_modality == depth)).any()
        with pytest.raises(RuntimeError, match="slot has a modality the encoder does not embed"):
            out_only(b)


def test_image_only_decoder_matches_the_eager_4m_restatement():
    """A decoder with no sequence modality looks up no token table (its slots all take the mask
    token): loss and every gradient equal the eager restatement of 4M's forward."""
    from fourm_fast.reference.fourm import forward_4m_eager

    model = tiny_model(domains_out=("depth", "rgb"))
    specs = [ModalitySpec("caption", "sequence", 12), ModalitySpec("depth", "image", 16), ModalitySpec("rgb", "image", 16)]
    alphas_in = {"caption": [0.5], "depth": [0.5], "rgb": [0.5]}
    layout = TokenBudgetSampler(specs, 12, 10, alphas_in, {"caption": [0.0], "depth": [0.5], "rgb": [0.5]}).sample(
        6, seed=3, lengths={"caption": torch.tensor([2, 5, 11, 12, 7, 3])})
    _, tokens, sentinels = sampled_batch()
    native = batch_from_layout(layout, layout.build_buffer(tokens, sentinels, pad_id=0), model.modalities)
    assert native.dec_counts[model.modalities.index("caption")] == 0 and sum(native.dec_counts) > 0
    ml4m = dict(sorted(to_ml4m_batch(layout, tokens, sentinels, pad_id=0).items()))
    grads = []
    for run in (lambda: model(native, "mod"), lambda: forward_4m_eager(model, ml4m, 12, 10, "mod")):
        model.zero_grad(set_to_none=True)
        loss, _ = run()
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_n, g_n), (loss_e, g_e) = grads
    torch.testing.assert_close(loss_n, loss_e, rtol=1e-6, atol=1e-6)
    assert g_n.keys() == g_e.keys() and "mask_token" in g_n
    for name in g_n:
        torch.testing.assert_close(g_n[name], g_e[name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_decoder_modality_without_targets_gets_a_zero_gradient():
    """Every parameter gets a gradient every step (DDP requires it, and AdamW skips a parameter
    whose gradient is None): rgb, with no targets here, gets zeros on its tied head and table."""
    model = tiny_model()
    specs = [ModalitySpec("caption", "sequence", 12), ModalitySpec("depth", "image", 16), ModalitySpec("rgb", "image", 16)]
    alphas = {"caption": [0.5], "depth": [0.5], "rgb": [0.5]}
    layout = TokenBudgetSampler(specs, 12, 10, alphas, {**alphas, "rgb": [0.0]}).sample(
        6, seed=3, lengths={"caption": torch.tensor([2, 5, 11, 12, 7, 3])})
    _, tokens, sentinels = sampled_batch()
    batch = batch_from_layout(layout, layout.build_buffer(tokens, sentinels), model.modalities)
    assert batch.dec_counts[model.modalities.index("rgb")] == 0
    loss, _ = model(batch, "mod")
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
    grad = model.decoder_embeddings["rgb"].to_logits.weight.grad
    assert grad is model.decoder_embeddings["rgb"].token_emb.weight.grad and not grad.any()


def test_training_step_has_gradients_everywhere_used():
    model = tiny_model()
    layout, tokens, sentinels = sampled_batch()
    batch = batch_from_layout(layout, layout.build_buffer(tokens, sentinels), model.modalities)
    loss, _ = model(batch, "token")
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        if name.endswith("register_tokens"):
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.encoder[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.decoder_embeddings["rgb"].token_emb.weight.grad.abs().sum() > 0  # through the tied head


def test_gradients_are_bitwise_reproducible_on_several_threads():
    # Exact resume needs a training step to be a pure function of its inputs. An op whose CPU
    # backward adds with atomics across threads (index_put_ with accumulate, as ``table[idx]``
    # has) breaks that, and these sums are where it shows.
    model = tiny_model()
    layout, tokens, sentinels = sampled_batch(B=256)
    batch = batch_from_layout(layout, layout.build_buffer(tokens, sentinels), model.modalities)

    def grads():
        model.zero_grad(set_to_none=True)
        model(batch, "mod")[0].backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    threads = torch.get_num_threads()
    torch.set_num_threads(max(threads, 2))
    try:
        first = grads()
        for _ in range(8):
            again = grads()
            assert [n for n in first if not torch.equal(first[n], again[n])] == []
    finally:
        torch.set_num_threads(threads)


def test_presets_have_4m_sizes():
    mods = (ModalityConfig("rgb", "image", 1024),)
    for name, (dim, depth, heads) in {"tiny": (384, 6, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (2048, 24, 32)}.items():
        cfg = preset(name, mods)
        assert (cfg.dim, cfg.encoder_depth, cfg.decoder_depth, cfg.num_heads) == (dim, depth, depth, heads)
        assert cfg.mlp_hidden == int(2 * 4 * dim / 3)
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge", mods)


def test_from_ml4m_errors_name_the_problem():
    sd = load_safetensors("fourm_tiny_A.safetensors")
    with pytest.raises(ValueError, match="unknown config keys \\['dropout'\\]"):
        FourM.from_ml4m(sd, {**ml4m_config(), "dropout": 0.1})
    with pytest.raises(ValueError, match="shape mismatch"):
        FourM.from_ml4m(sd, {**ml4m_config(), "mlp_ratio": 2})
    bad = dict(sd)
    del bad["encoder.0.attn.qkv.weight"]
    with pytest.raises(ValueError, match="missing: \\['encoder.0.attn.qkv.weight'\\]"):
        FourM.from_ml4m(bad, ml4m_config())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FourM.from_ml4m("/nonexistent/ckpt.safetensors", ml4m_config())
    with pytest.raises(ValueError, match="act_layer"):
        FourM.from_ml4m(sd, {**ml4m_config(), "act_layer": "ReLU"})
    FourM.from_ml4m(sd, {**ml4m_config(), "image_size": 224, "patch_size": 16})  # 14 x 14, as the weights
    with pytest.raises(ValueError, match="patch_size 8 gives a 28x28 token grid, but tok_.*holds 14x14"):
        FourM.from_ml4m(sd, {**ml4m_config(), "image_size": 224, "patch_size": 8})
    # names in the fourm_fast extensions are checked too (a misspelt one was ignored)
    with pytest.raises(ValueError, match="modality_kinds names \\['tok_rbg'\\], which are not among the domains"):
        FourM.from_ml4m(sd, {**ml4m_config(), "modality_kinds": {"tok_rbg": "image"}})
    with pytest.raises(ValueError, match="max_lengths names \\['captions'\\]"):
        FourM.from_ml4m(sd, {**ml4m_config(), "max_lengths": {"captions": 64}})
    with pytest.raises(ValueError, match="modality_kinds must be 'image' or 'sequence'"):
        FourM.from_ml4m(sd, {**ml4m_config(), "modality_kinds": {"caption": "text"}})


def test_forward_ml4m_refuses_batches_it_would_misread(tiny_a):
    # ids past the vocabulary were clamped to its last id, and an image tensor longer than its grid
    # read the next modality's positions (ml-4m's embedding raises on the former)
    import copy

    model, mod_dict, _ = tiny_a
    name = next(n for n in mod_dict if model.cfg.modality(n).kind == "image")
    V = model.cfg.modality(name).vocab_size
    bad = copy.deepcopy(mod_dict)
    bad[name]["tensor"][0, 0] = V
    with pytest.raises(ValueError, match=f"{name} token ids outside \\[0, {V}\\)"):
        model.forward_ml4m(bad, 128, 128)
    bad = copy.deepcopy(mod_dict)
    for k in ("tensor", "input_mask", "target_mask"):
        t = bad[name][k]
        bad[name][k] = torch.cat([t, t[:, :4]], 1)
    with pytest.raises(ValueError, match=f"{name} has 200 tokens per sample; the model's image modality takes exactly 196"):
        model.forward_ml4m(bad, 128, 128)
    bad = copy.deepcopy(mod_dict)
    bad[name]["tensor"] = bad[name]["tensor"][:1]
    with pytest.raises(ValueError, match="holds a batch of 1, another modality"):
        model.forward_ml4m(bad, 128, 128)


def test_reduced_vocabulary_checkpoints_load():
    """Vocabulary sizes come from the weights (the parity model uses 1024-code image vocabularies)."""
    sd = load_safetensors("fourm_tiny_A.safetensors")
    model = FourM.from_ml4m(sd, ml4m_config())
    assert model.cfg.modality("tok_rgb@224").vocab_size == 1024
    assert model.cfg.modality("caption").vocab_size == 30000
    assert model.cfg.modality("caption").kind == "sequence" and model.cfg.modality("tok_rgb@224").grid == 14


@pytest.mark.parametrize("loss_type", ["mod", "token"])
def test_eager_4m_restatement_matches_reference(tiny_a, loss_type):
    """fourm_fast/reference/fourm.py (the bench_train baseline) reproduces the reference vectors too."""
    from fourm_fast.reference.fourm import forward_4m_eager

    model, mod_dict, io = tiny_a
    with torch.no_grad():
        loss, per_mod = forward_4m_eager(model, mod_dict, 128, 128, loss_type)
    assert abs(loss.item() - io[f"out.loss_{loss_type}"].item()) <= 1e-5
    prefix = "mod_loss" if loss_type == "mod" else "token_mod_loss"
    assert sorted(per_mod) == sorted(META["inputs"]["mod_dict_order"])
    for name, value in per_mod.items():
        assert abs(value.item() - io[f"out.{prefix}.{name}"].item()) <= 1e-5, name


def _parity_outputs(model):
    _, mod_dict, _ = _tiny_a_inputs()
    with torch.no_grad():
        return model.forward_ml4m(mod_dict, META["num_encoder_tokens"], META["num_decoder_tokens"], "mod")[0]


def _tiny_a_inputs():
    io = load_safetensors("fourm_tiny_A_io.safetensors")
    mod_dict = {name: {f: io[f"{name}.{f}"] for f in ("tensor", "input_mask", "target_mask", "decoder_attention_mask")}
                for name in META["inputs"]["mod_dict_order"]}
    return None, mod_dict, io


def test_from_ml4m_takes_tied_tensors_stored_under_either_name():
    """safetensors' save_model keeps the first name of a tied group in sorted order: the decoder's
    mod_emb (not the encoder's) and to_logits (not token_emb); torch.save keeps both."""
    sd = load_safetensors("fourm_tiny_A.safetensors")
    ref = _parity_outputs(FourM.from_ml4m(sd, ml4m_config()).eval())
    model = FourM.from_ml4m(sd, ml4m_config())
    full = dict(model.state_dict())  # every name, tied ones repeated
    as_save_model = {k: v for k, v in full.items()
                     if not (k.startswith("encoder_embeddings.") and k.endswith(".mod_emb") and
                             k.replace("encoder_", "decoder_", 1) in full)
                     and not (k.endswith(".token_emb.weight") and k.startswith("decoder_embeddings."))}
    assert len(as_save_model) < len(full)
    loaded = FourM.from_ml4m(as_save_model, ml4m_config()).eval()
    assert _parity_outputs(loaded).item() == ref.item()
    different = dict(sd)
    name = next(k for k in sd if k.startswith("encoder_embeddings.") and k.endswith(".mod_emb"))
    different[name.replace("encoder_", "decoder_", 1)] = sd[name] + 1.0
    with pytest.raises(ValueError, match="encoder and decoder mod_emb of .* differ"):
        FourM.from_ml4m(different, ml4m_config())


def test_from_ml4m_reads_ml4m_training_checkpoints(tmp_path):
    """ml-4m's save_model writes {"model", "epoch", "args": argparse.Namespace, ...}."""
    import argparse

    sd = load_safetensors("fourm_tiny_A.safetensors")
    path = tmp_path / "checkpoint-final.pth"
    torch.save({"model": sd, "epoch": 3, "args": argparse.Namespace(lr=1e-4, model="fm_tiny")}, path)
    model = FourM.from_ml4m(path, ml4m_config()).eval()
    assert _parity_outputs(model).item() == _parity_outputs(FourM.from_ml4m(sd, ml4m_config()).eval()).item()
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="truncated.pth cannot be read"):
        FourM.from_ml4m(bad, ml4m_config())


def test_from_ml4m_sequence_length_is_ml4ms_not_the_position_table():
    # ml-4m's pos_emb of a sequence modality always has 512 rows; its captions are 256 tokens long
    sd = load_safetensors("fourm_tiny_A.safetensors")
    assert sd["encoder_embeddings.caption.pos_emb"].shape[1] == 512
    cap = FourM.from_ml4m(sd, ml4m_config()).cfg.modality("caption")
    assert (cap.max_length, cap.max_sincos_pos_emb) == (META["modalities"]["caption"]["encoder_embedding"]["max_length"], 512)
    assert FourM.from_ml4m(sd, {**ml4m_config(), "max_lengths": {"caption": 40}}).cfg.modality("caption").max_length == 40
    with pytest.raises(ValueError, match="max_lengths\\['caption'\\] = 600 must be in 1..512"):
        FourM.from_ml4m(sd, {**ml4m_config(), "max_lengths": {"caption": 600}})


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(num_heads=0), ValueError, "num_heads must be >= 1, got 0"),
    (dict(dim=-6, num_heads=2), ValueError, "dim must be >= 1, got -6"),
    (dict(dim="abc"), TypeError, "dim must be an int, got 'abc'"),
    (dict(dim=6, num_heads=3), ValueError, "dim 6 must be divisible by 4 for the sin-cos positions of image"),
    (dict(encoder_depth=-1), ValueError, "encoder_depth must be >= 0, got -1"),
    (dict(decoder_depth=2.0), TypeError, "decoder_depth must be an int, got 2.0"),
    (dict(num_register_tokens=-1), ValueError, "num_register_tokens must be >= 0, got -1"),
    (dict(mlp_ratio=-1.0), ValueError, "mlp_ratio must be finite .* got -1.0"),
])
def test_model_config_refuses_bad_numbers(kwargs, error, match):
    # they failed later and obscurely (ZeroDivisionError, sin-cos tables) or built a model without blocks
    mods = (ModalityConfig("rgb", "image", 64, grid=2), ModalityConfig("cap", "sequence", 50, max_length=4))
    base = dict(dim=32, encoder_depth=1, decoder_depth=1, num_heads=4, modalities=mods, domains_in=("rgb", "cap"),
                domains_out=("rgb", "cap"))
    with pytest.raises(error, match=match):
        FourMConfig(**{**base, **kwargs})


def test_modality_config_refuses_bad_numbers():
    for kwargs, error, match in [
        (dict(kind="image", grid=0), ValueError, "'m': grid must be >= 1, got 0"),
        (dict(kind="image", grid=-2), ValueError, "'m': grid must be >= 1, got -2"),
        (dict(vocab_size="abc"), TypeError, "'m': vocab_size must be an int, got 'abc'"),
        (dict(vocab_size=True), TypeError, "'m': vocab_size must be an int, got True"),
        (dict(max_length=0), ValueError, "'m': max_length must be >= 1, got 0"),
        (dict(padding_idx=10), ValueError, "'m': padding_idx 10 is outside the vocabulary of 10"),
    ]:
        with pytest.raises(error, match=match):
            ModalityConfig(**{"name": "m", "kind": "sequence", "vocab_size": 10, **kwargs})


def test_model_without_encoder_or_decoder_blocks_still_runs():
    """Depth 0 stays allowed, as in ml-4m (its blocks are range(depth)): embeddings and norms only."""
    from dataclasses import replace

    cfg = tiny_model().cfg
    layout, tokens, sentinels = sampled_batch()
    for depths in (dict(encoder_depth=0), dict(decoder_depth=0)):
        model = FourM(replace(cfg, **depths))
        loss, _ = model(batch_from_layout(layout, layout.build_buffer(tokens, sentinels), model.modalities), "mod")
        assert torch.isfinite(loss)


def test_forward_ml4m_refuses_float_ids_negative_counts_and_empty_batches(tiny_a):
    # float ids were truncated by .long(), negative counts sliced tokens off the end, and an empty
    # batch raised a bare StopIteration
    import copy

    model, mod_dict, _ = tiny_a
    name = next(iter(mod_dict))
    bad = copy.deepcopy(mod_dict)
    bad[name]["tensor"] = bad[name]["tensor"].float() + 0.4
    with pytest.raises(ValueError, match=f"{name} holds torch.float32 token ids; they must be integers"):
        model.forward_ml4m(bad, 128, 128)
    with pytest.raises(ValueError, match="num_encoder_tokens must be an int >= 0, got -1"):
        model.forward_ml4m(mod_dict, -1, 128)
    with pytest.raises(ValueError, match="num_decoder_tokens must be an int >= 0, got -3"):
        model.forward_ml4m(mod_dict, 128, -3)
    with pytest.raises(ValueError, match="the batch holds no modalities"):
        model.forward_ml4m({}, 128, 128)


def test_from_ml4m_refuses_a_corrupt_safetensors_file(tmp_path):
    # a .pth gave a ValueError naming the file, a .safetensors a raw SafetensorError
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes((DATA / "fourm_tiny_A.safetensors").read_bytes()[:5000])
    with pytest.raises(ValueError, match="corrupt.safetensors cannot be read as a safetensors file"):
        FourM.from_ml4m(bad, ml4m_config())


def test_from_ml4m_refuses_a_string_for_a_list_of_domains():
    # ml-4m's config holds lists; a bare string was read letter by letter (KeyError for modality 'a')
    sd = load_safetensors("fourm_tiny_A.safetensors")
    with pytest.raises(ValueError, match="domains_in must be a list of modality names, got 'caption'"):
        FourM.from_ml4m(sd, {**ml4m_config(), "domains_in": "caption"})


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_tied_table_gradients_meet_in_place_and_match_autograds_product(precision, monkeypatch):
    # The head's product returns a fresh (V, dim) weight gradient, so the caption table's two
    # gradients (head, decoder lookup) are summed in place; autograd's own y @ W.T returned a
    # transposed view, and the sum was a third V x dim tensor. Same gradients either way.
    import fourm_fast.model.fourm as fm
    from torch.profiler import ProfilerActivity, profile

    layout, tokens, sentinels = sampled_batch()
    model = tiny_model()
    native = batch_from_layout(layout, layout.build_buffer(tokens, sentinels, pad_id=0), model.modalities)
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else (lambda: torch.autocast("cpu", enabled=False))

    def grads():
        model.zero_grad(set_to_none=True)
        with ctx():
            loss, _ = model(native, "mod")
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            loss.backward()
        table = model.decoder_embeddings["caption"].token_emb.weight
        v_by_d = [list(table.shape)] * 2
        copies = sum(e.count for e in prof.key_averages(group_by_input_shape=True)
                     if e.key == "aten::add" and e.input_shapes[:2] == v_by_d)
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, copies

    new, new_copies = grads()
    monkeypatch.setattr(fm, "_chunk_ce_sum", lambda y, w, t: torch.nn.functional.cross_entropy(y @ w.t(), t, reduction="sum"))
    old, old_copies = grads()
    assert (new_copies, old_copies) == (0, 1)
    assert new.keys() == old.keys()
    tol = dict(rtol=1e-5, atol=1e-6) if precision == "fp32" else dict(rtol=2e-2, atol=2e-3)
    for name in new:
        torch.testing.assert_close(new[name], old[name], **tol, msg=name)


# ---- malformed batches (a hostile-input review: each ran and returned a loss before) ----------

def _native(model):
    layout, tokens, sentinels = sampled_batch()
    return batch_from_layout(layout, layout.build_buffer(tokens, sentinels, pad_id=0), model.modalities)


@pytest.mark.parametrize("flags", [dict(decoder_sep_mask=False), dict(decoder_causal_mask=True)])
def test_a_native_batch_refuses_a_model_with_another_decoder_mask(flags):
    # batch_from_layout's metadata is 4M's default rule; the flags were silently ignored
    model = tiny_model(**flags)
    with pytest.raises(ValueError, match=r"decoder_sep_mask, decoder_causal_mask\) = \(True, False\), but this model has"):
        model(_native(model))
    with pytest.raises(ValueError, match="but this model has"):
        model.logits(_native(model))


def test_inconsistent_decoder_counts_and_shapes_are_refused():
    import dataclasses

    model = tiny_model()
    b = _native(model)
    n = b.dec_order.numel()
    with pytest.raises(ValueError, match=f"dec_counts \\[1, 1, 1\\] add up to 3, but dec_order lists {n} slots"):
        model(dataclasses.replace(b, dec_counts=[1, 1, 1]))
    with pytest.raises(ValueError, match="dec_counts must hold 3 ints >= 0"):
        model(dataclasses.replace(b, dec_counts=[-1, n + 1, 0]))
    with pytest.raises(ValueError, match="counts must hold 3 ints >= 0"):  # was IndexError
        model(b, counts=[n])
    # the whole batch's counts are never below a slice's own (a 0 inflated that modality's mean)
    with pytest.raises(ValueError, match="are below this batch's own dec_counts"):
        model(b, counts=[0 if c else 1 for c in b.dec_counts])
    model(b, counts=[int(c) * 2 for c in b.dec_counts])  # a whole batch's (larger) counts are fine
    wide = torch.zeros(b.dec_targets.shape[0], b.dec_targets.shape[1] + 5, dtype=b.dec_targets.dtype)
    with pytest.raises(ValueError, match="the dec_\\* slot tensors must share one \\(B, N\\) shape"):
        model(dataclasses.replace(b, dec_targets=wide))
    with pytest.raises(ValueError, match="the enc_\\* slot tensors must share one"):
        model(dataclasses.replace(b, enc_position=b.enc_position[:, :-1]))


def test_a_target_of_minus_100_raises_like_any_id_outside_the_vocabulary():
    # cross_entropy skipped it (its default ignore_index) while the mean still counted it
    import dataclasses

    model = tiny_model()
    b = _native(model)
    t = b.dec_targets.clone()
    t.view(-1)[b.dec_order[0]] = -100
    with pytest.raises((IndexError, RuntimeError), match="out of bounds"):
        model(dataclasses.replace(b, dec_targets=t))


def test_padding_slots_may_hold_anything_and_a_bad_valid_modality_gets_the_models_message():
    import dataclasses

    model = tiny_model().eval()
    b = _native(model)
    with torch.no_grad():
        clean, _ = model(b)
        wild = dataclasses.replace(
            b, enc_position=torch.where(b.enc_valid, b.enc_position, 10**6),
            enc_modality=torch.where(b.enc_valid, b.enc_modality, 99),
            dec_position=torch.where(b.dec_valid, b.dec_position, -(10**6)),
            dec_modality=torch.where(b.dec_valid, b.dec_modality, -7),
            enc_ids=torch.where(b.enc_valid, b.enc_ids, 10**9), dec_ids=torch.where(b.dec_valid, b.dec_ids, -5))
        assert not bool(b.enc_valid.all()) and not bool(b.dec_valid.all())
        torch.testing.assert_close(model(wild)[0], clean, rtol=0, atol=0)  # was IndexError
        bad = b.enc_modality.clone()
        bad[b.enc_valid] = 7
        with pytest.raises(RuntimeError, match="FourM: a valid enc_\\* slot has a modality the encoder does not embed"):
            model(dataclasses.replace(b, enc_modality=bad))


def test_ml4m_masks_of_another_size_than_the_tensor_are_refused(tiny_a):
    model, mod_dict, _ = tiny_a
    name = next(iter(mod_dict))
    for key in ("input_mask", "target_mask", "decoder_attention_mask"):
        broken = {n: dict(d) for n, d in mod_dict.items()}
        broken[name][key] = broken[name][key][:, :-3]
        with pytest.raises(ValueError, match=f"forward_ml4m: {name}'s {key} has shape"):
            model.forward_ml4m(broken, 128, 128)


def test_from_ml4m_refuses_flags_that_are_not_booleans():
    sd = load_safetensors("fourm_tiny_A.safetensors")
    with pytest.raises(ValueError, match="from_ml4m: decoder_sep_mask must be true or false, got 'false'"):
        FourM.from_ml4m(sd, {**ml4m_config(), "decoder_sep_mask": "false"})  # bool("false") was True
    assert FourM.from_ml4m(sd, {**ml4m_config(), "decoder_sep_mask": 1}).cfg.decoder_sep_mask is True  # 0/1 as ml-4m
