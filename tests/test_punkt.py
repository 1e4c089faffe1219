"""NLTK's punkt_tab offline: trained from Python's own documentation when no corpus is around."""

from __future__ import annotations

import os
import subprocess
import sys


def test_punkt_trains_offline_without_any_corpus(tmp_path):
    code = ("import minitron.punkt as p; p.GUTENBERG = p.Path('/nonexistent'); p.ensure_punkt(max_chars=100_000); "
            "import nltk; print(len(nltk.sent_tokenize('It rains. The sun shines! Does it?')))")
    env = {**os.environ, "MINITRON_CACHE": str(tmp_path), "NLTK_DATA": ""}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "3"
    assert (tmp_path / "nltk_data" / "tokenizers" / "punkt_tab" / "english" / "sent_starters.txt").exists()


def test_ifeval_case_checks_give_one_verdict_per_text():
    """The lowercase/capital checkers call langdetect, which draws from os.urandom unless seeded: unseeded, "ana is
    a doctor." was "en" in about two calls of three and "es" otherwise, so one seed made different format pairs."""
    from align.constraints import obeyed

    verdicts = {tuple(obeyed("ana is a doctor.", ["change_case:english_lowercase"], [{}])) for _ in range(30)}
    assert len(verdicts) == 1
