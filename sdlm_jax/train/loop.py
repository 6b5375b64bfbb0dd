"""The training loop: config -> mesh -> model/optimizer -> data -> jitted steps -> metrics,
checkpoints and a final evaluation.

Resuming is automatic: if WORKDIR/checkpoints holds a checkpoint, params, optimizer state,
step and data-iterator position are restored and training continues as if never stopped
(the step RNG is a function of (seed, step), so a resumed run replays the same losses).
A NaN/Inf loss stops the run before any checkpoint of the bad state is written.
"""

import os
import time

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from sdlm_jax import config as config_lib
from sdlm_jax import workdir as workdir_lib
from sdlm_jax.data import pipeline
from sdlm_jax.parallel.mesh import make_mesh, num_slices_of
from sdlm_jax.parallel.rules import BATCH_MESH_AXES, get_rules
from sdlm_jax.train import evaluate
from sdlm_jax.train import state as state_lib
from sdlm_jax.train.checkpoint import Checkpointer, agreed_latest_step, gather_process_states, own_process_state
from sdlm_jax.train.metrics import MetricsWriter, first_nonfinite, summarize
from sdlm_jax.train.optimizer import learning_rate_schedule, make_optimizer
from sdlm_jax.train.step import make_train_step



class NonFiniteLossError(RuntimeError):
  """The loss became NaN/Inf; the run stops without checkpointing the bad state."""


def global_batch(local_batch: dict, mesh) -> dict:
  """Assembles each process's slice of the batch into one array sharded over the batch axes."""
  sharding = NamedSharding(mesh, P(BATCH_MESH_AXES))
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}


class _Pending:
  """Per-step metrics still on device, fetched together at log/checkpoint time."""

  def __init__(self):
    self.items: list[tuple[int, dict]] = []
    self.tokens = 0
    self.since = time.perf_counter()

  def add(self, step, metrics, tokens):
    self.items.append((step, metrics))
    self.tokens += tokens

  def _fetch(self):
    """Host copies of the pending metrics; raises NonFiniteLossError at the first bad step."""
    host = jax.device_get([m for _, m in self.items])
    bad = first_nonfinite(host)
    if bad is not None:
      raise NonFiniteLossError(
          f"loss {host[bad]['total_loss']} / grad norm {host[bad]['grad_norm']} at step "
          f"{self.items[bad][0] + 1}; stopping without saving. Lower train.optimizer.lr, raise "
          "warmup, or check the data; the run resumes from the last good checkpoint.")
    return host

  def check(self):
    """Verifies the pending steps are finite, keeping them for the next log line."""
    self._fetch()

  def flush(self):
    """Averages and clears the pending steps (None if there are none)."""
    if not self.items:
      return None
    host = self._fetch()
    elapsed = time.perf_counter() - self.since
    out = summarize(host)
    out["tokens_per_sec"] = self.tokens / max(elapsed, 1e-9)
    self.items, self.tokens, self.since = [], 0, time.perf_counter()
    return out


def train(cfg, workdir: str, *, progress: bool = True) -> dict:
  """Trains (or resumes) the run in `workdir`; returns the final evaluation metrics."""
  config_lib.validate(cfg, jax.device_count(), jax.process_count(), num_slices_of(jax.devices()))
  cfg = cfg.copy_and_resolve_references()
  cfg.data.data_dir = os.path.abspath(cfg.data.data_dir)  # config.json must work from any directory
  is_main = jax.process_index() == 0
  mesh = make_mesh(cfg.mesh)
  tokenizer, _ = pipeline.prepare(cfg.data, cfg.model.vocab_size)
  if is_main:
    workdir_lib.save_run_files(workdir, cfg, tokenizer)

  optimizer = make_optimizer(cfg.train.optimizer, cfg.train.num_steps)
  lr_schedule = learning_rate_schedule(cfg.train.optimizer, cfg.train.num_steps)
  local_batch = cfg.train.batch_size // jax.process_count()
  train_iter = pipeline.make_iterator(
      cfg.data, tokenizer, split="train", batch_size=local_batch, seed=cfg.seed,
      process_index=jax.process_index(), process_count=jax.process_count(),
      num_epochs=None if cfg.data.num_epochs == -1 else cfg.data.num_epochs)

  ckpt = Checkpointer(workdir, keep=cfg.train.keep_checkpoints)
  start_step = agreed_latest_step(ckpt)
  if start_step:  # restore straight onto the shardings: no freshly initialised copy first
    graphdef, params, rest = state_lib.abstract_model(cfg, mesh)
    opt_state = state_lib.abstract_opt_state(optimizer, params, mesh)
    params, opt_state, data_state, meta = ckpt.restore(start_step, params, opt_state)
    pipeline.restore_iterator(train_iter, own_process_state(data_state))
    print(f"Resumed from step {start_step} (data position restored, seed {meta['seed']}).", flush=True)
  else:
    graphdef, params, rest = nnx.split(state_lib.init_model(cfg, mesh), nnx.Param, ...)
    opt_state = state_lib.init_opt_state(optimizer, params, mesh)
  writer = MetricsWriter(workdir, enabled=is_main, resume_step=start_step)

  step_fn = make_train_step(graphdef, rest, optimizer, lr_schedule, cfg, tokenizer.mask_id,
                            state_shardings=state_lib.shardings_of((params, opt_state)))
  tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
  pending = _Pending()
  bar = tqdm(total=cfg.train.num_steps, initial=start_step, disable=not (progress and is_main),
             desc="train", unit="step", dynamic_ncols=True)
  last = {}
  try:
    # The step is traced here: activation constraints need the mesh and the logical rules.
    with jax.set_mesh(mesh), nnx.logical_axis_rules(get_rules(cfg.mesh.rules)):
      for step in range(start_step, cfg.train.num_steps):
        batch = global_batch(next(train_iter), mesh)
        params, opt_state, metrics = step_fn(params, opt_state, batch, step)
        pending.add(step, metrics, tokens_per_step)
        done = step + 1
        is_last = done == cfg.train.num_steps
        if done % cfg.train.log_every == 0 or is_last:
          last = pending.flush() or last
          writer.write(done, last)
          bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{last['tokens_per_sec']:.0f}")
        if done % cfg.train.checkpoint_every == 0 or is_last:
          pending.check()  # never checkpoint a state whose losses were not checked
          data_states = gather_process_states(pipeline.iterator_state(train_iter))
          ckpt.save(done, params, opt_state, {"per_process": data_states}, {"step": done, "seed": cfg.seed})
        if cfg.train.eval_every and done % cfg.train.eval_every == 0 and not is_last:
          writer.write(done, _evaluate(cfg, graphdef, params, rest, tokenizer))
        bar.update(1)
      result = _evaluate(cfg, graphdef, params, rest, tokenizer)
      if start_step < cfg.train.num_steps:  # a finished run re-evaluates without re-logging
        writer.write(cfg.train.num_steps, result)
      if is_main:
        workdir_lib.write_json(workdir, "eval.json", {"step": cfg.train.num_steps, **result})
  finally:
    bar.close()
    ckpt.wait()
    ckpt.close()
    writer.close()
  return result


def _evaluate(cfg, graphdef, params, rest, tokenizer) -> dict:
  return evaluate.evaluate(cfg, nnx.merge(graphdef, params, rest), tokenizer)
