"""Orchestration: the one layer that knows every package.

``recipe`` runs a whole pipeline from one recipe file (``minitron run``), ``check`` validates a recipe before any
work (and is ``--dry-run``), ``report`` writes the run's tables and plots, ``viz`` holds the notebooks' helpers and
``bench`` the benchmarks. Only this sub-package and the CLI may import ``align`` and ``evals``; the rest of
``minitron`` (the prune + distill core) imports neither (checked by the import contract in pyproject.toml).
"""
