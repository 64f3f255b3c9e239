"""Inference backends (``panda infer/chat --backend NAME``), registered as entry points.

* ``hf``       transformers in one process: one GPU, ``device_map="auto"`` over several,
               or the CPU; static KV cache + compiled decode step on a single GPU
* ``torch-tp`` torch's native tensor parallelism (DTensor), one process per GPU
* ``ds``       DeepSpeed inference (automatic tensor parallelism), one process per GPU
* ``tp``       the tensor-parallel package: unmaintained, refused with a pointer to torch-tp

All but ``tp`` share :class:`panda.backends.infer.base.TransformersBackend`,
which decodes with ``panda.infer.decode``. docs/inference.md compares them.
"""
