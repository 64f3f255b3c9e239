"""Inference: prompts, decoding, batch files and the chat loop.

The pieces, in the order a request flows through them:

* ``prompting``   text or chat messages -> prompt token ids (chat template when the model has one)
* ``sampling``    the sampling settings and the choice of the next token from logits
* ``decode``      prefill + token-by-token decoding of one batch (dynamic or static KV cache)
* ``detokenize``  token ids -> text pieces that are safe to print as they come
* ``generation``  many prompts -> batches by length -> completions, streamed
* ``batch_file``  IN.jsonl -> OUT.jsonl, resumable
* ``chat``        an interactive conversation with history and slash commands
* ``loading``     a model folder (+ LoRA adapter) -> model and tokenizer
* ``distributed`` tensor-parallel runs: relaunch under torchrun, rank helpers

Inference backends (``panda/backends/infer``) load the model and run ``decode``;
everything here is shared by all of them. Nothing heavy is imported at module
level so ``panda --help`` stays fast.
"""
