"""BFCL's own checker and prompt-mode decoder, loaded from the ``bfcl-eval`` package without its provider SDKs.

``bfcl-eval`` requires numpy 1.x and a dozen provider SDKs (openai, anthropic, cohere, mistral...) that the
project does not install: it is installed with ``--no-deps`` plus the tree-sitter pins its Java/JavaScript
parsers need (``INSTALL``). Its AST checker imports ``bfcl_eval.constants.model_config``, whose real module
imports every provider handler; the checker only reads one flag from it, ``MODEL_CONFIG_MAPPING[model]
.underscore_to_dot``. So a stand-in module with two entries is registered first:

* ``FC_MODEL`` (``underscore_to_dot=True``): BFCL's function-calling mode, where tools are offered natively and
  a name's dots may come back as underscores (OpenAI's name rule);
* ``PROMPT_MODEL`` (``underscore_to_dot=False``): BFCL's prompt mode, where the model writes calls as text.

Usage::

    from evals.bfcl_upstream import upstream
    bfcl = upstream()             # MinitronError naming the install command when bfcl-eval is absent
    bfcl.ast_checker(functions, decoded, ground_truth, bfcl.Language.PYTHON, "simple_python", FC_MODEL)
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import operator
import sys
import types
from typing import Any

from minitron.config import MinitronError

VERSION = "2026.3.23"  # the bfcl-eval release the project's agreement figures were measured on
INSTALL = (f"pip install --no-deps bfcl-eval=={VERSION} tree_sitter==0.21.3 tree-sitter-java==0.21.0 "
           "tree-sitter-javascript==0.21.4")
FC_MODEL, PROMPT_MODEL = "minitron-fc", "minitron-prompt"  # no "_": the checker reads "_" in names as "/"
_CONFIG_MODULE = "bfcl_eval.constants.model_config"


class BFCLMissing(MinitronError):
    """bfcl-eval (or one of the parsers its checker needs) is not installed."""


def _register_model_config() -> None:
    """Put the two stand-in model configs where the checker looks them up (the real module if already loaded)."""
    module = sys.modules.get(_CONFIG_MODULE)
    if module is None:
        module = types.ModuleType(_CONFIG_MODULE)
        module.__doc__ = "minitron's stand-in: the checker reads MODEL_CONFIG_MAPPING[model].underscore_to_dot only"
        module.MODEL_CONFIG_MAPPING = {}
        sys.modules[_CONFIG_MODULE] = module
    module.MODEL_CONFIG_MAPPING.setdefault(FC_MODEL, types.SimpleNamespace(underscore_to_dot=True, is_fc_model=True))
    module.MODEL_CONFIG_MAPPING.setdefault(PROMPT_MODEL,
                                           types.SimpleNamespace(underscore_to_dot=False, is_fc_model=False))


@functools.cache
def upstream() -> Any:
    """BFCL's pieces the project uses, as one namespace (loaded once).

    ``ast_checker``, ``decode_prompting`` (``default_decode_ast_prompting``: prompt-mode text -> decoded calls),
    ``is_function_calling_format_output``, ``is_empty_output``, the ``Language`` and ``ReturnFormat`` enums and
    ``version`` (the installed bfcl-eval's).
    """
    try:
        version = importlib.metadata.version("bfcl-eval")
        _register_model_config()
        from bfcl_eval.constants.enums import Language, ReturnFormat
        from bfcl_eval.eval_checker.ast_eval.ast_checker import ast_checker
        from bfcl_eval.model_handler import utils as handler_utils
        from bfcl_eval.utils import is_empty_output, is_function_calling_format_output
    except (ImportError, importlib.metadata.PackageNotFoundError) as e:
        what = getattr(e, "name", None) or "bfcl-eval"
        raise BFCLMissing(f"function calling is scored by BFCL's own checker, which needs {what} ({e}): "
                          f"install it with `.venv/bin/{INSTALL}` (or `make setup`)") from None
    # the prompt decoder's `eval` of argument expressions (resolve_ast_by_type) gets constant arithmetic only
    handler_utils.eval = _constant_eval
    return types.SimpleNamespace(ast_checker=ast_checker, decode_prompting=handler_utils.default_decode_ast_prompting,
                                 is_function_calling_format_output=is_function_calling_format_output,
                                 is_empty_output=is_empty_output, Language=Language, ReturnFormat=ReturnFormat,
                                 version=version)


def language(category: str) -> Any:
    """BFCL's ``Language`` of a category (its rule: ``javascript`` in the name, else ``java``, else Python)."""
    lang = upstream().Language
    if "javascript" in category:
        return lang.JAVASCRIPT
    return lang.JAVA if "java" in category else lang.PYTHON


def return_format(category: str) -> Any:
    """BFCL's prompt-mode ``ReturnFormat`` of a category (the syntax its decoder parses)."""
    return upstream().ReturnFormat(language(category).value)  # the enums share their values


# ---------------------------------------------------------------- BFCL's eval, constants only


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
        ast.USub: operator.neg, ast.UAdd: operator.pos}
_MAX_POW, _MAX_LEN = 1024, 100_000  # bounds that keep 9**9**9 or "x" * 10**12 from hanging the eval


def _constant_eval(source: str) -> Any:
    """What BFCL's decoder gets from ``eval`` for an argument such as ``2*3`` or ``1/3``: constant arithmetic only.

    Names, calls and attribute lookups raise ValueError (upstream's eval would run them: a model's text is not
    code to execute), so such a reply does not decode.
    """

    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, complex, str, bytes)):
            return node.value
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > _MAX_POW:
                raise ValueError(f"exponent {right} too large to evaluate")
            if isinstance(node.op, ast.Mult) and any(isinstance(x, (str, bytes)) for x in (left, right)):
                if max(len(x) if isinstance(x, (str, bytes)) else x for x in (left, right)) > _MAX_LEN:
                    raise ValueError("repeated string too long to evaluate")
            return _OPS[type(node.op)](left, right)
        raise ValueError(f"not constant arithmetic: {ast.unparse(node)[:100]!r}")

    return ev(ast.parse(source.strip(), mode="eval").body)
