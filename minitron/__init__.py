"""minitron: prune + distill core, and the one CLI.

The core owns what compression needs and what every layer shares: stage configs (``config``), data sources
(``data``, ``mixture``), model sources and loading (``model_source``: directories, GGUF files, hub names), weights
tensor by tensor (``weights``), architectures (``adapters``), importance scores (``importance``: "where are heads
scored?"), pruning (``prune``, ``search``), the training loop (``trainer``) behind LM training (``lm_train``) and
distillation (``distill``, ``kd_loss``, ``teacher_logits``), scoring of sequences (``scoring``), chat and tool
formats (``chat_format``, ``tool_schema``), fingerprints of outputs (``fingerprint``), the demo world and teacher
(``world``, ``teacher``, ``tokenizer``).

The core imports neither ``align`` nor ``evals``. ``minitron.pipeline`` (orchestration: recipes, checks, reports,
notebook helpers, benchmarks) and ``minitron.cli`` are the only places that combine the layers; the import
contracts in pyproject.toml enforce it (``lint-imports``, run by ``make test``).
"""
