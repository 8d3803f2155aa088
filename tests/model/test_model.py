"""The assembled TMC: gradients everywhere, checkpoint round trip, overfitting, paper config, text paths."""
import dataclasses

import pytest
import torch

from tests.model import param_counts
from tmc.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from tmc.config import ModelConfig, get_config, tiny_config
from tmc.losses import caption_positive_mask, multistage_alignment_loss, segmentation_loss
from tmc.model import build_model, count_parameters

CAPTIONS = [
    "bilateral pulmonary infection, two infected areas, upper left lung and lower right lung.",
    "unilateral pulmonary infection, one infected area, middle left lung.",
]


def _batch(cfg, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(b, 1, cfg.image_size, cfg.image_size, generator=g)
    mask = (torch.rand(b, 1, cfg.image_size, cfg.image_size, generator=g) > 0.7).float()
    return image, mask


def _loss(model, image, mask, captions, form="sigmoid"):
    tokens = model.tokenize(captions)
    out = model(image, **tokens)
    align = multistage_alignment_loss(out["alignment"], form, caption_positive_mask(captions))
    return segmentation_loss(out["logits"], mask) + 0.1 * align, out


def test_tiny_forward_shapes_and_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = build_model(cfg)
    image, mask = _batch(cfg)
    loss, out = _loss(model, image, mask, CAPTIONS)
    assert out["logits"].shape == (2, 1, cfg.image_size, cfg.image_size)
    assert len(out["alignment"]) == len(cfg.alignment_stages)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:10]}"
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad


def test_text_changes_the_prediction_and_image_only_ignores_it():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = build_model(cfg).eval()
    image, _ = _batch(cfg, b=1)
    a = model(image, **model.tokenize(CAPTIONS[:1]))["logits"]
    b = model(image, **model.tokenize(CAPTIONS[1:]))["logits"]
    # MCM starts as the identity on the image path (zero-initialised output layers) ...
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # ... and once those layers have moved, the caption steers the prediction. (BatchNorm in train
    # mode: with fresh running statistics, eval mode damps the deep paths to almost nothing.)
    model.train()
    model.text.eval()  # no dropout
    with torch.no_grad():
        for block in model.mcm.values():
            block.v_attn.out_proj.weight.normal_(std=0.05)
    a = model(image, **model.tokenize(CAPTIONS[:1]))["logits"]
    b = model(image, **model.tokenize(CAPTIONS[1:]))["logits"]
    assert (a - b).abs().max() > 1e-4

    image_only = build_model(tiny_config(use_text=False)).eval()
    assert image_only.text is None and image_only.tokenize(CAPTIONS) == {}
    assert image_only(image)["logits"].shape == a.shape
    with pytest.raises(ValueError, match="text-guided"):
        model(image)


@pytest.mark.parametrize("stages", [(), (4,), (1, 3)])
def test_mcm_stage_sets(stages):
    cfg = tiny_config(mcm_stages=stages, alignment_stages=stages or (2,))
    model = build_model(cfg)
    image, mask = _batch(cfg)
    tokens = model.tokenize(CAPTIONS)
    out = model(image, **tokens, return_attention=True)
    assert sorted(out["attention"]) == sorted(stages)
    pad = tokens["attention_mask"] == 0  # (2, T)
    assert pad.any(dim=1).all()  # both captions are shorter than T
    for i, attn in out["attention"].items():
        side = cfg.image_size // 2 ** (i + 1)
        assert attn.shape == (2, side * side, cfg.text_length)
        # rows are distributions over the words; padding gets no weight
        torch.testing.assert_close(attn.sum(-1), torch.ones(2, side * side))
        assert (attn.transpose(1, 2)[pad] == 0).all() and (attn.transpose(1, 2)[~pad] > 0).all()


