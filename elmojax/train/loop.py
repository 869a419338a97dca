"""The training loop: the jitted train step (elmojax.train.trainer) between periodic actions.

  train(config, workdir)
    start: the workdir's newest readable checkpoint (state, and the data position saved with
           it), or a fresh state (maybe from config.init_from)
    every step: the next batch (read ahead in a thread), the train step, and a check that the
           previous step's loss and gradient norm are finite
    every train.log_every steps (and after the first few): a log line and metrics; tokens/s and
           the time left count steady steps only (StepTimer: none that waited on a compile)
    every train.eval_every steps: heldout perplexity with the full softmax, and a warning if
           the model looks broken
    every train.checkpoint_every steps, at the end, and on SIGTERM or SIGINT: a checkpoint

A non-finite loss or gradient norm stops the run with `Diverged`, before anything of it is
saved; SIGTERM or SIGINT end it with `Interrupted` once the current step is saved.
`run_training` returns the Run, what it built included, for elmojax.after_training.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import itertools
import json
import logging
import math
import os
import shutil
import signal
import threading
import time
from typing import Any, Callable, Iterator, Optional

import jax
import ml_collections
import numpy as np

from elmojax import data
from elmojax.train import config as config_lib
from elmojax.formats import files
from elmojax.formats.dicts import flatten
from elmojax.train import checkpoint, runconfig
from elmojax.train.evaluation import Evaluator, diagnose, heldout_evaluator, summary
from elmojax.train.metrics import MetricsWriter, heldout_scalars
from elmojax.train.trained_models import VOCAB_FILE, architecture_difference, init_from, load_vocab, vocab_tokens
from elmojax.formats.locks import locked
from elmojax.formats.vocab import Vocabulary
from elmojax.train.step import TrainState
from elmojax.train.trainer import Trainer

log = logging.getLogger(__name__)

SHAPE_SAMPLES = 8  # batches the char layout is chosen from (a few, so that a batch rarely falls outside it)
FIRST_LOG_STEPS = 5  # the first log line comes this many steps into a run, before log_every


class Diverged(ValueError):
    """The loss or gradient norm is not finite: the run stopped; its checkpoints are from before."""


class Interrupted(Exception):
    """SIGTERM or SIGINT stopped the run, after saving a checkpoint of its last step."""


@dataclasses.dataclass
class Every:
    """An action taken every `every` steps (none if every is 0 or None), and at the last step
    if `at_end`."""
    every: Optional[int]
    action: Callable[[int, TrainState], None]
    at_end: bool = True

    def __call__(self, step: int, state: TrainState, last: bool) -> None:
        if self.every and (step % self.every == 0 or (last and self.at_end)):
            self.action(step, state)


class StopSignals:
    """Turns SIGTERM and SIGINT into a request to stop after the current step (a second SIGINT
    stops at once). With several processes, SIGTERM is JAX's preemption service's, which makes
    all processes agree on the step to stop at; SIGINT is passed on to it."""

    def __init__(self):
        self.received: Optional[str] = None
        self._several = jax.process_count() > 1
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            ours = (signal.SIGINT,) if self._several else (signal.SIGINT, signal.SIGTERM)
            for sig in ours:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        log.warning("%s: finishing the current step, then saving a checkpoint and stopping", self.received)
        if self._several:
            os.kill(os.getpid(), signal.SIGTERM)

    def requested(self, step: int) -> bool:
        if self._several:
            from jax.experimental import multihost_utils

            try:
                return multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # JAX's preemption service is off (jax_enable_preemption_service)
                return False
        return self.received is not None

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclasses.dataclass
class Plan:
    """How long a run trains."""
    total_steps: int
    steps_per_epoch: int
    n_train_tokens: int
    tokens_per_step: int


def plan(config: ml_collections.ConfigDict, global_batch_size: int) -> Plan:
    tc = config.train
    n_train_tokens = tc.n_train_tokens or data.count_tokens(config.data.train_prefix)
    tokens_per_step = global_batch_size * tc.unroll_steps
    steps_per_epoch = max(1, int(n_train_tokens / tokens_per_step))
    total_steps = tc.n_epochs * steps_per_epoch
    if tc.max_steps:
        total_steps = min(total_steps, tc.max_steps)
    return Plan(total_steps, steps_per_epoch, n_train_tokens, tokens_per_step)


@dataclasses.dataclass(frozen=True)
class Evaluated:
    """A heldout evaluation the loop made: its step, result and diagnosis."""
    step: int
    result: Any    # evaluation.HeldoutResult
    health: Any    # evaluation.Health


@dataclasses.dataclass(frozen=True)
class Run:
    """A finished run, for the work after training (elmojax.after_training): its config, workdir,
    vocabulary and final state, and the trainer and heldout Evaluator it built (None where it
    evaluated nothing), to be used again rather than built and compiled anew, and its last
    heldout evaluation (None where it made none)."""
    config: ml_collections.ConfigDict
    workdir: str
    vocab: Vocabulary
    state: TrainState
    trainer: Trainer
    evaluator: Optional[Evaluator] = None
    evaluated: Optional[Evaluated] = None


def train(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains, resuming from the workdir's newest checkpoint if there is one; the final state."""
    return run_training(config, workdir).state


