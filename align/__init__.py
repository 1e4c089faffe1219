"""Alignment stages on TRL: SFT, reward model, DPO and online RL (RLOO/GRPO); ``minitron align`` runs them.

``align.pipeline`` (AlignConfig, run) chains the stages; ``align.data`` normalises SFT and preference data to
the project's chat messages; ``align.scoring`` holds the held-out measurements; ``align.report`` the table.
"""
