"""The training loop: config -> mesh -> model/optimizer -> data -> jitted steps -> metrics,
checkpoints and a final evaluation.

Resuming is automatic: if WORKDIR/checkpoints holds a checkpoint, params, optimizer state,
step and data-iterator position are restored and training continues as if never stopped
(the step RNG is a function of (seed, step), so a resumed run replays the same losses).
On SIGTERM (preemption) a checkpoint is saved at the next step boundary and the run stops with
preemption.Preempted (sdlm-train exits with status 75).
A NaN/Inf loss, gradient norm or updated-param norm stops the run before any checkpoint of the
bad state is written.
"""

import time

import jax
import numpy as np
from clu import parameter_overview
from flax import nnx
from jax.experimental import multihost_utils

from sdlm_jax import config as config_lib
from sdlm_jax import progress as progress_lib
from sdlm_jax import storage
from sdlm_jax import workdir as workdir_lib
from sdlm_jax.data import pipeline
from sdlm_jax.parallel.mesh import make_mesh, num_slices_of
from sdlm_jax.scaling.flops import flops_per_token
from sdlm_jax.train import evaluate, init_from
from sdlm_jax.train import preemption
from sdlm_jax.train import program as program_lib
from sdlm_jax.train import resume_rules
from sdlm_jax.train import run_lock
from sdlm_jax.train.checkpoint import Checkpointer, agreed_latest_step, gather_process_states, own_process_state
from sdlm_jax.train.metrics import MetricsWriter, first_nonfinite, peak_flops_per_device, summarize


class NonFiniteLossError(RuntimeError):
  """The loss, gradient norm or updated params became NaN/Inf; the run stops without checkpointing
  the bad state."""


