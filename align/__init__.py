"""Alignment stages on TRL: SFT, reward model, DPO and online RL (RLOO/GRPO), and, when named, KTO
(``align.kto``) and rejection sampling (``align.rejection``); ``minitron align`` runs them.

``align.pipeline`` (AlignConfig, run) chains the stages; ``align.data`` normalises SFT and preference data to
the project's chat messages; ``align.scoring`` holds the held-out measurements; ``align.stage_report`` the table.

align may import the minitron core (``minitron.scoring``, ``minitron.model_source``, ``minitron.fingerprint``...) and
field libraries (TRL, peft, transformers), never ``evals``: an eval after alignment is passed in by the caller
(``minitron.pipeline.align_then_eval``). Import contracts in pyproject.toml.
"""
