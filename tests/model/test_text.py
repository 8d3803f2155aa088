"""The text encoder: pretrained loading, and the frozen encoder's per-caption feature cache."""
import pytest
import torch

from tmc.config import tiny_config
from tmc.model import build_model

CAPTIONS = [
    "Unilateral pulmonary infection, one infected area, upper left lung.",
    "Bilateral pulmonary infection, two infected areas, upper left lung and lower right lung.",
    "Unilateral pulmonary infection, one infected area, upper left lung.",
]


def _frozen(seed=0):
    torch.manual_seed(seed)
    return build_model(tiny_config(image_size=32, freeze_text=True)).eval()


def _count_encoder_rows(model):
    rows = []
    model.text.encoder.register_forward_hook(lambda m, args, kw, out: rows.append(kw["input_ids"].shape[0]),
                                             with_kwargs=True)
    return rows


def test_cached_features_equal_the_encoder_and_each_caption_is_encoded_once():
    model = _frozen()
    rows = _count_encoder_rows(model)
    tokens = model.tokenize(CAPTIONS)
    assert rows == [1, 1]  # two distinct captions, each encoded alone
    reference = model.text(tokens["input_ids"], tokens["attention_mask"])  # (B, T, d_l), uncached
    torch.testing.assert_close(tokens["text_features"], reference, atol=1e-5, rtol=1e-5)
    rows.clear()
    again = model.tokenize(list(reversed(CAPTIONS)))
    assert rows == []  # all cached
    torch.testing.assert_close(again["text_features"], reference.flip(0), atol=1e-5, rtol=1e-5)
    # The same bits whatever batch a caption first came in (exact resume, sharded evaluation).
    other = _frozen()
    other.tokenize(CAPTIONS[1:2] + ["another caption", "and a third one"])
    assert torch.equal(other.tokenize(CAPTIONS)["text_features"], tokens["text_features"])
    # The model reads the cache as it reads the encoder. MCM's image-path output layers start at
    # zero, so they are given weights first; the alignment embeddings read the text at every stage
    # (the logits of a fresh model in eval mode hardly move: BatchNorm's fresh running statistics).
    with torch.no_grad():
        for block in model.mcm.values():
            block.v_attn.out_proj.weight.normal_(std=0.5)
            block.v_mlp.fc2.weight.normal_(std=0.5)
    image = torch.rand(3, 1, 32, 32)
    cached = model(image, **tokens)
    plain = model(image, tokens["input_ids"], tokens["attention_mask"])
    rolled = tokens["text_features"].roll(-1, 0)  # row 0 gets caption 1's features
    wrong = model(image, **{**tokens, "text_features": rolled})
    torch.testing.assert_close(cached["logits"], plain["logits"], atol=1e-5, rtol=1e-5)
    for c, p, w in zip(cached["alignment"], plain["alignment"], wrong["alignment"]):
        for key in ("img", "txt"):
            torch.testing.assert_close(c[key], p[key], atol=1e-5, rtol=1e-5)
        assert (w["txt"][0] - p["txt"][0]).abs().max() > 1e-3  # other features, other embedding


def test_loading_other_weights_drops_the_cache():
    model, other = _frozen(0), _frozen(1)
    stale = model.tokenize(CAPTIONS[:1])["text_features"]
    model.load_state_dict(other.state_dict())
    fresh = model.tokenize(CAPTIONS[:1])["text_features"]
    torch.testing.assert_close(fresh, other.tokenize(CAPTIONS[:1])["text_features"])
    assert not torch.allclose(fresh, stale)


def test_the_cache_is_bounded_and_a_fine_tuned_encoder_has_none(monkeypatch):
    model = _frozen()
    monkeypatch.setattr(type(model.text), "CACHE_SIZE", 2)
    for i in range(5):
        model.tokenize([f"caption number {i}"])
    assert list(model.text._features) == ["caption number 3", "caption number 4"]
    tuned = build_model(tiny_config(image_size=32))
    assert "text_features" not in tuned.tokenize(CAPTIONS)


def test_a_pretrained_folder_loads_quietly_and_missing_weights_are_an_error(tmp_path, capsys):
    import json

    from transformers import BertConfig, BertModel

    from tmc.text import TextEncoder, bert_uncased_tokenizer

    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64)
    BertModel(config).save_pretrained(tmp_path)  # with a pooler, which TMC does not build
    bert_uncased_tokenizer().save_pretrained(tmp_path)
    enc = TextEncoder(str(tmp_path), length=8)
    assert enc.hidden_size == 32
    captured = capsys.readouterr()
    assert "UNEXPECTED" not in captured.out + captured.err and "Loading weights" not in captured.err
    # A config asking for a third layer that the weights lack: the load must fail, not train noise.
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(RuntimeError, match="lacks weights"):
        TextEncoder(str(tmp_path), length=8)