def run_training(config: ml_collections.ConfigDict, workdir: str) -> Run:
    """train, returning the whole Run."""
    config_lib.validate(config)
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ValueError(f"{workdir}: the workdir is a file, not a directory")
    vocab = load_vocab(config)  # the run's one read of it: handed down from here
    _check_run(workdir, config, vocab)
    if jax.process_index() == 0:
        log.info("%s", config_block(config))
    trainer = Trainer(config, vocab.size)
    run_plan = plan(config, trainer.batch_size)
    # Each process reads its own share of the shards and feeds its rows of the global batch.
    process, n_processes = jax.process_index(), jax.process_count()
    dataset = data.make_dataset(config_lib.streams(config), vocab, config.data.train_prefix,
                                trainer.batch_size // n_processes, config.train.unroll_steps, test=False,
                                seed=config.train.seed, shard_subset=(process, n_processes))
    try:
        os.makedirs(workdir, exist_ok=True)
        lock = locked(workdir) if process == 0 else contextlib.nullcontext()
        with lock, StopSignals() as stop:
            checkpointer = checkpoint.Checkpointer(workdir, config.train.keep_checkpoints)
            try:
                state, meta = _start(config, workdir, trainer, vocab, dataset, checkpointer)
                training = Loop(config, workdir, trainer, dataset, checkpointer, run_plan, stop)
                state = training.run(state, meta.char_shapes if meta is not None else None)
                return Run(config, workdir, vocab, state, trainer, training.evaluator, training.evaluated)
            finally:
                checkpointer.close()
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        raise ValueError(f"{e.filename or workdir}: not writable ({e.strerror}); training writes checkpoints there "
                         f"(a finished run can still be evaluated or exported from it)") from None


def config_block(config: ml_collections.ConfigDict) -> str:
    """The config as the run uses it, one field a line (dotted names, JSON values)."""
    fields = flatten(json.loads(config.to_json()))
    return "config:\n" + "\n".join(f"  {field} = {json.dumps(value, ensure_ascii=False)}"
                                    for field, value in fields.items())


def _check_run(workdir: str, config: ml_collections.ConfigDict, vocab: Vocabulary) -> None:
    """The config against the run already in the workdir, if there is one (runconfig.reconcile),
    before anything is restored."""
    if not os.path.isdir(workdir):
        return
    has_checkpoints = bool(checkpoint.steps(workdir))
    vocab_copy = os.path.join(workdir, VOCAB_FILE)
    stored_vocab = None
    if has_checkpoints:
        if not os.path.isfile(vocab_copy):
            raise ValueError(f"{vocab_copy}: missing; it is the vocabulary the run in {workdir} was trained with "
                             f"(copy it back, e.g. from an export's vocab.txt)")
        stored_vocab = vocab_tokens(Vocabulary(vocab_copy))
    runconfig.reconcile(workdir, config, vocab_tokens(vocab), stored_vocab, has_checkpoints)


