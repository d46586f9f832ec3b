"""Measured training runs: one model on one dataset through ``recbole_mm.quick_start``, recording
test/valid metrics, trainable parameters, seconds per training epoch, epochs to the best validation
score and peak memory; optionally in a fresh process, so that peak memory is the run's own.

Used by the table runner (``recbole_mm.experiments.table``) and the scripts in ``benchmarks/``.
"""
import ctypes
import multiprocessing
import os
import platform
import queue as queue_module
import resource
import signal
import sys
import threading
import time
import traceback

import torch

from recbole_mm.experiments.per_user import PerUserRecorder
from recbole_mm.quick_start import run


def machine_description():
    """CPU model, cores, torch threads, GPU (if any), torch version and the current load average
    (benchmarks on shared machines are only comparable side by side)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as file:
            cpu = next(line.split(":", 1)[1].strip() for line in file if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    device = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return (f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads{device}, "
            f"torch {torch.__version__}{load}")


def measured_run(model, dataset, config_file_list=None, config_dict=None, cmd_args=(), saved=True,
                 per_user=False):
    """``quick_start.run`` plus measurements: seconds per training epoch, epochs run, the epoch cap,
    epochs to the best validation score, peak memory. Peak RSS is this process's maximum so far.
    ``per_user``: also the test users and their per-user metrics (``per_user.PerUserRecorder``)."""
    epoch_seconds, best_epoch, trainer_of_run, recorders, epoch_cap = [], [None], [], [], [None]
    epoch_stages, last_stage = [], {}

    def instrument(config, model_obj, trainer, train_dataset):
        trainer_of_run.append(trainer)
        epoch_cap[0] = config["epochs"]
        stages = model_obj.training_stages() if hasattr(model_obj, "training_stages") else None
        if stages:  # a staged model (Speeder's MPO) runs each stage's own epochs, not ``epochs``
            last_stage.update(name=stages[-1].name, epochs=stages[-1].epochs)
            epoch_cap[0] = sum(stage.epochs for stage in stages)
        if per_user:
            recorders.append(PerUserRecorder(config, trainer, train_dataset))
        train_epoch = trainer._train_epoch

        def timed_train_epoch(*args, **kwargs):
            start = time.perf_counter()
            result = train_epoch(*args, **kwargs)
            epoch_seconds.append(time.perf_counter() - start)
            epoch_stages.append(getattr(trainer, "stage_name", None))
            return result

        trainer._train_epoch = timed_train_epoch
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def note_best(epoch_idx, valid_score):
        # RecBole's early stopping resets cur_step to 0 exactly when this validation is the new best
        if trainer_of_run[0].cur_step == 0:
            best_epoch[0] = epoch_idx + 1

    result = run(model, dataset, config_file_list, config_dict, saved=saved, cmd_args=cmd_args,
                 on_built=instrument, callback_fn=note_best)
    result.update({
        "epochs": len(epoch_seconds),
        "epoch_cap": epoch_cap[0],
        "seconds_per_epoch": sum(epoch_seconds) / len(epoch_seconds) if epoch_seconds else None,
        "epochs_to_best": best_epoch[0],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
    })
    if last_stage:
        # converged = the last stage stopped early; an earlier stage that stops early shortens the run
        # without saying anything about how the final model was trained
        result["stopped_early"] = epoch_stages.count(last_stage["name"]) < last_stage["epochs"]
    if recorders:
        result["per_user"] = {"users": recorders[0].users,
                              "metrics": {key: [round(v, 6) for v in value.tolist()]
                                          for key, value in recorders[0].values.items()}}
    return result


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_runner(runner_pid):
    """Linux: the kernel kills this cell's process when the runner dies, also by SIGKILL or by a
    SIGTERM to a script that installed no handler, which no code of the runner sees (elsewhere the
    runner's SIGTERM handler is the only guard against a cell training on as an orphan)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != runner_pid:  # the runner died before the request took effect
        os._exit(1)


def _measured_run_worker(kwargs, queue, runner_pid):
    _die_with_runner(runner_pid)
    try:
        queue.put({"status": "ok", **measured_run(**kwargs)})
    except BaseException as error:  # reported by the parent, which carries on with the other runs
        queue.put({"status": "failed", "error": f"{type(error).__name__}: {error}",
                   "traceback": traceback.format_exc()})


# Cell processes running now, for a runner whose cells run in worker threads: a signal reaches only the
# main thread, so the unwinding that kills a cell's process in the main thread never happens in theirs.
_live_processes = set()
_live_lock = threading.RLock()  # re-entered by a signal handler that interrupts the main thread inside it
_interrupted = threading.Event()


def interrupt_fresh_process_runs():
    """Kill every running ``measured_run_in_fresh_process`` child and refuse to start new ones; their
    callers get ``{"status": "interrupted"}`` (a runner's SIGTERM handler calls this)."""
    _interrupted.set()
    with _live_lock:
        for process in list(_live_processes):
            if process.pid is not None:
                process.kill()


def measured_run_in_fresh_process(model, dataset, config_file_list=None, config_dict=None, cmd_args=(),
                                  saved=True, timeout=None, per_user=False):
    """``measured_run`` in a spawned process (its own peak RSS; a crash cannot take the caller down).

    Never raises for a failed run: returns ``{"status": "failed", "error": ...}`` instead, also when
    the process dies without reporting (killed, out of memory) or exceeds ``timeout`` seconds;
    ``{"status": "interrupted"}`` after ``interrupt_fresh_process_runs``.
    """
    if _interrupted.is_set():
        return {"status": "interrupted", "error": "the runner is stopping"}
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    kwargs = dict(model=model, dataset=dataset, config_file_list=config_file_list, config_dict=config_dict,
                  cmd_args=list(cmd_args), saved=saved, per_user=per_user)
    process = context.Process(target=_measured_run_worker, args=(kwargs, queue, os.getpid()))
    start = time.monotonic()
    result = None
    try:  # a signal during start() must still reach the finally, or the started child is orphaned
        with _live_lock:
            _live_processes.add(process)
            process.start()
        while result is None:
            try:
                result = queue.get(timeout=1.0)
            except queue_module.Empty:
                if not process.is_alive():
                    # the result may have been put just before the process exited
                    try:
                        result = queue.get(timeout=1.0)
                    except queue_module.Empty:
                        result = {"status": "failed",
                                  "error": f"the run's process exited with code {process.exitcode} without a result"}
                elif timeout is not None and time.monotonic() - start > timeout:
                    process.kill()
                    result = {"status": "failed", "error": f"timed out after {timeout:.0f} s"}
    finally:
        if process.pid is not None:
            if process.is_alive():  # the caller was interrupted: no orphan goes on training
                process.kill()
            process.join()
        with _live_lock:
            _live_processes.discard(process)
    if _interrupted.is_set() and result.get("status") != "ok":
        return {"status": "interrupted", "error": "the runner is stopping"}
    return result
