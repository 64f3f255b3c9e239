"""What the transformers-based inference backends share: load, tokenize, decode, stream.

A subclass decides where the weights go (``build_model``), whether decoding
may use the static cache (``static_decoding``) and how ranks agree on tokens
(``agree``); everything else -- tokenizer, adapter merge, end-of-sequence ids,
incremental detokenizing -- is here once.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Iterator, Literal

from pydantic import Field

from panda.infer.decode import DecodeState, StaticDecoding, decode
from panda.infer.generation import Chunk, Prompt
from panda.infer.sampling import Sampling
from panda.plugins.api import InferBackend, Options


class TransformersOptions(Options):
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Weights dtype; auto = bfloat16 on a GPU, float32 on the CPU.")
    attn: Literal["sdpa", "eager", "flash_attention_2", "flex_attention"] = Field(
        "sdpa", description="Attention implementation.")
    trust_remote_code: bool = Field(False, description="Run Python code shipped with the model "
                                    "folder. Off unless you trust its source.")


class TransformersBackend(InferBackend):
    """Base of the hf, torch-tp and ds backends (not registered itself)."""

    Options: ClassVar[type[TransformersOptions]] = TransformersOptions

    model: Any = None
    # True: decode with transformers' generate (for engines that own the KV cache)
    uses_hf_generate: bool = False

    # -- loading -------------------------------------------------------------------------------
    def load(self, model_path: str, adapter: str | None = None) -> None:
        from panda.infer.loading import check_adapter_folder, check_model_folder, load_tokenizer
        from panda.infer.prompting import eos_token_ids, pad_token_id

        check_model_folder(model_path)
        if adapter:
            check_adapter_folder(adapter)
        self.tokenizer = load_tokenizer(model_path, adapter,
                                        trust_remote_code=self.options.trust_remote_code)
        self.model = self.build_model(model_path, adapter)
        self.eos_token_ids = eos_token_ids(self.tokenizer, self.model)
        self.pad_token_id = pad_token_id(self.tokenizer)
        self._static = self.static_decoding()

    def build_model(self, model_path: str, adapter: str | None) -> Any:
        """Load the weights where this backend wants them; merge ``adapter`` first."""
        raise NotImplementedError

    def static_decoding(self) -> StaticDecoding | None:
        """The static-cache decoder to use, or None for the dynamic cache."""
        return None

    def agree(self) -> Callable | None:
        """A function that makes every rank use rank 0's tokens (None on one process)."""
        return None

    @property
    def context_length(self) -> int | None:
        from panda.infer.loading import context_length

        return context_length(self.model)

    def close(self) -> None:
        self.model = None
        self._static = None

    # -- generating ----------------------------------------------------------------------------
    def token_ids(self, prompt: Prompt) -> list[int]:
        from panda.infer.prompting import encode_text

        return list(prompt) if not isinstance(prompt, str) else encode_text(self.tokenizer, prompt)

    def stream(self, prompts: list[Prompt], sampling: Sampling) -> Iterator[Chunk]:
        """Chunks of text as they are decoded; each prompt ends with a chunk that has a finish reason."""
        from panda.infer.detokenize import IncrementalDetokenizer

        ids = [self.token_ids(p) for p in prompts]
        texts = [IncrementalDetokenizer(self.tokenizer) for _ in ids]
        state = DecodeState([None] * len(ids), [len(p) for p in ids])
        announced = [False] * len(ids)
        for tokens in self.decode_steps(ids, sampling, state):
            for row, token in enumerate(tokens):
                if token is not None:
                    piece = texts[row].add(token)
                    if piece:
                        yield Chunk(row, piece)
                elif not announced[row]:
                    announced[row] = True
                    yield Chunk(row, texts[row].flush(), state.finish_reasons[row],
                                state.generated[row])
        for row in range(len(ids)):
            if not announced[row]:
                yield Chunk(row, texts[row].flush(), state.finish_reasons[row],
                            state.generated[row])

    def decode_steps(self, ids: list[list[int]], sampling: Sampling, state: DecodeState
                     ) -> Iterator[list[int | None]]:
        """Per step, each row's new token (None once finished): panda's loop or generate."""
        if self.uses_hf_generate:
            from panda.infer.hf_generate import generate_steps

            return generate_steps(self.model, ids, sampling, pad_token_id=self.pad_token_id,
                                  eos_token_ids=self.eos_token_ids,
                                  context_length=self.context_length, state=state)
        return decode(self.model, ids, sampling, pad_token_id=self.pad_token_id,
                      eos_token_ids=self.eos_token_ids, context_length=self.context_length,
                      static=self._static, agree=self.agree(), state=state)

    def generate(self, prompts: list[Prompt], **sampling: Any) -> Iterator[tuple[int, str]]:
        for chunk in self.stream(prompts, Sampling.from_kwargs(**sampling)):
            if chunk.text:
                yield chunk.index, chunk.text

    def generate_ids(self, prompts: list[Prompt], **sampling: Any) -> list[list[int]]:
        """The new token ids of each prompt (no text): what tests compare across backends."""
        ids = [self.token_ids(p) for p in prompts]
        out: list[list[int]] = [[] for _ in ids]
        state = DecodeState([None] * len(ids), [len(p) for p in ids])
        for tokens in self.decode_steps(ids, Sampling.from_kwargs(**sampling), state):
            for row, token in enumerate(tokens):
                if token is not None:
                    out[row].append(token)
        return out