def _start(config, workdir: str, trainer: Trainer, vocab, dataset, checkpointer
           ) -> tuple[TrainState, Optional[checkpoint.Meta]]:
    """The newest readable checkpoint's state and meta, with the dataset moved to its position;
    or a fresh state (and no meta), with the vocabulary and options.json written into the
    workdir. The config goes into the workdir either way (what a resumed run changed included)."""
    vocab_copy = os.path.join(workdir, VOCAB_FILE)
    ours = config_lib.options_json(config, vocab.size)
    if jax.process_index() == 0:
        runconfig.save(workdir, config)
    if checkpoint.steps(workdir):
        def abstract_state(meta: checkpoint.Meta):
            if meta.global_batch_size != trainer.batch_size:
                raise checkpoint.CheckpointError(
                    f"{workdir}: the checkpoint was trained with a global batch of {meta.global_batch_size}, "
                    f"this run has {trainer.batch_size}")
            difference = architecture_difference(meta.options, ours)
            if difference:
                raise checkpoint.CheckpointError(f"{workdir}: the checkpoint's model differs from the config's: "
                                                 f"{difference}")
            return trainer.abstract_state()

        step, state, meta, position = checkpoint.restore(workdir, abstract_state, on_damaged=checkpointer.set_aside)
        if position is None:
            raise ValueError(f"{workdir}: checkpoint step {step} holds no data position for process "
                             f"{jax.process_index()}")
        dataset.load_state_dict(position)
        log.info("resuming from %s at step %d", workdir, step)
        return state, meta
    warning = data.count_order_warning(vocab, dataset.shards[0]) if jax.process_index() == 0 else None
    if warning:
        log.warning(warning)
    rng = jax.random.PRNGKey(config.train.seed)
    params = accumulators = None
    if config.init_from:
        params, accumulators = init_from(trainer, trainer.init_params(jax.random.fold_in(rng, 1)), config.init_from,
                                         config.init_softmax_from, vocab_tokens(vocab))
    if jax.process_index() == 0:
        with files.atomic_output(vocab_copy) as tmp:
            shutil.copyfile(vocab.filename, tmp)
        files.write_json(os.path.join(workdir, "options.json"), ours)
    return trainer.create_state(rng, params, accumulators=accumulators), None


_COMPILE_EVENTS = "/jax/core/compile/"  # JAX's monitoring events of tracing, lowering and compiling
_compiles = [0, False]  # [compiles seen, listening]


def _on_event(event: str, *args, **kwargs) -> None:
    if event.startswith(_COMPILE_EVENTS):
        _compiles[0] += 1


def compile_count() -> int:
    """How many times JAX has traced, lowered or compiled something in this process since the
    first call (any thread; a step that waited on one is not a steady step)."""
    if not _compiles[1]:
        jax.monitoring.register_event_duration_secs_listener(_on_event)
        _compiles[1] = True
    return _compiles[0]


class StepTimer:
    """The time of a run's steady steps, for tokens/s and the time left. A step's time runs from
    when the host saw the step before it end to when it saw the step end; a step is left out where
    something compiled in that span (the first steps after a start or a resume, a new shape), and
    so is the first step seen (nothing to time it from). `pause_ended` after an evaluation or a
    checkpoint: the next step's time runs from then. `clock` and `compiles` are the sources of
    seconds and of the compile count."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, compiles: Callable[[], int] = compile_count):
        self.clock, self.compiles = clock, compiles
        self.mark: Optional[tuple[float, int]] = None  # (when, compile count) the last step was seen ending
        self.steps, self.seconds = 0, 0.0          # steady steps since the last `interval`
        self.run_steps, self.run_seconds = 0, 0.0  # steady steps of the whole run

    def step_ended(self) -> None:
        now, compiles = self.clock(), self.compiles()
        if self.mark is not None and self.mark[1] == compiles:
            seconds = now - self.mark[0]
            self.steps, self.seconds = self.steps + 1, self.seconds + seconds
            self.run_steps, self.run_seconds = self.run_steps + 1, self.run_seconds + seconds
        self.mark = (now, compiles)

    def pause_ended(self) -> None:
        if self.mark is not None:
            self.mark = (self.clock(), self.compiles())

    def interval(self, tokens_per_step: int) -> Optional[float]:
        """Tokens/s over the steady steps since the last call (None: none), which starts the next."""
        rate = self.steps * tokens_per_step / self.seconds if self.steps and self.seconds > 0 else None
        self.steps, self.seconds = 0, 0.0
        return rate

    def seconds_left(self, steps: int) -> Optional[float]:
        """The time `steps` more steps take at the run's steady pace (None: not known yet)."""
        return steps * self.run_seconds / self.run_steps if self.run_steps else None


