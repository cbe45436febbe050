"""Run generation on a worker thread and cancel it from another, as an app's UI would.

Usage: python examples/embed_in_app.py MODEL_DIR [--stop-after N] [--requests K]

The worker checks a threading.Event before each token and closes the generator when it is set
(that frees the KV cache at once); tokens go through a bounded queue, so a slow consumer holds
back the worker instead of piling text up. MLX's buffer cache is capped, and peak memory stays
the same from one request to the next.
"""

# ruff: noqa: I001  (ss_mlx first: on Linux it loads OpenBLAS before mlx.core is imported)
import ss_mlx

import argparse
import queue
import threading

import mlx.core as mx

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("model", help="SS model directory (or Hub repo)")
parser.add_argument("--stop-after", type=int, default=12, help="cancel after this many tokens")
parser.add_argument("--requests", type=int, default=3)
args = parser.parse_args()

model, tokenizer = ss_mlx.load(args.model)
mx.set_cache_limit(64 * 2**20)  # keep at most 64 MB of freed buffers for reuse


def worker(prompt: str, out: queue.Queue, cancel: threading.Event) -> None:
    gen = ss_mlx.stream_generate(model, tokenizer, prompt, max_tokens=-1)
    try:
        for r in gen:
            if cancel.is_set():
                break
            out.put(r.text)  # blocks while the queue is full
    except Exception as e:  # report it to the app instead of dying silently
        out.put(e)
    finally:
        gen.close()  # stops decoding and releases the cache now, not at garbage collection
        out.put(None)


for i in range(args.requests):
    out: queue.Queue = queue.Queue(maxsize=8)
    cancel = threading.Event()
    thread = threading.Thread(target=worker, args=(f"Request {i}: tell a story.", out, cancel))
    thread.start()
    received = 0
    while (item := out.get()) is not None:  # drain until the worker says it is done
        if isinstance(item, Exception):
            raise item
        if cancel.is_set():
            continue  # text the worker produced before it saw the cancel: dropped
        received += 1
        if received == args.stop_after:
            cancel.set()  # e.g. the user pressed "Stop"
    thread.join()
    how = "cancelled" if cancel.is_set() else "finished"
    print(f"request {i}: {how} after {received} tokens, "
          f"peak memory {mx.get_peak_memory() / 2**20:.1f} MB")
    mx.clear_cache()
