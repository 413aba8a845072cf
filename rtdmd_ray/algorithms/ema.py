"""Exponential moving average of trainable parameters with fp32 shadows (spec §4.4).

The reference keeps bf16 shadows, where a 1 % pull is often below rounding resolution and the EMA stalls;
here the shadows are always float32, whatever the live parameters' dtype.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch


def rl_ema_decay(step: int, decay: float = 0.9) -> float:
    """RL warm-up decay ``min((1 + s) / (10 + s), decay)``: 0.1 at s = 0, reaching 0.9 from s = 80."""
    return min((1.0 + step) / (10.0 + step), decay)


def should_update(step: int, interval: int) -> bool:
    """The RL EMA acts only when ``(step + 1) % interval == 0`` (interval 8 shipped)."""
    if interval < 1:
        raise ValueError(
            f"EMA update interval must be >= 1 (config key train.ema.interval_steps), got {interval}"
        )
    return (step + 1) % interval == 0


NamedParams = Iterable[tuple[str, torch.Tensor]] | Iterable[torch.Tensor]


def _named(params: NamedParams) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` pairs; a plain list of tensors is named by position (``"0"``, ``"1"``, ...)."""
    items = list(params)
    if items and isinstance(items[0], torch.Tensor):
        return [(str(i), p) for i, p in enumerate(items)]
    return [(str(n), p) for n, p in items]


class EMA:
    """fp32 shadow copies of a fixed list of named parameters (e.g. the LoRA A/B matrices).

    Parameters are given as ``(name, tensor)`` pairs (``module.named_parameters()``), matched by name on every
    call, or as a plain list of tensors, matched by position.

    ``update`` does ``shadow += (1 - decay) * (param - shadow)``. ``swap_in`` copies the shadows into the live
    parameters (keeping the live values on the side) and ``swap_out`` restores them; ``applied_to`` does both
    around a ``with`` block (eval, export).
    """

    def __init__(self, named_params: NamedParams, device: torch.device | str | None = None):
        self.names: list[str] = []
        self.shadow: dict[str, torch.Tensor] = {}
        for name, p in _named(named_params):
            self.names.append(name)
            self.shadow[name] = p.detach().to(device=device or p.device, dtype=torch.float32, copy=True)
        if not self.names:
            raise ValueError("EMA got no parameters: pass the trainable (requires_grad) named parameters")
        self._backup: dict[str, torch.Tensor] | None = None
        self.num_updates = 0

    def _matched(self, named_params: NamedParams) -> Iterator[tuple[str, torch.nn.Parameter]]:
        given = dict(_named(named_params))
        missing = [n for n in self.names if n not in given]
        if missing:
            raise KeyError(f"EMA parameters missing from the module: {missing[:5]} (of {len(missing)})")
        for name in self.names:
            yield name, given[name]

    @torch.no_grad()
    def update(self, named_params: NamedParams, decay: float) -> None:
        """Pull every shadow toward its live parameter: ``shadow += (1 - decay) * (param - shadow)``."""
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        for name, p in self._matched(named_params):
            sh = self.shadow[name]
            sh.add_(p.detach().to(device=sh.device, dtype=torch.float32) - sh, alpha=1.0 - decay)
        self.num_updates += 1

    @torch.no_grad()
    def swap_in(self, named_params: NamedParams) -> None:
        """Copy the shadows into the live parameters, keeping the live values for ``swap_out``."""
        if self._backup is not None:
            raise RuntimeError("EMA weights are already swapped in; call swap_out first")
        backup = {}
        for name, p in self._matched(named_params):
            backup[name] = p.detach().clone()
            p.copy_(self.shadow[name].to(device=p.device, dtype=p.dtype))
        self._backup = backup

    @torch.no_grad()
    def swap_out(self, named_params: NamedParams) -> None:
        """Restore the live parameters saved by ``swap_in``."""
        if self._backup is None:
            raise RuntimeError("EMA weights are not swapped in")
        for name, p in self._matched(named_params):
            p.copy_(self._backup[name])
        self._backup = None

    @contextlib.contextmanager
    def applied_to(self, module: torch.nn.Module) -> Iterator[None]:
        """Run a block with the EMA weights in ``module`` (matched by parameter name), then restore."""
        self.swap_in(module.named_parameters())
        try:
            yield
        finally:
            self.swap_out(module.named_parameters())

    def state_dict(self) -> dict:
        """``{"names", "shadow" (name -> fp32 CPU tensor), "num_updates"}``: the full (unsharded) shadows."""
        return {
            "names": list(self.names),
            "shadow": {n: t.detach().cpu().clone() for n, t in self.shadow.items()},
            "num_updates": self.num_updates,
        }

    def load_state_dict(self, state: dict) -> None:
        """Load shadows saved by ``state_dict``; names and shapes must match exactly (no silent partial
        load)."""
        names = list(state["names"])
        if names != self.names:
            extra = sorted(set(names) - set(self.names))
            missing = sorted(set(self.names) - set(names))
            raise KeyError(f"EMA state names differ: missing {missing[:5]}, unexpected {extra[:5]}")
        for n in names:
            src = state["shadow"][n]
            if src.shape != self.shadow[n].shape:
                raise ValueError(
                    f"EMA shadow {n}: saved shape {tuple(src.shape)} != {tuple(self.shadow[n].shape)}"
                )
            self.shadow[n].copy_(src.to(device=self.shadow[n].device, dtype=torch.float32))
        self.num_updates = int(state.get("num_updates", 0))
