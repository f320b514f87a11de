"""Where a checkpoint's files are: a folder, or a hub id found in the local Hugging Face cache.

Users hold checkpoints in several ways: a folder written by `save_pretrained` (one
`model.safetensors`, sharded safetensors with an index, or an older `pytorch_model.bin`), or a
model downloaded earlier by `huggingface_hub` and referred to by its id (`openai/whisper-tiny`).
The service never downloads: a hub id is looked up in the local cache only (as with
`HF_HUB_OFFLINE=1`), and what is absent is a start-up error that says what to do.
"""

from pathlib import Path

from service.errors import StartupError

# what `from_pretrained` reads, in the order it prefers them
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
FLAX_WEIGHTS = "flax_model.msgpack"  # transformers 4.x Flax: converted at load time


def resolve(model: str, cache_dir: Path | None = None) -> Path:
    """The folder holding `model`: the folder itself, or a hub id's cached snapshot.

    `cache_dir` overrides the Hugging Face cache (default: `HF_HUB_CACHE` / `HF_HOME`).
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.is_absolute() or model.startswith((".", "~")) or model.count("/") != 1:
        raise StartupError(
            f"model {model!r} is neither a folder nor a hub id (org/name): set STT_MODEL to a "
            "checkpoint folder or to the id of a model in the local Hugging Face cache"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        folder = snapshot_download(model, cache_dir=cache_dir, local_files_only=True)
    except (LocalEntryNotFoundError, HFValidationError, OSError) as exc:
        where = cache_dir or "the Hugging Face cache (HF_HUB_CACHE / HF_HOME)"
        raise StartupError(
            f"model {model!r} is not in {where}, and the service never downloads: fetch it "
            f"first where there is network (`hf download {model}`), or set STT_MODEL to a "
            "checkpoint folder"
        ) from exc
    return Path(folder)


def require_weights(folder: Path) -> None:
    """Fail at start-up, naming what is looked for, when a folder holds no model weights."""
    if not any((folder / name).is_file() for name in (*WEIGHT_FILES, FLAX_WEIGHTS)):
        raise StartupError(
            f"{folder} holds no model weights: expected one of "
            f"{', '.join((*WEIGHT_FILES, FLAX_WEIGHTS))} (as `save_pretrained` writes them)"
        )


def flax_only(folder: Path) -> bool:
    """Whether the folder's only weights are Flax's (PyTorch weights win when both exist)."""
    pytorch = any((folder / name).is_file() for name in WEIGHT_FILES)
    return not pytorch and (folder / FLAX_WEIGHTS).is_file()
