"""The XLA compiler options the train step is compiled with, per target platform.

On TPU, libtpu's default turns every FSDP weight gather into an all-reduce of a zero-filled
full-size buffer (each chip writes its shard into zeros, the all-reduce sums them): twice the
bytes of an all-gather, and a whole-size buffer live. The options below are the collective
set TPU trainers pass through LIBTPU_INIT_ARGS on v5p/v6e (MaxText's, for instance): async
all-gathers fused into collective fusions that overlap the TensorCore's compute, with
`prefer_async_allgather_to_allreduce` keeping the gathers as all-gathers. sdlm-aot measures
their effect (README, "Splash attention and remat policies"). Other platforms get none.
"""

TPU_COLLECTIVES = {
    "xla_tpu_prefer_async_allgather_to_allreduce": "true",
    "xla_enable_async_all_gather": "true",
    "xla_tpu_enable_async_collective_fusion": "true",
    "xla_tpu_enable_async_collective_fusion_fuse_all_gather": "true",
    "xla_tpu_enable_async_collective_fusion_multiple_steps": "true",
    "xla_tpu_overlap_compute_collective_tc": "true",
    "xla_tpu_enable_data_parallel_all_reduce_opt": "true",
    "xla_tpu_data_parallel_opt_different_sized_ops": "true",
}


def train_step_options(platform: str) -> dict[str, str]:
  """Compiler options for the train step on `platform` (pallas_kernels.target.platform())."""
  return dict(TPU_COLLECTIVES) if platform == "tpu" else {}
