"""The tiny tokenizer of the demo and the tests, built from text kept in the repository.

A byte-level BPE with 512 entries trained on ``panda/assets/tiny_corpus.txt``:
any UTF-8 text (Chinese included) round-trips, nothing is downloaded, and the
result is committed under ``panda/assets/tokenizer-tiny`` (``build`` recreates it
exactly; a test checks that). The chat template marks roles with special tokens
so prompt masking is easy to see in ``panda data inspect``.
"""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets"
CORPUS = ASSETS / "tiny_corpus.txt"
TOKENIZER_DIR = ASSETS / "tokenizer-tiny"
VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + '\\n' + message['content'] + '</s>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' + '\\n' }}{% endif %}"
)


def build(out_dir: Path | str = TOKENIZER_DIR) -> Path:
    """Train the tokenizer on the corpus and save it as a transformers tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train([str(CORPUS)], trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        unk_token="<unk>", additional_special_tokens=SPECIAL_TOKENS[4:])
    wrapped.chat_template = CHAT_TEMPLATE
    out = Path(out_dir)
    wrapped.save_pretrained(out)
    return out


def load():
    """The committed tiny tokenizer (a ``PreTrainedTokenizerFast``)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


if __name__ == "__main__":
    print(build())
