"""Shipped text: calibration, training and held-out splits are disjoint by Wikipedia article."""

from __future__ import annotations

import re

import pytest

from hf_gqa import data


def titles(text: str) -> set[str]:
    return set(re.findall(r"^= (.+) =$", text, flags=re.M))


def test_wikipedia_splits_are_disjoint_by_article():
    heldout = titles(data.read_text(data.HELDOUT_TEXT))
    calibration = titles(data.calibration_text("wikipedia"))
    train = titles(data.train_text("wikipedia"))
    assert (len(heldout), len(calibration), len(train)) == (12, 10, 83)
    assert not heldout & calibration and not heldout & train and not calibration & train
    assert len(data.heldout_documents()) == 12


def test_mixed_calibration_holds_both_corpora_in_any_prefix_and_loses_nothing():
    austen, wiki = data.calibration_text("austen"), data.calibration_text("wikipedia")
    mixed = data.calibration_text("mixed")
    for source in (austen, wiki):
        for paragraph in source.split("\n\n"):
            assert paragraph.strip("\n") in mixed
    assert len(mixed) < len(austen) + len(wiki)  # only blank lines are dropped
    head = mixed[:20_000]
    assert "Animalia" in head and "Bennet" in head


def test_unknown_corpus_names_the_choices():
    with pytest.raises(ValueError, match="austen.*wikipedia.*mixed"):
        data.calibration_text("shakespeare")
    with pytest.raises(ValueError, match="austen.*wikipedia"):
        data.train_text("shakespeare")
