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


def test_fused_self_attention_equals_transformers_bert_and_loads_its_layout():
    """TextEncoder's BERT (q/k/v in one Linear, tmc.attention.attend) against transformers' own
    BertModel with eager attention, loaded from that model's state dict: outputs and gradients."""
    import transformers

    from tmc.text import FusedSelfAttention, TextEncoder

    torch.manual_seed(0)
    ours = TextEncoder("random:2x64", length=12)
    assert sum(isinstance(m, FusedSelfAttention) for m in ours.modules()) == 2
    reference = transformers.BertModel(ours.encoder.config, add_pooling_layer=False)
    reference.set_attn_implementation("eager")
    for p in reference.parameters():  # random biases too: a dropped or misplaced one would show
        torch.nn.init.normal_(p, std=0.2)
    ours.encoder.load_state_dict(reference.state_dict())  # query / key / value joined on load
    ours.eval(), reference.eval()
    tokens = ours.tokenize(["bilateral infection", "unilateral infection, middle left lung"])
    assert tokens["attention_mask"].sum() < tokens["attention_mask"].numel()  # padding is masked
    got = ours(**tokens)
    want = reference(**tokens).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    g = torch.randn_like(got)
    got.backward(g)
    want.backward(g)
    for layer, ref_layer in zip(ours.encoder.encoder.layer, reference.encoder.layer):
        fused, plain = layer.attention.self.qkv.weight.grad, ref_layer.attention.self
        joined = torch.cat([plain.query.weight.grad, plain.key.weight.grad, plain.value.weight.grad])
        torch.testing.assert_close(fused, joined, rtol=1e-4, atol=1e-5)
    assert set(ours.encoder.state_dict()) - set(reference.state_dict()) == {
        f"encoder.layer.{i}.attention.self.qkv.{kind}" for i in range(2) for kind in ("weight", "bias")}


def test_adam_state_saved_with_query_key_value_apart_resumes_joined():
    """A training checkpoint of a fine-tuned BERT saved while query, key and value were three Linears:
    its Adam state, split here the slow obvious way, is renumbered and joined to today's."""
    from tmc.checkpoint import upgrade_optimizer_state

    torch.manual_seed(0)
    model = build_model(tiny_config(text_model="random:2x64", freeze_text=False))
    image_side = [p for n, p in model.named_parameters() if not n.startswith("text.")]
    optimizer = torch.optim.Adam([{"params": image_side}, {"params": list(model.text.parameters()), "lr": 1e-5}],
                                 lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    today = optimizer.state_dict()

    name_of = {id(p): n for n, p in model.named_parameters()}
    names = [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]
    old_state, old_keys, groups, index = {}, [], [], 0
    for group in today["param_groups"]:
        ids = []
        for i in group["params"]:
            name, state = names[i], today["state"][i]
            if name.endswith("attention.self.qkv.weight"):  # q.w, q.b, k.w, k.b, v.w, v.b
                bias = today["state"][i + 1]
                pieces = []
                for j in range(3):
                    for s in (state, bias):
                        rows = s["exp_avg"].shape[0] // 3
                        pieces.append({k: v[j * rows:(j + 1) * rows] if v.ndim else v for k, v in s.items()})
                old_keys += [name.replace("qkv.weight", f"{p}.{k}") for p in ("query", "key", "value")
                             for k in ("weight", "bias")]
            elif name.endswith("attention.self.qkv.bias"):
                continue
            else:
                pieces, old_keys = [state], old_keys + [name]
            for piece in pieces:
                old_state[index] = piece
                ids.append(index)
                index += 1
        groups.append({**group, "params": ids})
    assert sum("attention.self.query.weight" in k for k in old_keys) == 2  # two layers, split

    joined = upgrade_optimizer_state({"state": old_state, "param_groups": groups}, old_keys, optimizer, model)
    assert joined["param_groups"] == today["param_groups"]
    assert joined["state"].keys() == today["state"].keys()
    for i, state in today["state"].items():
        for k, v in state.items():
            assert torch.equal(joined["state"][i][k], v), (names[i], k)
    optimizer.load_state_dict(joined)
    today_keys = model.state_dict().keys()
    assert upgrade_optimizer_state(today, today_keys, optimizer, model) is today  # today's layout: as is
