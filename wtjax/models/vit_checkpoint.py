"""Read and write public ViT ``.npz`` checkpoints for :class:`wtjax.models.vit.ViT`.

The files of google-research/vision_transformer (``gs://vit_models/imagenet21k/ViT-B_16.npz``,
the AugReg ``gs://vit_models/augreg/*.npz``) store one array per parameter under its
``'/'``-joined path (layout in :mod:`wtjax.models.vit`). Newer big_vision exports use Linen
auto-names (``MultiHeadDotProductAttention_0``, ``LayerNorm_1``, ``MlpBlock_0``) and a top-level
``pos_embedding`` without the cls position; :func:`load_pretrained` converts those too.

What :func:`load_pretrained` does, in order (as vision_transformer's ``checkpoint.load_pretrained``):

1. read the ``.npz`` and unflatten its keys;
2. convert the big_vision naming if present;
3. drop ``pre_logits`` when the model has ``representation_size=None`` (the "drop-head" variant);
4. take ``head`` from a fresh initialisation when ``reset_head`` or its shape differs (new classes);
5. resize the position-embedding grid bilinearly if the image/patch grid differs;
6. check every remaining key and shape against the model, naming the key and both shapes.

Only numpy (and scipy for the resize) are used: no TensorFlow.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from wtjax.models.vit import ViT

POSEMB = ("Transformer", "posembed_input", "pos_embedding")

# big_vision (Linen auto-names) -> the public pre-Linen names used by ViT.
_LINEN_TO_PUBLIC = {
    "LayerNorm_0": "LayerNorm_0",
    "MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1",
    "LayerNorm_1": "LayerNorm_2",
    "MlpBlock_0": "MlpBlock_3",
}


def read_npz(path: str) -> dict[tuple[str, ...], np.ndarray]:
    """The flat ``{path tuple: array}`` contents of a checkpoint ``.npz`` (keys split on ``'/'``)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"pretrained ViT checkpoint {path!r} does not exist. Download one first, e.g. "
            "`gsutil cp gs://vit_models/imagenet21k/ViT-B_16.npz .` (ImageNet-21k ViT-B/16, the "
            "paper's Table 3 base model), and set config.pretrained to its local path."
        )
    with np.load(path, allow_pickle=False) as f:
        return {tuple(k.split("/")): np.asarray(f[k]) for k in f.files}


def save_npz(path: str, params) -> None:
    """Write ``params`` in the public layout: one array per ``'/'``-joined parameter path."""
    flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
    np.savez(path, **{k: np.asarray(v) for k, v in flat.items()})


def _convert_big_vision(flat: dict, classifier: str) -> dict:
    """Rename Linen auto-names and move a top-level ``pos_embedding`` to the public place."""
    out = {}
    for path, value in flat.items():
        if len(path) > 2 and path[0] == "Transformer" and path[1].startswith("encoderblock_"):
            path = path[:2] + (_LINEN_TO_PUBLIC.get(path[2], path[2]),) + path[3:]
        out[path] = value
    if ("pos_embedding",) in out:
        pe = out.pop(("pos_embedding",))
        # big_vision adds the embedding before prepending cls, i.e. cls gets no position
        # embedding: a zero entry in front reproduces that exactly.
        if classifier == "token":
            pe = np.concatenate([np.zeros_like(pe[:, :1]), pe], axis=1)
        out[POSEMB] = pe
    return out


def resize_posemb(posemb: np.ndarray, num_tokens: int, has_cls: bool) -> np.ndarray:
    """Resize a ``(1, [1 +] g*g, D)`` position embedding to ``num_tokens`` tokens.

    The cls entry is kept; the ``g x g`` grid is zoomed bilinearly (``scipy.ndimage.zoom``,
    order 1, as vision_transformer does for fine-tuning at a new resolution).
    """
    import scipy.ndimage  # lazy: only needed when resolutions differ

    tok, grid = (posemb[:, :1], posemb[0, 1:]) if has_cls else (posemb[:, :0], posemb[0])
    g_old, g_new = int(np.sqrt(len(grid))), int(np.sqrt(num_tokens - tok.shape[1]))
    if g_old**2 != len(grid) or g_new**2 != num_tokens - tok.shape[1]:
        raise ValueError(
            f"cannot resize position embeddings of shape {posemb.shape} to {num_tokens} tokens: "
            "both grids must be square"
        )
    grid = grid.reshape(g_old, g_old, -1)
    grid = scipy.ndimage.zoom(grid, (g_new / g_old, g_new / g_old, 1), order=1)
    return np.concatenate([tok, grid.reshape(1, g_new * g_new, -1)], axis=1).astype(posemb.dtype)


def load_pretrained(
    path: str,
    model_config: Mapping,
    *,
    image_size: int = 224,
    init_params=None,
    reset_head: bool = True,
    rng: jax.Array | None = None,
):
    """Load a public ViT ``.npz`` into the parameter tree of ``ViT(**model_config)``.

    Args:
      path: local ``.npz`` file (public vision_transformer / big_vision layout).
      model_config: the ViT fields (e.g. ``{'num_classes': 100, **vit_fields('B/16')}``).
      image_size: the fine-tuning resolution; sets the target position-embedding grid.
      init_params: the model's freshly initialised params (computed if ``None``); the head (and
        ``pre_logits`` if absent from the file) are taken from here.
      reset_head: replace the head by ``init_params['head']`` even if its shape matches (the
        fine-tuning default); ``False`` keeps a matching head (e.g. to reload a fine-tuned model).
      rng: PRNG key for the initialisation when ``init_params`` is ``None``.

    Returns:
      A params dict (numpy leaves) for ``model.apply({'params': ...}, images)``.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      KeyError: the file lacks a parameter the model needs, or holds one it does not know.
      ValueError: a shape differs (the message names the key and both shapes).
    """
    model = ViT(**dict(model_config))
    if init_params is None:
        rng = jax.random.PRNGKey(0) if rng is None else rng
        dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
        init_params = model.init(rng, dummy)["params"]
    expected = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(jax.device_get(init_params)).items()}

    restored = _convert_big_vision(read_npz(path), model.classifier)
    if model.representation_size is None:
        restored = {k: v for k, v in restored.items() if k[0] != "pre_logits"}
    for key in (("head", "kernel"), ("head", "bias")):
        if key in expected and (
            reset_head or key not in restored or restored[key].shape != expected[key].shape
        ):
            restored[key] = expected[key]
    if POSEMB in restored and POSEMB in expected and restored[POSEMB].shape != expected[POSEMB].shape:
        restored[POSEMB] = resize_posemb(
            restored[POSEMB], expected[POSEMB].shape[1], model.classifier == "token"
        )

    _check_matches(restored, expected, f"checkpoint {path!r}", f"ViT({dict(model_config)})")
    restored = {key: restored[key].astype(want.dtype) for key, want in expected.items()}
    return traverse_util.unflatten_dict(restored)


def _check_matches(restored: dict, expected: dict, source: str, target: str) -> None:
    """Raise (KeyError / ValueError, naming the keys and shapes) unless the flat trees match."""
    missing = sorted("/".join(k) for k in expected.keys() - restored.keys())
    extra = sorted("/".join(k) for k in restored.keys() - expected.keys())
    if missing or extra:
        raise KeyError(f"{source} does not match {target}: missing keys {missing}, unexpected keys {extra}")
    for key, want in sorted(expected.items()):
        got = restored[key]
        if got.shape != want.shape:
            raise ValueError(
                f"{source}: parameter '{'/'.join(key)}' has shape {got.shape} in the file "
                f"but the model expects {want.shape}"
            )
