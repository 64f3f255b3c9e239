"""Per-layer weights of a pipelined LLaMA-family model, and conversions to and from HF folders.

A *pipeline folder* (``panda convert hf-to-pipeline``) holds::

    layer_00-model_states.safetensors ...   one file per pipeline layer (see pipeline_layers)
    pipeline.json                           {"format": "panda-pipeline", "num_layers": ...}
    config.json, generation_config.json, tokenizer files

so a stage reads only the files of its own layers. A Hugging Face folder of
safetensors serves too: its tensors are read by name, so a stage reads only
its own bytes. DeepSpeed's pipeline checkpoints (``layer_XX-model_states.pt``,
written by ``engine.save_checkpoint``) have the same layers and keys; panda
reads them with ``weights_only`` loads. ``pipeline-to-hf`` accepts either.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Iterator

from panda.errors import UsageError
from panda.models.pipeline_layers import Layout, hf_key, layer_of_hf_key

MANIFEST = "pipeline.json"
FORMAT = "panda-pipeline"
META_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "tokenizer.model", "chat_template.jinja",
              "added_tokens.json", "vocab.json", "merges.txt")


def layer_file(folder: Path, layer: int, suffix: str = "safetensors") -> Path:
    return folder / f"layer_{layer:02d}-model_states.{suffix}"


# -- reading --------------------------------------------------------------------------------

class HfFolderWeights:
    """Tensors of one pipeline layer out of a Hugging Face safetensors folder, read by name."""

    def __init__(self, folder: Path, layout: Layout):
        self.folder, self.layout = folder, layout
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (folder / "model.safetensors").is_file():
            from safetensors import safe_open

            with safe_open(folder / "model.safetensors", "pt") as handle:
                weight_map = {name: "model.safetensors" for name in handle.keys()}
        else:
            raise UsageError(f"{folder} holds no safetensors weights",
                             hint="pipelines read safetensors only; re-save the model with "
                             "save_pretrained(safe_serialization=True)")
        self.files: dict[int, dict[str, list[str]]] = {}
        for name, file in weight_map.items():
            layer, _ = layer_of_hf_key(layout, name)
            self.files.setdefault(layer, {}).setdefault(file, []).append(name)

    def layer_state(self, layer: int) -> dict[str, Any]:
        from safetensors import safe_open

        state = {}
        for file, names in self.files.get(layer, {}).items():
            with safe_open(self.folder / file, "pt") as handle:
                for name in names:
                    state[layer_of_hf_key(self.layout, name)[1]] = handle.get_tensor(name)
        return state


class LayerFileWeights:
    """Tensors of one pipeline layer from ``layer_XX-model_states`` files (safetensors or .pt)."""

    def __init__(self, folder: Path):
        self.folder = folder

    def layer_state(self, layer: int) -> dict[str, Any]:
        path = layer_file(self.folder, layer)
        if path.is_file():
            from safetensors.torch import load_file

            return load_file(path)
        legacy = sorted(self.folder.glob(f"layer_{layer:02d}-*model_states.pt"))
        if not legacy:
            raise UsageError(f"{self.folder} has no weights for pipeline layer {layer}")
        import torch

        return dict(torch.load(legacy[0], map_location="cpu", weights_only=True))


def open_weights(path: str | Path, layout: Layout) -> Any:
    """The weight reader for a pipeline folder, a DeepSpeed pipeline save, or an HF folder."""
    folder = Path(path)
    if layer_file(folder, 0).is_file() or any(folder.glob("layer_00-*model_states.pt")):
        return LayerFileWeights(folder)
    return HfFolderWeights(folder, layout)


def find_layer_folder(source: Path) -> tuple[Path, Path]:
    """(folder of layer files, folder with config + tokenizer) of a pipeline folder or of a
    checkpoint that the ``ds-pipeline`` backend saved (``step-N``)."""
    from panda.backends.zero_export import find_engine_checkpoint

    if layer_file(source, 0).is_file():
        return source, source
    save_dir, tag, meta = find_engine_checkpoint(source)
    folder = save_dir / tag
    if not any(folder.glob("layer_*-model_states.pt")):
        raise UsageError(f"{source} is not a pipeline folder or pipeline checkpoint (no "
                         "layer_XX-model_states files)")
    if meta is None:
        raise UsageError(f"{source} has no hf-meta folder with the model config")
    return folder, meta


# -- conversions ----------------------------------------------------------------------------

def copy_meta_files(source: Path, destination: Path) -> None:
    for name in META_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, destination / name)


def hf_to_pipeline(source: str, destination: str) -> Path:
    """Split an HF folder into one safetensors file per pipeline layer (tensors bit for bit)."""
    from safetensors.torch import save_file
    from transformers import AutoConfig

    from panda.models.pipeline_layers import supported

    src, dst = Path(source), Path(destination)
    config = AutoConfig.from_pretrained(src)
    if not supported(config.model_type):
        raise UsageError(f"{source} is a '{config.model_type}' model; pipelines support "
                         "llama, mistral and qwen2")
    layout = Layout.of(config)
    weights = HfFolderWeights(src, layout)
    dst.mkdir(parents=True, exist_ok=True)
    for layer in layout.saved_layers():
        state = {k: v.contiguous() for k, v in weights.layer_state(layer).items()}
        if not state:
            raise UsageError(f"{source} has no weights for pipeline layer {layer}")
        save_file(state, layer_file(dst, layer), metadata={"format": "pt"})
    copy_meta_files(src, dst)
    (dst / MANIFEST).write_text(json.dumps({"format": FORMAT, "num_layers": layout.num_layers,
                                            "tied": layout.tied,
                                            "model_type": config.model_type}, indent=2) + "\n")
    return dst


def pipeline_state_dict(folder: Path, layout: Layout) -> dict[str, Any]:
    """The Hugging Face state dict of every layer file under ``folder``."""
    weights = LayerFileWeights(folder)
    return {hf_key(layout, layer, key): tensor for layer in layout.saved_layers()
            for key, tensor in weights.layer_state(layer).items()}


def pipeline_to_hf(source: str, destination: str, dtype: str | None = None) -> Path:
    """Join the layer files of a pipeline folder or ds-pipeline checkpoint into an HF folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from panda.backends.zero_export import save_hf_folder

    layers, meta = find_layer_folder(Path(source))
    config = AutoConfig.from_pretrained(meta)
    state = pipeline_state_dict(layers, Layout.of(config))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    tokenizer = None
    if (meta / "tokenizer_config.json").is_file() or (meta / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(meta)
    save_hf_folder(model, state, tokenizer, destination, getattr(torch, dtype) if dtype else None)
    if (meta / "generation_config.json").is_file() and \
            not (Path(destination) / "generation_config.json").is_file():
        shutil.copy2(meta / "generation_config.json", Path(destination) / "generation_config.json")
    return Path(destination)


def iter_layer_states(module: Any, stage: int) -> Iterator[tuple[int, dict[str, Any]]]:
    """(layer, state) of each layer this stage owns, weights detached on the host."""
    from panda.models.pipeline_layers import local_layers

    for index, layer in local_layers(module, stage, with_tied_copy=False):
        yield index, {k: v.detach().cpu().contiguous() for k, v in layer.state_dict().items()}
