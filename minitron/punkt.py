"""NLTK's ``punkt_tab`` offline: lm-eval's IFEval checkers (and the SFT mix's constraint checks) split sentences with it.

No package registry ships ``punkt_tab`` and it cannot be downloaded offline. ``ensure_punkt`` trains one with
NLTK's ``PunktTrainer`` on English text (the Gutenberg corpus of ``../shared/data`` when present, else a fallback
text file), writes it under ``$MINITRON_CACHE/nltk_data`` (default ``~/.cache/minitron/nltk_data``) and points
``NLTK_DATA`` there. A ``punkt_tab`` that NLTK already finds (e.g. from ``nltk.download``) is used as is.
Call it before importing ``lm_eval.tasks.ifeval.instructions``, which otherwise tries to download punkt.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from minitron.data import DataError, iter_texts, read_jsonl
from minitron.io import atomic_dir

GUTENBERG = Path(__file__).resolve().parents[2] / "shared" / "data" / "lm" / "gutenberg"


def nltk_data_dir() -> Path:
    """The project's NLTK data folder (``$MINITRON_CACHE/nltk_data``)."""
    root = os.environ.get("MINITRON_CACHE") or Path.home() / ".cache" / "minitron"
    return Path(root) / "nltk_data"


def _punkt_text(fallback: Path | None, max_chars: int) -> str:
    """English training text for Punkt: Gutenberg validation books, else the fallback's IFEval prompts, else
    Python's own English documentation (``pydoc_data.topics``, in every CPython install)."""
    if GUTENBERG.exists():
        chunks, total = [], 0
        for text in iter_texts(GUTENBERG, split="validation"):
            chunks.append(text[: max_chars - total])
            total += len(chunks[-1])
            if total >= max_chars:
                break
        return "\n\n".join(chunks)
    if fallback is not None and fallback.exists():
        return "\n\n".join(r["prompt"] for r in read_jsonl(fallback))
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise DataError("no English text to train NLTK's punkt_tab: install it with "
                        "`python -m nltk.downloader punkt_tab`") from None
    return "\n\n".join(topics.values())[:max_chars]


def ensure_punkt(fallback_text: Path | None = None, max_chars: int = 2_000_000) -> Path:
    """Make ``nltk.data.find("tokenizers/punkt_tab/english/")`` succeed offline; returns the data dir used."""
    import nltk
    from nltk.tabdata import TabEncoder
    from nltk.tokenize.punkt import PunktTrainer

    root = nltk_data_dir()
    os.environ["NLTK_DATA"] = os.pathsep.join(dict.fromkeys([str(root), *filter(None, [os.environ.get("NLTK_DATA")])]))
    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))
    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        return root
    except LookupError:
        pass
    trainer = PunktTrainer()
    trainer.INCLUDE_ALL_COLLOCS = True
    trainer.train(_punkt_text(fallback_text, max_chars), finalize=True)
    params, enc = trainer.get_params(), TabEncoder()
    with atomic_dir(root / "tokenizers" / "punkt_tab" / "english") as tmp:
        (tmp / "collocations.tab").write_text(enc.tups2tab(params.collocations), newline="")
        (tmp / "sent_starters.txt").write_text(enc.set2txt(params.sent_starters), newline="")
        (tmp / "abbrev_types.txt").write_text(enc.set2txt(params.abbrev_types), newline="")
        (tmp / "ortho_context.tab").write_text(enc.ivdict2tab(params.ortho_context), newline="")
    nltk.data.find("tokenizers/punkt_tab/english/")
    return root


def seed_langdetect() -> None:
    """One verdict per text from IFEval's language and case checkers: they call langdetect, which samples from
    os.urandom unless seeded (unseeded, "ana is a doctor." is English in about two calls of three)."""
    from langdetect import DetectorFactory

    DetectorFactory.seed = 0


@functools.cache
def ifeval_instructions() -> tuple[dict, dict, Any]:
    """lm-eval's IFEval instruction registry, its conflict table and its util module, imported once, after punkt
    is in place (the SFT mix's constraints and the demo world's instruction pairs both use its checkers), with
    langdetect seeded so that the same text always gets the same verdict."""
    ensure_punkt()
    seed_langdetect()
    from lm_eval.tasks.ifeval import instructions_registry as registry
    from lm_eval.tasks.ifeval import instructions_util as util

    return registry.INSTRUCTION_DICT, registry.INSTRUCTION_CONFLICTS, util
