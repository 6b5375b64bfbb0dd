"""Which hardware the kernels are built for: the local platform, or an ahead-of-time target.

On a CPU host compiling for a TPU topology (jax.experimental.topologies), the local platform
says "cpu" but the kernels must be chosen and tiled for the TPU: `compile_for("tpu", "v5p")`
says so for the code traced inside it.
"""

import contextlib
import dataclasses

import jax


@dataclasses.dataclass(frozen=True)
class Chip:
  """What the tile chooser needs to know about a TPU chip (public spec figures)."""
  name: str
  bf16_flops: float        # peak dense bf16 FLOP/s per chip
  hbm_bytes_per_s: float   # HBM bandwidth per chip
  vmem_bytes: int          # VMEM per TensorCore
  hbm_bytes: int           # HBM per chip
  cores: int               # TensorCores a "parallel" grid axis is split over (megacore)


CHIPS = {
    "v4": Chip("v4", 275e12, 1.2e12, 16 << 20, 32 << 30, 2),
    "v5e": Chip("v5e", 197e12, 0.82e12, 128 << 20, 16 << 30, 1),
    "v5p": Chip("v5p", 459e12, 2.46e12, 64 << 20, 95 << 30, 2),
    "v6e": Chip("v6e", 918e12, 1.64e12, 128 << 20, 32 << 30, 1),
}
DEFAULT_CHIP = "v5p"
_STACK: list[tuple[str, str | None]] = []


@contextlib.contextmanager
def compile_for(platform: str, chip: str | None = None):
  """Resolves backends (and, on TPU, tile sizes) for `platform`/`chip` instead of the
  local device: for ahead-of-time compilation on a CPU host."""
  if chip is not None and chip not in CHIPS:
    raise ValueError(f"chip={chip!r}; known TPU chips: {', '.join(CHIPS)}")
  _STACK.append((platform, chip))
  try:
    yield
  finally:
    _STACK.pop()


def platform() -> str:
  return _STACK[-1][0] if _STACK else jax.default_backend()


def chip() -> Chip:
  """The TPU chip to tile for: the compile_for target, else the local TPU, else v5p."""
  if _STACK and _STACK[-1][1]:
    return CHIPS[_STACK[-1][1]]
  if not _STACK and jax.default_backend() == "tpu":
    kind = jax.devices()[0].device_kind.lower()
    for name, key in (("v5e", "v5 lite"), ("v5e", "v5e"), ("v6e", "v6"), ("v5p", "v5"), ("v4", "v4")):
      if key in kind:
        return CHIPS[name]
  return CHIPS[DEFAULT_CHIP]
