"""Verdicts by BFCL's own checker: is a decoded reply a correct answer to one BFCL question?

The checker is upstream's (``bfcl_eval.eval_checker.ast_eval.ast_checker``, loaded by ``evals.bfcl_upstream``);
this module only runs it the way BFCL's eval runner does for one entry (``_evaluate_single_ast_entry`` and
``_evaluate_single_relevance_entry`` in ``bfcl_eval/eval_checker/eval_runner.py``):

* AST categories: a reply that does not decode, or whose decoded form is not ``[{func: {param: value}}]``, is
  wrong; otherwise ``ast_checker`` decides (its ``model_name`` is ``FC_MODEL`` for tool calls, where names come
  back with underscores for dots, and ``PROMPT_MODEL`` for calls written as text);
* irrelevance: correct iff the reply holds no call (undecodable text, or an empty decoded form); relevance: the
  opposite.

Where the runner would crash (upstream's checker raising on a data quirk, e.g. an array parameter without an
``items`` type), the reply is wrong with error type ``checker_error``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys

from evals.bfcl_decode import FC, Decoded
from evals.bfcl_upstream import FC_MODEL, PROMPT_MODEL, language, upstream


@dataclasses.dataclass
class Verdict:
    """The checker's answer for one reply; ``error_type`` is BFCL's tag (``simple_function_checker:...``)."""

    valid: bool
    error: str = ""
    error_type: str = ""


def is_relevance(category: str) -> bool:
    """Relevance categories only need some call (``live_relevance``), irrelevance ones need none."""
    return "relevance" in category and "irrelevance" not in category


def check(question: dict, ground_truth: list | None, decoded: Decoded, category: str) -> Verdict:
    """Score one decoded reply. ``ground_truth`` is the possible answer's list of ``{func: {param: [values]}}``;
    None (or an irrelevance category) means no call is expected."""
    up = upstream()
    if "relevance" in category or ground_truth is None:
        has_call = decoded.calls is not None and not up.is_empty_output(decoded.calls)
        if is_relevance(category):
            return Verdict(True) if has_call else Verdict(
                False, f"Invalid syntax. Failed to decode AST when it should have. {decoded.error}",
                "relevance_error:decoder_failed")
        return Verdict(True) if not has_call else Verdict(
            False, f"Valid syntax. Successfully decode AST when it should not: {decoded.calls!r:.300}",
            "irrelevance_error:decoder_success")
    if not all(isinstance(c, dict) and len(c) == 1 and isinstance(next(iter(c.values())), dict) for c in ground_truth):
        return Verdict(False, f"ground truth {ground_truth!r:.200} is not a list of {{func: {{param: [...]}}}} "
                       "(multi-turn and agentic BFCL categories are not AST-checked)", "unsupported_ground_truth")
    if decoded.calls is None:
        return Verdict(False, f"Invalid syntax. Failed to decode AST. {decoded.error}", "ast_decoder:decoder_failed")
    if not up.is_function_calling_format_output(decoded.calls):
        return Verdict(False, f"Did not output in the specified format: {decoded.calls!r:.300}",
                       "ast_decoder:decoder_wrong_output_format")
    model = FC_MODEL if decoded.mode == FC else PROMPT_MODEL
    try:  # upstream's JavaScript converter prints parse errors: keep stdout for results (eval-fc prints JSON)
        with contextlib.redirect_stdout(sys.stderr):
            result = up.ast_checker(question.get("function") or [], decoded.calls, ground_truth, language(category),
                                    category, model)
    except Exception as e:  # noqa: BLE001 - BFCL's runner would stop here; one reply is wrong instead
        return Verdict(False, f"BFCL's checker raised {type(e).__name__}: {e}", "checker_error")
    if result["valid"]:
        return Verdict(True)
    return Verdict(False, _error_text(result["error"]), result.get("error_type", ""))


def _error_text(error: list | str) -> str:
    """BFCL's error list (strings, and dicts per tried call for parallel categories) as one line."""
    if isinstance(error, str):
        return error
    return " ".join(e if isinstance(e, str) else str(e) for e in error)[:1000]