def test_checkpoint_round_trip_is_exact(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_config()
    model = build_model(cfg).eval()
    path = save_checkpoint(tmp_path / "m.pt", {
        "model": model.state_dict(), "model_config": dataclasses.asdict(cfg),
        "text_config": model.text.encoder.config.to_dict(),
    })
    ckpt = load_checkpoint(path)  # weights_only=True inside
    rebuilt, cfg2 = model_from_checkpoint(ckpt)
    assert cfg2 == cfg
    saved, loaded = model.state_dict(), rebuilt.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)  # every weight, text side included
    image, _ = _batch(cfg, b=1)
    tokens = model.tokenize(CAPTIONS[:1])
    a, b = rebuilt(image, **tokens), model(image, **tokens)
    torch.testing.assert_close(a["logits"], b["logits"], rtol=0, atol=0)
    for x, y in zip(a["alignment"], b["alignment"]):
        torch.testing.assert_close(x["txt"], y["txt"], rtol=0, atol=0)
    # derived buffers (relative-position index, shift masks, pixel statistics) are not stored
    assert not any("relative_position_index" in k or "attn_mask" in k or "pixel_" in k
                   for k in ckpt["model"])


def test_sigmoid_mcm_attention_is_built_saved_and_used(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_config(mcm_attention="sigmoid")
    model = build_model(cfg).eval()
    for block in model.mcm.values():
        assert block.v_attn.weighting == "sigmoid"  # image tokens query the text
        assert not block.update_text or block.l_attn.weighting == "softmax"  # words choose tokens
    # Same parameters as the softmax model, so the two start from the same weights (same seed).
    torch.manual_seed(0)
    softmax_model = build_model(tiny_config()).eval()
    state = model.state_dict()
    assert state.keys() == softmax_model.state_dict().keys()
    for block in model.mcm.values():  # the image path starts at zero: make it matter
        torch.nn.init.normal_(block.v_attn.out_proj.weight, std=0.5)
    softmax_model.load_state_dict(model.state_dict())
    image, _ = _batch(cfg, b=1)
    tokens = model.tokenize(CAPTIONS[:1])
    logits = model(image, **tokens)["logits"]
    assert not torch.allclose(logits, softmax_model(image, **tokens)["logits"])
    path = save_checkpoint(tmp_path / "m.pt", {
        "model": model.state_dict(), "model_config": dataclasses.asdict(cfg),
        "text_config": model.text.encoder.config.to_dict()})
    rebuilt, cfg2 = model_from_checkpoint(path)
    assert cfg2.mcm_attention == "sigmoid"
    torch.testing.assert_close(rebuilt(image, **tokens)["logits"], logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="mcm_attention"):
        tiny_config(mcm_attention="relu")


def test_tiny_overfits_one_batch():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = build_model(cfg)
    mask = torch.zeros(2, 1, cfg.image_size, cfg.image_size)
    mask[0, :, 8:30, 8:30] = 1
    mask[1, :, 30:60, 20:40] = 1
    image = 0.3 * torch.rand(mask.shape, generator=torch.Generator().manual_seed(0)) + 0.5 * mask
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(50):
        out = model(image, **model.tokenize(CAPTIONS))
        loss = segmentation_loss(out["logits"], mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 3, losses[::5]


def test_paper_config_forward_at_224_with_random_bert_base():
    torch.manual_seed(0)
    cfg = get_config("paper", text_model="random:12x768", drop_path_rate=0.0)
    model = build_model(cfg).eval()
    counts = count_parameters(model)
    assert 0.85 * 242.8e6 <= counts["total"] <= 1.15 * 242.8e6, counts
    # Exact per part, from the architecture written out layer by layer (tests/model/param_counts.py):
    # BERT-base without pooler; Swin-T without head; the stage-2/3/4 text projections (768→192,
    # 192→384, 384→768), both MCM directions at stages 2-3 and the image direction at stage 4;
    # two Linear(C, 256) plus temperature and bias per aligned stage.
    c = (96, 192, 384, 768)
    expected = {
        "text_encoder": param_counts.bert(12, 768),
        "swin": param_counts.swin(),
        "mcm": (param_counts.lin(768, 192) + param_counts.lin(192, 384) + param_counts.lin(384, 768)
                + 2 * param_counts.mcm_direction(192) + 2 * param_counts.mcm_direction(384)
                + param_counts.mcm_direction(768)),
        "alignment": sum(2 * param_counts.lin(ci, 256) + 2 for ci in c[1:]),
        "decoder": param_counts.decoder(c, 32),
    }
    expected["total"] = sum(expected.values())
    assert counts == expected
    image = torch.rand(1, 1, 224, 224)
    with torch.no_grad():
        out = model(image, **model.tokenize(CAPTIONS[:1]))
    assert out["logits"].shape == (1, 1, 224, 224)
    assert torch.isfinite(out["logits"]).all()
    assert model.tokenize(CAPTIONS[:1])["input_ids"].shape == (1, 24)  # our default T (paper: 10)


def test_minilm_text_encoder_loads_from_the_package_and_encodes():
    from tmc.text import TextEncoder

    enc = TextEncoder("minilm", length=16).eval()
    tokens = enc.tokenize(["bilateral pulmonary infection", "no infection"])
    assert tokens["input_ids"][0, 0].item() == enc.tokenizer.cls_token_id
    with torch.no_grad():
        feats = enc(**tokens)
        again = enc(**enc.tokenize(["bilateral pulmonary infection", "no infection"]))
    assert feats.shape == (2, 16, 384)
    torch.testing.assert_close(feats, again)
    # pretrained weights, not a random init: related phrases are closer than unrelated ones
    e = enc.tokenize(["lung infection", "pulmonary infection", "a red bicycle"])
    with torch.no_grad():
        h = enc(**e)
    m = e["attention_mask"].unsqueeze(-1)
    pooled = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    assert pooled[0] @ pooled[1] > pooled[0] @ pooled[2] + 0.1


def test_small_preset_builds_frozen_minilm_and_trains_everything_else():
    torch.manual_seed(0)
    cfg = get_config("small")
    assert (cfg.image_size, cfg.embed_dim, cfg.text_model) == (96, tiny_config().embed_dim, "minilm")
    assert cfg.freeze_text and cfg.mcm_attention == "softmax"  # the paper's, which won on QaTa
    assert get_config("paper") == ModelConfig()  # the paper preset is untouched
    model = build_model(cfg)
    image, mask = _batch(cfg)
    loss, out = _loss(model, image, mask, CAPTIONS)
    assert out["logits"].shape == (2, 1, 96, 96)
    loss.backward()
    text = {n for n, _ in model.text.named_parameters(prefix="text")}
    assert text and all(not p.requires_grad and p.grad is None
                        for n, p in model.named_parameters() if n in text)
    missing = [n for n, p in model.named_parameters() if n not in text and p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:10]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_missing_hub_model_error_names_both_remedies(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from tmc.text import TextEncoder

    with pytest.raises(RuntimeError) as e:
        TextEncoder("no-such-org/no-such-bert-model")
    msg = str(e.value)
    assert "download" in msg and "--text-model minilm" in msg and "local model folder" in msg


def test_config_round_trip_and_validation():
    cfg = tiny_config(mcm_stages=(4,))
    assert ModelConfig.from_dict(dataclasses.asdict(cfg)) == cfg
    with pytest.raises(ValueError):
        tiny_config(mcm_stages=(5,))
    with pytest.raises(ValueError):
        tiny_config(alignment_form="cosine")
    with pytest.raises(ValueError):
        ModelConfig.from_dict({"no_such_field": 1})


def test_alignment_text_grad_off_keeps_alignment_out_of_the_language_stream():
    torch.manual_seed(0)
    cfg = tiny_config(alignment_text_grad=False)
    model = build_model(cfg)
    image, _ = _batch(cfg)
    out = model(image, **model.tokenize(CAPTIONS))
    multistage_alignment_loss(out["alignment"], "sigmoid", caption_positive_mask(CAPTIONS)).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(grads[n] is None or grads[n].abs().max() == 0 for n in grads
               if n.startswith(("text.", "text_proj.")))
    assert grads["align.2.img_proj.weight"].abs().max() > 0
    assert grads["align.2.txt_proj.weight"].abs().max() > 0  # the head itself still learns
    assert any(g is not None and g.abs().max() > 0 for n, g in grads.items() if n.startswith("swin."))


def test_random_text_models_tokenise_with_the_shipped_vocabulary(monkeypatch):
    import tmc.text as text

    captions = ["Bilateral pulmonary infection, two infected areas, upper left lung and lower right lung.",
                "Unilateral pulmonary infection, one infected area, all left lung. COVID-19 naïve"]
    packaged = text._load_tokenizer(text.packaged_minilm_dir())
    shipped = text.bert_uncased_tokenizer()
    assert shipped(captions)["input_ids"] == packaged(captions)["input_ids"]

    def no_package():
        raise RuntimeError("package not installed")

    monkeypatch.setattr(text, "packaged_minilm_dir", no_package)  # e.g. the GPU machine
    enc = text.TextEncoder("random:1x32", length=12)
    assert enc.tokenize(captions[:1])["input_ids"][0].tolist() == \
        packaged(captions[:1], padding="max_length", truncation=True, max_length=12)["input_ids"][0]


def test_alignment_ablation_starts_from_the_full_models_weights():
    # The alignment heads are built last, so the no-alignment ablation differs in that loss alone.
    torch.manual_seed(0)
    full = build_model(tiny_config()).state_dict()
    torch.manual_seed(0)
    ablated = build_model(tiny_config(use_alignment=False)).state_dict()
    assert set(ablated) < set(full)
    assert {k.split(".")[0] for k in set(full) - set(ablated)} == {"align"}
    for name, value in ablated.items():
        assert torch.equal(value, full[name]), name


@pytest.mark.parametrize("through_mcm", [False, True])
def test_alignment_gradient_crosses_an_mcm_only_when_asked(through_mcm):
    torch.manual_seed(0)
    model = build_model(tiny_config(alignment_through_mcm=through_mcm))
    image, _ = _batch(tiny_config())
    out = model(image, **model.tokenize(CAPTIONS))
    multistage_alignment_loss(out["alignment"], "sigmoid", caption_positive_mask(CAPTIONS)).backward()

    def reached(prefix):
        return any(p.grad is not None and p.grad.abs().max() > 0
                   for n, p in model.named_parameters() if n.startswith(prefix))

    # Stage 2 aligns before any MCM: it trains Swin stages 1-2, BERT and L_2's projection either way.
    assert reached("swin.layers.0.") and reached("swin.layers.1.blocks.")
    assert reached("text.") and reached("text_proj.2.")
    # Stages 3 and 4 read tokens that passed MCM 2 (image side: Swin 3 runs on F_V^2; text side:
    # L_3 = Linear(F_L^2)); their gradient reaches MCM blocks and what lies after them only on request.
    for prefix in ("mcm.2.", "mcm.3.", "swin.layers.2.", "text_proj.3.", "text_proj.4."):
        assert reached(prefix) == through_mcm, prefix
    assert reached("align.3.") and reached("align.4.")  # the heads learn either way


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_prepared_text_mask_gives_what_the_2d_mask_gives(implementation):
    from tmc.text import TextEncoder

    torch.manual_seed(0)
    enc = TextEncoder("random:2x64", length=12).eval()
    enc.encoder.set_attn_implementation(implementation)
    tokens = enc.tokenize(["bilateral infection", "unilateral pulmonary infection, one area, middle left lung."])
    assert tokens["attention_mask"][0].sum() < 12  # padded: the mask matters
    with torch.no_grad():
        ours = enc(**tokens)
        reference = enc.encoder(**tokens).last_hidden_state  # transformers' own 2-D mask handling
    torch.testing.assert_close(ours, reference)


def test_training_step_never_waits_for_the_device():
    """No op in forward, losses and backward reads a tensor's value on the host (.item(), nonzero,
    bool(tensor)): on a GPU each would be a sync that stalls the queue and breaks CUDA-graph capture.
    (lab.op_count's counter, itself tested on a planted .item() in test_bench.py, lists them.)"""
    from lab.op_count import OpCounter

    cfg = tiny_config()
    model = build_model(cfg).train()
    image, mask = _batch(cfg)
    with OpCounter() as counter:
        loss, _ = _loss(model, image, mask, CAPTIONS)
        loss.backward()
    assert sum(counter.ops.values()) > 0 and counter.syncs == {}
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_a_caption_longer_than_t_warns_once_with_the_kept_words():
    import warnings

    model = build_model(tiny_config(text_length=8))
    short = "No pulmonary infection."  # 6 tokens with [CLS] and [SEP]
    long = "Bilateral pulmonary infection, two infected areas, upper left lung and lower right lung."
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.tokenize([short])
        assert not caught
        model.tokenize([short, long])
        model.tokenize([long])  # once per run, not per batch
    (w,) = caught
    assert "cut to the model's T = 8" in str(w.message)
    assert "reads only 'bilateral pulmonary infection, two infected'" in str(w.message)