class Loop:
    """One run of train steps with its periodic actions (see the module docstring)."""

    def __init__(self, config, workdir: str, trainer: Trainer, dataset, checkpointer, run_plan: Plan,
                 stop: StopSignals):
        self.config, self.workdir, self.trainer, self.dataset = config, workdir, trainer, dataset
        self.checkpointer, self.plan, self.stop = checkpointer, run_plan, stop
        self.writer = MetricsWriter(workdir) if jax.process_index() == 0 else None
        self.meta = checkpoint.Meta(config.to_json(), config_lib.options_json(config, dataset.vocab.size),
                                    trainer.batch_size)
        self.data_position: Optional[dict] = None   # the dataset's position after the last batch trained on
        self.unchecked: list[tuple[int, Any]] = []  # (step, device metrics) not yet checked for finiteness
        self.interval: list[tuple[float, float]] = []  # (loss, grad norm) of the steps since the last log
        self.timer = StepTimer()
        self.saved_step: Optional[int] = None
        self.evaluator: Optional[Evaluator] = None
        self.evaluated: Optional[Evaluated] = None
        tc = config.train
        self.actions = [Every(tc.log_every, self.log), Every(tc.get("eval_every"), self.evaluate, at_end=False),
                        Every(tc.checkpoint_every, self.save)]

    def run(self, state: TrainState, char_shapes: Optional[list] = None) -> TrainState:
        """Trains from `state` to the plan's last step; `char_shapes`, the layout a resumed run's
        steps were compiled for (its checkpoint's meta), else chosen from the first batches."""
        step, total = int(state.step), self.plan.total_steps
        first = step
        if step >= total:
            log.info("nothing left to train: the checkpoint in %s is at step %d of %d", self.workdir, step, total)
        else:
            log.info("training %s for %d steps (%d per epoch of %d tokens; global batch %d on %d device(s))",
                     "chars" if self.trainer.settings.use_character_inputs else "words", total,
                     self.plan.steps_per_epoch, self.plan.n_train_tokens, self.trainer.batch_size,
                     self.trainer.n_devices)
        prefetcher = data.BatchPrefetcher(self.dataset)
        try:
            batches = self.prepared(prefetcher, state, char_shapes)  # (a generator: nothing runs before next)
            while step < total:
                arrays, self.data_position = next(batches)
                state, metrics = self.trainer.train_step(state, self.trainer.put_arrays(arrays))
                step += 1
                self.unchecked.append((step, metrics))
                self.check(keep_last=step > first + 1)  # the step before this one (the first: seen ending)
                last = step == total
                if step - first == FIRST_LOG_STEPS and not last:
                    self.log(step, state)
                for action in self.actions:
                    action(step, state, last)
                if self.stop.requested(step) and not last:
                    if self.saved_step != step:
                        self.save(step, state)
                    raise Interrupted(f"stopped by {self.stop.received or 'a preemption notice'} at step {step} of "
                                      f"{total}: its checkpoint is in {checkpoint.checkpoint_dir(self.workdir)}; "
                                      f"run the same command again to resume")
        finally:
            prefetcher.close()
            if self.writer is not None:
                self.writer.close()
        return state

    def prepared(self, prefetcher, state: TrainState, char_shapes: Optional[list]) -> Iterator[tuple[dict, dict]]:
        """The prefetcher's batches laid out for the steps (in its thread: Trainer.host_arrays),
        in `char_shapes` or a layout chosen from the first SHAPE_SAMPLES batches; the train step
        compiled first for every layout they may take, so that none compiles later."""
        shapes = self.trainer.stored_shapes(char_shapes)
        if char_shapes is not None and shapes is None:
            log.warning("the checkpoint's char layout %s does not fit this run's batches; choosing another",
                        json.dumps(char_shapes)[:80])
        first = list(itertools.islice(prefetcher, SHAPE_SAMPLES if shapes is None else 1))
        if shapes is None:
            shapes = self.trainer.char_shapes([b for b, _ in first])
        if shapes is not None:
            self.meta = dataclasses.replace(self.meta, char_shapes=list(shapes))
        prefetcher.prepare = functools.partial(self.trainer.host_arrays, shapes=shapes)
        start = time.perf_counter()
        self.trainer.compile_train_step(state, first[0][0], shapes)
        log.info("train step compiled in %.1f s%s", time.perf_counter() - start,
                 "" if shapes is None else f" (char layout: {shapes.n_short} distinct tokens of {shapes.width} "
                 f"characters" + (f", {shapes.n_long} of all" if shapes.n_long else "") + ")")
        yield from ((prefetcher.prepare(batch), position) for batch, position in first)
        yield from prefetcher

    def check(self, keep_last: bool = False) -> None:
        """Checks the steps' losses and gradient norms (all but the newest if `keep_last`, so that
        the host does not wait for the step just dispatched); raises Diverged on one not finite."""
        ready = self.unchecked[:-1] if keep_last else self.unchecked
        self.unchecked = self.unchecked[len(ready):]
        for step, metrics in ready:
            loss, grad_norm = (float(v) for v in jax.device_get((metrics["loss"], metrics["grad_norm"])))
            self.timer.step_ended()
            self.interval.append((loss, grad_norm))
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                newest = checkpoint.steps(self.workdir)
                kept = (f"the newest checkpoint, step {newest[-1]} in {checkpoint.checkpoint_dir(self.workdir)}, is "
                        f"from before it" if newest else "no checkpoint was saved")
                raise Diverged(f"step {step}: training diverged (loss {loss}, gradient norm {grad_norm}) and "
                               f"stopped; {kept}. Resume with a smaller --config.train.learning_rate or "
                               f"--config.train.all_clip_norm_val")

    def log(self, step: int, state: TrainState) -> None:
        self.check()
        if not self.interval:
            return
        loss, grad_norm = np.mean(self.interval, axis=0)
        tokens_per_second = self.timer.interval(self.plan.tokens_per_step)
        left = self.timer.seconds_left(self.plan.total_steps - step)
        if self.writer is not None:
            speed = f"  {tokens_per_second:.0f} tokens/s" if tokens_per_second is not None else ""
            log.info("step %d/%d%s  train perplexity (sampled softmax) %.2f  grad norm %.3g%s", step,
                     self.plan.total_steps, speed, np.exp(loss), grad_norm,
                     f"  {_duration(left)} left" if left is not None else "")
            values = {"train/loss": loss, "train/sampled_perplexity": float(np.exp(loss)), "train/grad_norm": grad_norm}
            if tokens_per_second is not None:
                values["train/tokens_per_second"] = tokens_per_second
            self.writer.scalars(step, values)
        self.interval = []

    def evaluate(self, step: int, state: TrainState) -> None:
        if jax.process_index() != 0 or not self.config.data.heldout_prefix:
            return  # process 0 evaluates on its own devices
        self.check()
        if self.evaluator is None:  # the run's trainer's eval step, compiled once for all evaluations
            self.evaluator = heldout_evaluator(self.config, self.dataset.vocab, self.trainer)
        params = local_params(state)
        result = self.evaluator(params)
        health = diagnose(result)
        if health.needs_carry and jax.process_count() == 1:  # (with several, the carry's rows are spread out)
            health = diagnose(result, self.evaluator.carry_check(params, jax.device_get(state.lstm_state)),
                              self.config.train.state_reset_probability)
        self.timer.pause_ended()  # evaluation time is not training time
        self.evaluated = Evaluated(step, result, health)
        log.info("step %d  %s", step, summary(result))
        self.writer.scalars(step, heldout_scalars(result, health))
        if health.line:
            (log.warning if health.verdict == "broken" else log.info)("step %d  %s", step, health.line)

    def save(self, step: int, state: TrainState) -> None:
        """Checkpoints the state after checking every step up to it: a run that diverged is never
        saved, so the newest checkpoint is always a good one."""
        self.check()
        self.checkpointer.save(step, state, self.meta, self.data_position)
        self.timer.pause_ended()  # checkpoint time is not training time
        self.saved_step = step


def local_params(state: TrainState):
    """The params as host arrays (replicated: this process's copy)."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), state.params)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
