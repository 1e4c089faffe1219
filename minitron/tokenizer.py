"""Train a byte-level BPE tokenizer offline and wrap it as a standard Hugging Face tokenizer.

The result has BOS/EOS/PAD/UNK, the ChatML turn tokens, the tool-call tokens and the project chat template
(which starts with the BOS token, so the tokenizer itself does not add one).
"""

from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from minitron.chat_format import BOS, CHAT_TEMPLATE, EOS, PAD, SPECIAL_TOKENS, TOOL_TOKENS, UNK


def train_bpe(texts: Iterable[str], vocab_size: int = 1024, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """A byte-level BPE of ``vocab_size`` tokens (specials included) trained on ``texts``."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=SPECIAL_TOKENS[4:],
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )
    fast.add_tokens(TOOL_TOKENS)
    fast.chat_template = CHAT_TEMPLATE
    return fast
