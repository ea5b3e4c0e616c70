"""The shipped calibration text (tools/make_calibration.py builds it): every kind of text it holds
is already in its opening, which `convert --calibration` measures by default, and none of the texts
the benchmarks and tests evaluate on is in it."""

from __future__ import annotations

import re

from ggufkit.commands.convert import DEFAULT_CALIBRATION

KINDS = {
    "English prose and dialogue": r'^"[A-Z][^"\n]*[,.?!]"',  # a line of quoted speech
    "Python code": r"^(def|class) \w+.*:$",
    "technical prose (the Python tutorial's reST)": r":keyword:`",
    "French": r"\bDéclaration universelle des droits de l’homme\b",
    "German": r"\bMenschenrechte\b",
    "Spanish": r"\b(San Lucas|Declaración Universal)\b",
    "Italian": r"\bDIRITTI UMANI\b",
}


def test_every_kind_is_in_the_opening():
    text = DEFAULT_CALIBRATION.read_text(encoding="utf-8")
    assert 100_000 < len(text.encode()) < 200_000
    assert text.startswith("PRIDE AND PREJUDICE\n\nBy Jane Austen\n\nChapter 1\n\nIt is a truth universally")
    # 20000 characters lie within the first 16 windows of 512 tokens (DEFAULT_CALIBRATION_CHUNKS) of
    # any tokenizer with 2.5 characters a token or more (SmolLM2's: 3.7 on this text)
    head = text[:20_000]
    missing = [kind for kind, pattern in KINDS.items() if not re.search(pattern, head, re.M)]
    assert missing == []
    # Russian, Chinese, Japanese: further on
    for script in (r"[а-яА-Я]{4}", r"[\u4e00-\u9fff]", r"[\u3040-\u30ff]"):
        assert re.search(script, text)


def test_no_evaluation_text_is_in_it():
    text = DEFAULT_CALIBRATION.read_text(encoding="utf-8")
    for phrase in ("Emma Woodhouse", "Catherine Morland", "class ArgumentParser", "EMMA", "NORTHANGER ABBEY"):
        assert phrase not in text
