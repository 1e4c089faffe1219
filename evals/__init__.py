"""Evaluation and serving: what ``minitron eval``, ``eval-fc``, ``serve``, ``chat`` and ``bench serve`` run.

evals owns the eval harness and its tasks (MMLU, IFEval, RAG, BFCL function calling, roleplay), the generation
backends (a model directory in-process, or any OpenAI-compatible server through the ``openai`` SDK), the per-item
cache, the reports, vLLM serving, the terminal chat and the serving benchmark.

It may import the minitron core (``minitron.scoring``, ``minitron.data``, ``minitron.weights``, ``minitron.io``...)
and field libraries (transformers, lm-eval, vLLM, the openai SDK, bfcl-eval), never ``align``: align and evals
are independent layers, and only ``minitron.pipeline`` combines them (import contracts in pyproject.toml, checked
by ``lint-imports``).
"""
