"""Shared benchmark plumbing: machine description, and training one model in a fresh process to
measure seconds per training epoch, peak resident memory and test metrics."""
import multiprocessing
import platform
import resource
import time

import torch


def machine_description():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as file:
            cpu = next(line.split(":", 1)[1].strip() for line in file if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    device = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return f"{cpu}, {torch.get_num_threads()} torch threads{device}, torch {torch.__version__}"


def _train_and_measure(model, dataset, config_dict, queue):
    from recbole_mm.quick_start import build

    try:
        config, (train, valid, test), model_obj, trainer = build(model, dataset, config_dict=config_dict)
        epoch_seconds = []
        train_epoch = trainer._train_epoch

        def timed_train_epoch(*args, **kwargs):
            start = time.perf_counter()
            result = train_epoch(*args, **kwargs)
            epoch_seconds.append(time.perf_counter() - start)
            return result

        trainer._train_epoch = timed_train_epoch
        trainer.fit(train, valid, saved=True, show_progress=False, verbose=False)
        test_result = trainer.evaluate(test, load_best_model=True)
        queue.put({
            "model": config["model"],
            "parameters": sum(p.numel() for p in model_obj.parameters() if p.requires_grad),
            "epochs": len(epoch_seconds),
            "seconds_per_epoch": sum(epoch_seconds) / len(epoch_seconds),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "test": dict(test_result),
        })
    except Exception as error:  # reported by the parent, which carries on with the other models
        queue.put({"model": model, "error": f"{type(error).__name__}: {error}"})


def train_in_fresh_process(model, dataset, config_dict):
    """Train ``model`` in a spawned process (its own peak RSS) and return its measurements."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_train_and_measure, args=(model, dataset, config_dict, queue))
    process.start()
    result = queue.get()
    process.join()
    return result
