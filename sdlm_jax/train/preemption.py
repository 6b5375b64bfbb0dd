"""Saving when the job is preempted: SIGTERM, and JAX's multihost preemption sync point.

A preempted machine (a spot / queued-resource TPU VM, a Kubernetes or Slurm job) gets SIGTERM
some seconds before it is killed. A single-process run catches it and, at the next step
boundary, saves a checkpoint and stops with exit status PREEMPTED_EXIT_STATUS (75, EX_TEMPFAIL:
"try again"); running the same command again resumes. A multi-process run cannot let each
process stop on its own (the others would wait in a collective forever): there JAX's preemption
service (started by jax.distributed.initialize) catches the signal on any worker and
`reached_preemption_sync_point` names the same step on every process.
"""

import signal
import threading

import jax
from jax.experimental import multihost_utils

PREEMPTED_EXIT_STATUS = 75


class Preempted(Exception):
  """The job was preempted; checkpoint `step` holds everything trained."""

  def __init__(self, step: int, workdir: str):
    super().__init__(f"preempted (SIGTERM): checkpoint {step} saved in {workdir}; run the same command again "
                     "to resume")
    self.step = step


class PreemptionWatch:
  """`reached(step)` after each step says whether to save and stop now."""

  def __init__(self):
    self._multihost = jax.process_count() > 1
    self._signalled = threading.Event()
    self._previous = None
    if not self._multihost and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, lambda signum, frame: self._signalled.set())

  def reached(self, step: int) -> bool:
    if not self._multihost:
      return self._signalled.is_set()
    try:
      return bool(multihost_utils.reached_preemption_sync_point(step))
    except RuntimeError:  # the preemption service is off (jax_enable_preemption_service=False)
      return False

  def close(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
