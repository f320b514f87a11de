"""Flax checkpoints (`flax_model.msgpack`) loaded into the PyTorch model, without jax.

transformers 5 dropped Flax, but checkpoints saved by transformers 4.x's Flax classes (the
seed's `FlaxSpeechEncoderDecoderModel` among them) are still what some users hold. The file is
msgpack: nested maps of parameter names whose leaves are numpy arrays in flax's extension type
(code 1: a msgpack triple of shape, dtype name and raw C-order bytes). The names map to
PyTorch's as transformers 4.x's `load_flax_weights_in_pytorch_model` mapped them: `kernel`
becomes `weight` transposed (a dense kernel is (in, out), a 1-D convolution's (width, in, out):
reversing the axes gives PyTorch's layout), `scale` and `embedding` become `weight`, and the
weight-norm pair `weight_g` / `weight_v` becomes the parametrization's `original0` /
`original1`. Weights tied in PyTorch (BERT's LM head to its word embeddings) are absent from
the file and tied again after loading.
"""

from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import torch

from service.engine.checkpoint import FLAX_WEIGHTS
from service.errors import StartupError

_NDARRAY = 1  # flax.serialization's msgpack extension codes
_NPSCALAR = 3


def _ext_hook(code: int, data: bytes) -> Any:
    if code in (_NDARRAY, _NPSCALAR):
        shape, dtype, buffer = msgpack.unpackb(data, raw=False)
        return np.frombuffer(buffer, dtype=np.dtype(dtype)).reshape(shape)
    raise ValueError(f"unsupported msgpack extension type {code} in a Flax checkpoint")


def read_params(path: Path) -> dict[tuple[str, ...], np.ndarray]:
    """The checkpoint's arrays by their path in the parameter tree (`params` wrapper removed)."""
    tree = msgpack.unpackb(path.read_bytes(), ext_hook=_ext_hook, raw=False, strict_map_key=False)
    if set(tree) == {"params"}:
        tree = tree["params"]
    flat: dict[tuple[str, ...], np.ndarray] = {}

    def walk(node: Any, prefix: tuple[str, ...]) -> None:
        if isinstance(node, dict):
            if "__msgpack_chunked_array__" in node:
                raise ValueError("chunked arrays (tensors over 1 GiB) are not supported")
            for key, value in node.items():
                walk(value, (*prefix, str(key)))
        else:
            flat[prefix] = np.asarray(node)

    walk(tree, ())
    return flat


def to_state_dict(
    flax: dict[tuple[str, ...], np.ndarray], expected: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """PyTorch names and layouts for the Flax arrays, checked against the model's own shapes."""
    weight_norm = {}  # "...conv.weight_g" → "...conv.parametrizations.weight.original0"
    for key in expected:
        parts = key.split(".")
        if parts[-3::2] == ["parametrizations", "original0"]:
            weight_norm[".".join([*parts[:-3], parts[-2] + "_g"])] = key
        elif parts[-3::2] == ["parametrizations", "original1"]:
            weight_norm[".".join([*parts[:-3], parts[-2] + "_v"])] = key
    state: dict[str, torch.Tensor] = {}
    for path, array in flax.items():
        name = ".".join(path)
        if path[-1] == "kernel" and name not in expected:
            path, array = (*path[:-1], "weight"), array.T
        elif path[-1] in ("scale", "embedding"):
            path = (*path[:-1], "weight")
        name = ".".join(path)
        name = weight_norm.get(name, name)
        if name not in expected:
            raise StartupError(f"the Flax checkpoint has {name}, which the model does not")
        if tuple(array.shape) != tuple(expected[name].shape):
            raise StartupError(
                f"the Flax checkpoint's {name} is {tuple(array.shape)}; the model's is "
                f"{tuple(expected[name].shape)}"
            )
        floating = array.dtype.kind == "f"  # bfloat16/float16 checkpoints load as float32
        state[name] = torch.from_numpy(np.array(array, dtype=np.float32 if floating else None))
    return state


def load_flax(model: Any, folder: Path) -> None:
    """Fill `model` (built from the folder's config) with the folder's Flax weights.

    Every model weight must come from the file, except those PyTorch ties to another one (the
    LM head to the embeddings), which are tied again after loading.
    """
    try:
        flax = read_params(folder / FLAX_WEIGHTS)
    except (ValueError, msgpack.UnpackException) as exc:
        raise StartupError(f"cannot read {folder / FLAX_WEIGHTS}: {exc}") from exc
    expected = model.state_dict()
    state = to_state_dict(flax, expected)
    missing = set(expected) - set(state)
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    tied = {name for name in missing if _tied(model, name, set(state))}
    if missing - tied:
        raise StartupError(
            f"the Flax checkpoint in {folder} lacks {', '.join(sorted(missing - tied)[:5])}"
        )


def _tied(model: Any, name: str, loaded: set[str]) -> bool:
    """Whether parameter `name` shares its storage with a parameter that was loaded."""
    weights = model.state_dict()
    pointer = weights[name].data_ptr()
    return any(weights[other].data_ptr() == pointer for other in loaded if other != name)
