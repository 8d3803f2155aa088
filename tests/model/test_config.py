"""The config dataclasses as the one place of a setting: its allowed values (a Literal type), its
help text (field metadata), and the flags and checks generated from them."""
import dataclasses
import json
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from tmc.config import PRESETS, ModelConfig, PresetName
from tmc.train_config import TrainConfig, build_parser

REPO = Path(__file__).resolve().parents[2]

# Written out here, apart from the code, so a value dropped from a Literal fails a test.
EXPECTED_CHOICES = {
    ModelConfig: {
        "mcm_attention": ("softmax", "sigmoid"),
        "alignment_form": ("sigmoid", "literal"),
    },
    TrainConfig: {
        "dataset": ("demo", "qata", "mosmed", "mosmedplus", "duke", "csv"),
        "preset": ("", "paper", "tiny", "small", "demo"),
        "split_mode": ("auto", "paper", "layout", "layout-val"),
        "augment": ("paper", "text-consistent", "none"),
        "lr_schedule": ("plateau", "cosine", "cosine-time"),
        "seg_loss": ("bce", "bce+dice"),
        "amp": ("auto", "off", "bf16", "fp16"),
        "captions": ("varied", "literal"),
    },
}
LITERAL_FIELDS = [(cls, name) for cls, fields in EXPECTED_CHOICES.items() for name in fields]


def _literal_args(cls, name):
    tp = typing.get_type_hints(cls)[name]
    assert typing.get_origin(tp) is typing.Literal, f"{cls.__name__}.{name} is not typed as a Literal"
    return typing.get_args(tp)


def _action(flag):
    return build_parser()._option_string_actions[flag]


@pytest.mark.parametrize("cls,name", LITERAL_FIELDS, ids=lambda v: getattr(v, "__name__", v))
def test_choice_fields_are_literals_and_their_flags_offer_exactly_those_values(cls, name):
    assert _literal_args(cls, name) == EXPECTED_CHOICES[cls][name]
    assert tuple(_action("--" + name.replace("_", "-")).choices) == _literal_args(cls, name)


def test_no_other_field_is_a_literal():
    for cls, expected in EXPECTED_CHOICES.items():
        hints = typing.get_type_hints(cls)
        literal = {f.name for f in dataclasses.fields(cls)
                   if typing.get_origin(hints[f.name]) is typing.Literal}
        assert literal == set(expected)


@pytest.mark.parametrize("cls,name", LITERAL_FIELDS, ids=lambda v: getattr(v, "__name__", v))
def test_a_value_outside_the_literal_is_refused_with_the_choices(cls, name):
    with pytest.raises(ValueError) as info:
        cls(**{name: "bogus"})
    message = str(info.value)
    assert "--" + name.replace("_", "-") in message and "'bogus'" in message
    for choice in EXPECTED_CHOICES[cls][name]:
        assert repr(choice) in message


def test_every_value_of_a_literal_is_accepted():
    for cls, name in LITERAL_FIELDS:
        for choice in EXPECTED_CHOICES[cls][name]:
            assert getattr(cls(**{name: choice}), name) == choice


def test_every_field_has_help_text_and_its_flag_shows_it():
    parser = build_parser()
    text = "".join(parser.format_help().split())  # argparse wraps lines (also after hyphens)
    for cls in (ModelConfig, TrainConfig):
        for f in dataclasses.fields(cls):
            help_text = f.metadata.get("help", "")
            assert help_text.strip(), f"{cls.__name__}.{f.name} has no help"
            action = parser._option_string_actions["--" + f.name.replace("_", "-")]
            assert action.help.startswith(help_text)
            assert "".join(help_text.split()) in text


def test_preset_names_are_the_presets():
    assert set(typing.get_args(PresetName)) == set(PRESETS)


def test_module_constants_follow_the_literals():
    from tmc.augment import AUGMENT_MODES
    from datasets.registry import DATASETS
    from tmc.attention import WEIGHTINGS
    from tmc.losses import ALIGNMENT_FORMS, SEGMENTATION_KINDS
    assert WEIGHTINGS == EXPECTED_CHOICES[ModelConfig]["mcm_attention"]
    assert ALIGNMENT_FORMS == EXPECTED_CHOICES[ModelConfig]["alignment_form"]
    assert SEGMENTATION_KINDS == EXPECTED_CHOICES[TrainConfig]["seg_loss"]
    assert AUGMENT_MODES == EXPECTED_CHOICES[TrainConfig]["augment"]
    assert tuple(DATASETS) == EXPECTED_CHOICES[TrainConfig]["dataset"]


def test_the_configs_import_without_torch():
    code = ("import json, sys\nimport tmc.config, tmc.train_config\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
