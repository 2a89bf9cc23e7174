"""The tie plumbing every tied model family shares: its config fields and the one ``Tied`` they build.

:class:`TiedModel` is the base of the families whose layer stack goes through
:class:`wtjax.core.tied.Tied` (MLP, ResNet-like, ResNet-20); :class:`SpinModel` adds SPIN's sharing
fields (CCT, ConvMixer, shared ViT). A family subclasses one of them, redeclares the fields whose
default differs (dataclass boilerplate only) and builds its tie with :meth:`TiedModel.tie`, then
runs it with :func:`run_tie`. The fields keep their config names (``config.model.form``, ...): the
job derives config fields from the dataclass fields, inherited ones included.

One rule for every family: masks (``mask_mode``) apply to the tied and shared forms; the
``not_tied`` form is always dense, the paper's explicit baseline.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import flax.linen as nn

from wtjax.core.masks import MaskSpec
from wtjax.core.spin import options as spin
from wtjax.core.tied import Tied


class TiedModel(nn.Module):
    """Base of a model with a tied layer stack: the tie's config fields.

    Attributes:
      form: ``tied`` (one block reused K times) or ``not_tied`` (K independent blocks, through
        ``Tied(..., shared=False)``); :class:`SpinModel` adds ``shared``.
      mask_mode: ``dense``, ``same``, ``multi``, ``dropout`` or ``stored`` (:mod:`wtjax.core.views`),
        for the tied (and shared) forms; the not-tied form is always dense.
      mask: mask kind, density, N:M and seed (:class:`wtjax.core.masks.MaskSpec`).
      scan: scan (default) or the unrolled reference loop.
      unroll: the scan's unroll factor (``True``: fully unrolled); ``None`` (default) takes
        :func:`wtjax.core.tied.default_unroll` for the depth run and the backend traced on (fully
        unrolled on CPU up to depth 8, where it is faster; a scan on GPU/TPU).
      remat_policy: a name in ``jax.checkpoint_policies`` or ``None``.
      checkpoint_every: the tie's depth-memory mode: ``None``, an int or ``'sqrt'``.
      dtype: compute dtype, ``'float32'`` or ``'bfloat16'`` (:mod:`wtjax.core.precision`);
        parameters and logits stay float32.
    """

    form: str = "tied"
    mask_mode: str = "multi"
    mask: MaskSpec = MaskSpec()
    scan: bool = True
    unroll: int | bool | None = None
    remat_policy: str | None = None
    checkpoint_every: int | str | None = None
    dtype: str = "float32"

    FORMS: ClassVar[tuple[str, ...]] = ("tied", "not_tied")

    def check_form(self) -> None:
        """Fail on a ``form`` this family does not have."""
        if self.form not in self.FORMS:
            raise ValueError(f"unknown form {self.form!r}; choose one of {self.FORMS}")

    def tie_sharing(self) -> dict:
        """The ``Tied`` fields that say what is shared (``shared``, or SPIN's ``weight_map``...)."""
        return dict(shared=self.form == "tied")

    def tie(self, block: nn.Module, *, depth: int, name: str) -> Tied:
        """The ``Tied`` of this model's fields over ``block`` (``depth`` reuses), named ``name``."""
        self.check_form()
        return Tied(
            block,
            depth=depth,
            mask_mode="dense" if self.form == "not_tied" else self.mask_mode,
            mask=self.mask,
            # The tie's name is its mask identity: the masks the family's models have always had
            # (the family is the top-level module) and no longer depend on where it is nested.
            mask_scope=name,
            scan=self.scan,
            unroll=self.unroll,
            remat_policy=self.remat_policy,
            checkpoint_every=self.checkpoint_every,
            dtype=self.dtype,
            name=name,
            **self.tie_sharing(),
        )


def run_tie(tie: Tied, z, *args, train: bool, return_intermediates: bool, depth: int | None = None):
    """Run ``tie`` from ``z``: ``(z_K, zs)``, ``zs`` the per-reuse states or ``None`` if not asked for."""
    if return_intermediates:
        return tie.trajectory(z, *args, depth=depth, deterministic=not train)
    return tie(z, *args, depth=depth, deterministic=not train), None


class SpinModel(TiedModel):
    """:class:`TiedModel` with SPIN sharing (:mod:`wtjax.core.spin.options`), for isotropic stacks.

    Subclasses set ``TIE_NAME`` (the name of their ``Tied``) and ``SHARE_PREDICATES`` (the
    ``share_params`` names and their predicates, ``None``: share every leaf).

    Attributes:
      form: ``not_tied``, ``tied`` or ``shared`` (a SPIN topology of ``depth / share_rate`` sets).
      share_rate, share_mapping, share_distribution, share_seed: the topology
        (:func:`wtjax.core.spin.sharing.layer_to_weight`).
      share_params: which block parameters follow the topology (a key of ``SHARE_PREDICATES``).
      affine_groups: SPIN per-layer affine transform group size (0: off).
      fusion: ``none`` or a SPIN fusion strategy (:data:`wtjax.core.spin.sharing.FUSIONS`).
    """

    share_rate: int = 2
    share_mapping: str = "sequential"
    share_distribution: str = "uniform"
    share_seed: int = 0
    share_params: str = "all"
    affine_groups: int = 0
    fusion: str = "none"

    FORMS: ClassVar[tuple[str, ...]] = spin.FORMS
    TIE_NAME: ClassVar[str] = "encoder"
    SHARE_PREDICATES: ClassVar[dict[str, Callable | None]] = {"all": None}

    @property
    def share_predicate(self) -> Callable | None:
        """The predicate of ``share_params`` (``None``: every block parameter is shared)."""
        if self.share_params not in self.SHARE_PREDICATES:
            choices = tuple(self.SHARE_PREDICATES)
            raise ValueError(f"unknown share_params {self.share_params!r}; choose one of {choices}")
        return self.SHARE_PREDICATES[self.share_params]

    def tie_sharing(self) -> dict:
        return spin.tie_kwargs(self, self.share_predicate)

    def from_not_tied(self, fused_init: dict, not_tied: dict) -> dict:
        """SPIN fusion init from a trained not-tied model (:func:`wtjax.core.spin.options.from_not_tied`)."""
        return spin.from_not_tied(fused_init, not_tied, self.TIE_NAME)

    def export_fused(self, params: dict):
        """``(model, params)`` with the fusion folded away (:func:`wtjax.core.spin.options.export_fused`)."""
        return spin.export_fused(self, params, self.TIE_NAME, self.share_predicate)
