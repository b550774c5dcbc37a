"""A random, tiny-width model with Qwen's vocabulary size (V = 151,936) and a word-level tokenizer
over that vocabulary, saved as an ordinary HF folder.

It is for measuring what scales with V x T (logits, the fused head, scoring) at the real vocabulary
size on a CPU: the transformer itself is negligible, the head is not. Tokens are the words
``w0 .. w151935``; ``w1`` is EOS, ``w0`` padding. A random head puts ~1/V on EOS, so sampled
completions run to ``max_new_tokens``: exactly the long-completion case."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from espo_lightning.data.source import PromptSource

QWEN_VOCAB_SIZE = 151_936


def build_wide_vocab_model(path: str | os.PathLike, vocab_size: int = QWEN_VOCAB_SIZE, hidden_size: int = 16,
                           num_layers: int = 1, seed: int = 0) -> Path:
    """Write the model and tokenizer to ``path`` (once: an existing folder is reused)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import Olmo2Config, Olmo2ForCausalLM, PreTrainedTokenizerFast

    path = Path(path)
    if (path / "config.json").exists():
        return path
    core = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(vocab_size)}, unk_token="w2"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="w0", eos_token="w1", unk_token="w2",
                                        padding_side="left")
    torch.manual_seed(seed)
    # OLMo-2 (a Llama-style decoder like Qwen) because transformers loads its tokenizer from
    # tokenizer.json as saved; a qwen2 config would make AutoTokenizer rebuild a byte-level BPE.
    config = Olmo2Config(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=32_768 + 64, tie_word_embeddings=True,
                         pad_token_id=0, eos_token_id=1, bos_token_id=1)
    model = Olmo2ForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


class WideVocabSource(PromptSource):
    """Prompts of a few random words ``w3 .. w9`` (words of one digit: transformers' loading of the
    word-level tokenizer splits longer digit runs; decoding every id works).

    Args:
        num_prompts: How many prompts.
        words: Words per prompt.
        seed: Seed of the words.
    """

    def __init__(self, num_prompts: int = 64, words: int = 8, seed: int = 0):
        self.num_prompts, self.words, self.seed = num_prompts, words, seed

    def rows(self) -> list[dict]:
        gen = torch.Generator().manual_seed(self.seed)
        ids = torch.randint(3, 10, (self.num_prompts, self.words), generator=gen).tolist()
        return [{"prompt": " ".join(f"w{i}" for i in row)} for row in ids]


def parity_reward(prompts, completions, **_) -> list[float]:
    """1.0 when a completion holds an even number of the digit 7: a reward with variance in every
    group of random completions, so advantages and gradients are not zero."""
    return [float(c.count("7") % 2 == 0) for c in completions]
