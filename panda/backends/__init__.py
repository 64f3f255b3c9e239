"""Training backends (single, ddp, fsdp, deepspeed, ds_pipeline, fairscale) and
inference backends (hf, ds, tp)."""
