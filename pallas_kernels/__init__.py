"""MoE kernels: grouped matmul and expert-choice dispatch/combine, with per-platform backends."""

from pallas_kernels.api import (BACKENDS, EC_FFN_RESIDUAL_NAMES, compile_for, ec_combine, ec_dispatch, ec_ffn,
                                expert_choice, gmm, resolve_backend, resolve_ec_ffn_backend, tgmm)

__all__ = ["BACKENDS", "EC_FFN_RESIDUAL_NAMES", "compile_for", "ec_combine", "ec_dispatch", "ec_ffn", "expert_choice",
           "gmm", "resolve_backend", "resolve_ec_ffn_backend", "tgmm"]
