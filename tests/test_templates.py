"""Prompt template files: the CLIP paper's 80 ImageNet templates, checked against open_clip's copy."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from clipforge.eval.templates import TemplateError, available_templates, load_templates


def open_clip_metadata():
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("open_clip_torch is a test reference: install it with --no-deps")
    path = Path(list(spec.submodule_search_locations)[0]) / "zero_shot_metadata.py"
    module_spec = importlib.util.spec_from_file_location("open_clip_zero_shot_metadata", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)  # a plain data file: no torchvision import
    return module


def test_imagenet_templates_are_the_papers() -> None:
    reference = open_clip_metadata()
    assert load_templates("imagenet") == [t("{}") for t in reference.OPENAI_IMAGENET_TEMPLATES]
    assert load_templates("imagenet-simple") == [t("{}") for t in reference.SIMPLE_IMAGENET_TEMPLATES]
    assert len(load_templates("imagenet")) == 80


def test_dataset_sets_and_aliases() -> None:
    assert {"fashion-mnist", "openclipart", "tuxpaint", "emoji", "imagenet"} <= set(available_templates())
    assert load_templates("drawings") == load_templates("openclipart")
    for name in ("fashion-mnist", "openclipart", "tuxpaint", "emoji"):
        templates = load_templates(name)
        assert len(templates) >= 5 and all(t.count("{}") == 1 for t in templates)


def test_user_files_and_errors(tmp_path: Path) -> None:
    good = tmp_path / "mine.json"
    good.write_text('{"templates": ["a {} here.", "the {}."]}')
    assert load_templates(str(good)) == ["a {} here.", "the {}."]
    bad = tmp_path / "bad.txt"
    bad.write_text("a photo of a {}.\nno placeholder\n")
    with pytest.raises(TemplateError, match=r"bad\.txt: template 2 'no placeholder' must contain exactly one"):
        load_templates(str(bad))
    with pytest.raises(TemplateError, match="no template set 'nope'"):
        load_templates("nope")