class _Pending:
  """Per-step metrics still on device, fetched together at log/checkpoint time."""

  def __init__(self, tokens_per_step: int, flops_per_step: float):
    self.items: list[tuple[int, dict]] = []
    self.tokens_per_step = tokens_per_step
    self.flops_per_step = flops_per_step  # analytic model FLOPs of one step, all devices
    self.since = time.perf_counter()

  def add(self, step, metrics):
    self.items.append((step, metrics))

  def _fetch(self):
    """Host copies of the pending metrics; raises NonFiniteLossError at the first bad step."""
    host = jax.device_get([m for _, m in self.items])
    bad = first_nonfinite(host)
    if bad is not None:
      raise NonFiniteLossError(
          f"loss {host[bad]['total_loss']} / grad norm {host[bad]['grad_norm']} / updated param norm "
          f"{host[bad].get('param_norm')} at step "
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
    step_time = (time.perf_counter() - self.since) / len(self.items)
    out = summarize(host)
    out["step_time_s"] = step_time
    out["tokens_per_sec"] = self.tokens_per_step / max(step_time, 1e-9)
    achieved = self.flops_per_step / jax.device_count() / max(step_time, 1e-9)
    out["model_tflops_per_sec_per_device"] = achieved / 1e12
    peak = peak_flops_per_device()
    if peak:
      out["mfu"] = achieved / peak
    self.items, self.since = [], time.perf_counter()
    return out


def train(cfg, workdir: str, *, progress: bool = True, allow_changed=()) -> dict:
  """Trains (or resumes) the run in `workdir`; returns the final evaluation metrics.

  A run directory that already holds config.json is resumed under sdlm_jax.train.resume_rules:
  its stored config and tokenizer are authoritative, `allow_changed` names the optimizer-like
  fields this resume may change. Process 0 holds WORKDIR/lock.json while it runs
  (sdlm_jax.train.run_lock): a second job on the same directory stops at once.
  """
  config_lib.validate(cfg, jax.device_count(), jax.process_count(), num_slices_of(jax.devices()))
  lock = _acquire_lock(workdir)
  try:
    return _train(cfg, workdir, progress=progress, allow_changed=allow_changed)
  finally:
    if lock is not None:
      lock.release()


def _acquire_lock(workdir: str):
  """Process 0's lock of the run directory (None on the other processes); every process raises
  RunLockedError if process 0 could not take it."""
  lock, refused = None, None
  if jax.process_index() == 0:
    lock = run_lock.RunLock(workdir)
    try:
      lock.acquire()
    except run_lock.RunLockedError as err:
      refused = err
  if jax.process_count() > 1:
    if multihost_utils.broadcast_one_to_all(np.int32(refused is not None)) and refused is None:
      refused = run_lock.RunLockedError(f"process 0 found {workdir} in use by another sdlm-train")
  if refused is not None:
    raise refused
  return lock


def _train(cfg, workdir: str, *, progress: bool, allow_changed) -> dict:
  cfg = cfg.copy_and_resolve_references()
  cfg.data.data_dir = storage.location(cfg.data.data_dir)  # config.json must work from any directory
  cfg.data.paths = pipeline.absolute_paths(cfg.data)
  if cfg.train.init_from:
    cfg.train.init_from = storage.location(cfg.train.init_from)
  is_main = jax.process_index() == 0
  # Checks before anything is written: the stored config's rules, an empty validation split,
  # the size of one epoch, the tokenizer a resume would use.
  resuming = workdir_lib.has_config(workdir)
  history = resume_rules.check_workdir(workdir, cfg, allow_changed) if resuming else None
  tokenizer, _ = pipeline.prepare(cfg.data, cfg.model.vocab_size)
  evaluate.validation_batches(cfg, tokenizer, cfg.train.batch_size, 1)
  epoch_tokens = pipeline.train_tokens(cfg.data, tokenizer, cfg.seed)
  if not resuming and cfg.train.init_from:
    init_from.check(cfg, tokenizer)
  if resuming:
    resume_rules.check_tokenizer(workdir, tokenizer)
  elif is_main:
    workdir_lib.save_run_files(workdir, cfg, tokenizer)

  local_batch = cfg.train.batch_size // jax.process_count()
  train_iter = pipeline.make_iterator(
      cfg.data, tokenizer, split="train", batch_size=local_batch, seed=cfg.seed,
      process_index=jax.process_index(), process_count=jax.process_count(),
      num_epochs=None if cfg.data.num_epochs == -1 else cfg.data.num_epochs)

  ckpt = Checkpointer(workdir, keep=cfg.train.keep_checkpoints)
  start_step = agreed_latest_step(ckpt)
  # On resume the state is only described, then restored straight onto its shardings.
  program = program_lib.build(cfg, make_mesh(cfg.mesh), abstract=bool(start_step))
  if start_step:
    start_step, program.params, program.opt_state, data_state, meta = ckpt.restore_latest(
        program.params, program.opt_state)
    pipeline.restore_iterator(train_iter, own_process_state(data_state))
    print(f"Resumed from step {start_step} (data position restored, seed {meta['seed']}).", flush=True)
  elif cfg.train.init_from:
    program.params = init_from.load(cfg, program.params)
  if history and is_main:
    workdir_lib.append_history(workdir, {**history, "step": start_step})
  if is_main:
    _write_param_overview(workdir, program.params)
  writer = MetricsWriter(workdir, enabled=is_main, resume_step=start_step)

  tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
  pending = _Pending(tokens_per_step, flops_per_token(cfg.model, cfg.data.seq_len) * tokens_per_step)
  bar = progress_lib.bar(total=cfg.train.num_steps, initial=start_step, desc="train", unit="step",
                         enabled=progress and is_main, terminal_only=False)
  last = {}
  epochs = _Epochs(tokens_per_step, epoch_tokens, cfg.eval.every_epochs)
  agree_on_end = cfg.data.num_epochs != -1 and jax.process_count() > 1
  done = saved = start_step

  def save(step):
    writer.sync()  # a gs:// work dir has every metric up to `step` before checkpoint `step` exists
    data_states = gather_process_states(pipeline.iterator_state(train_iter))
    ckpt.save(step, program.params, program.opt_state, {"per_process": data_states}, {"step": step, "seed": cfg.seed})

  watch = preemption.PreemptionWatch()
  try:
    with program.context():
      for step in range(start_step, cfg.train.num_steps):
        local_batch = _next_or_none(train_iter, agree_on_end)
        if local_batch is None:
          break
        batch = program.global_batch(local_batch)
        program.params, program.opt_state, metrics = program.step(program.params, program.opt_state, batch, step)
        pending.add(step, metrics)
        ckpt.poll()
        done = step + 1
        is_last = done == cfg.train.num_steps
        if done % cfg.train.log_every == 0 or is_last:
          last = pending.flush() or last
          writer.write(done, {**last, "epoch": epochs.at(done)})
          bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{last['tokens_per_sec']:.0f}")
        if done % cfg.train.checkpoint_every == 0 or is_last:
          pending.check()  # never checkpoint a state whose losses were not checked
          save(done)
          saved = done
        if watch.reached(step):
          if pending.items:
            last = pending.flush()
            writer.write(done, {**last, "epoch": epochs.at(done)})
          if saved != done:
            save(done)
          raise preemption.Preempted(done, workdir)
        periodic = cfg.train.eval_every and done % cfg.train.eval_every == 0
        if (periodic or epochs.boundary(done)) and not is_last:
          writer.write(done, {**evaluate.evaluate(cfg, program.model(), tokenizer), "epoch": epochs.at(done)})
        bar.update(1)
      if done < cfg.train.num_steps:  # the data ended first (a finite data.num_epochs)
        if pending.items:
          last = pending.flush()
          writer.write(done, {**last, "epoch": epochs.at(done)})
        if saved != done:
          save(done)
        print(f"The training data ended after step {done} of train.num_steps={cfg.train.num_steps} "
              f"(data.num_epochs={cfg.data.num_epochs}, epoch {epochs.at(done):.3f}); the final checkpoint is "
              f"step {done}.", flush=True)
      result = evaluate.evaluate(cfg, program.model(), tokenizer)
      if start_step < done:  # a finished run re-evaluates without re-logging
        writer.write(done, result)
      if is_main:
        workdir_lib.write_json(workdir, "eval.json", {"step": done, **result})
  finally:
    watch.close()
    bar.close()
    ckpt.wait()
    ckpt.close()
    writer.close()
  return result


class _Epochs:
  """Epochs of the training data passed after a step: tokens seen / tokens of one pass (all processes)."""

  def __init__(self, tokens_per_step: int, epoch_tokens: int, every: int):
    self.tokens_per_step, self.epoch_tokens, self.every = tokens_per_step, max(1, epoch_tokens), every

  def at(self, step: int) -> float:
    return step * self.tokens_per_step / self.epoch_tokens

  def boundary(self, step: int) -> bool:
    """Whether step crossed a multiple of eval.every_epochs epochs (0: never)."""
    if not self.every:
      return False
    size = self.every * self.epoch_tokens
    return step * self.tokens_per_step // size > (step - 1) * self.tokens_per_step // size


def _next_or_none(it, agree: bool):
  """The next local batch, or None at the end of the data; `agree`: all processes stop together."""
  try:
    batch = next(it)
  except StopIteration:
    batch = None
  if agree:
    have = multihost_utils.process_allgather(np.int32(batch is not None))
    if not np.all(have):
      return None
  return batch


def _write_param_overview(workdir: str, params):
  """WORKDIR/params.txt: every param's name, shape, dtype and size (clu's table); the total is printed."""
  pure = nnx.to_pure_dict(params)
  table = parameter_overview.get_parameter_overview(pure, include_stats=False)
  storage.write_text(storage.path(workdir) / "params.txt", table + "\n")
  print(f"{parameter_overview.count_parameters(pure):,} parameters (per-param table in {workdir}/params.txt)",
        flush=True)
