"""Diagnostic: NCCL KV transport between cuda:0 and cuda:1 with short timeouts (not a benchmark)."""

from __future__ import annotations

import sys
import time

import torch
import torch.multiprocessing as mp

from benchmarks.kv_transfer import BLOCK, LAYERS, _caches, _layout


def worker(rank: int, q_in, q_out) -> None:  # noqa: ANN001
    from pdserve.kvtransfer import open_receiver, open_sender

    torch.cuda.set_device(rank)
    caches = _caches(300, f"cuda:{rank}")
    layout = _layout()
    cases = [(4, 1, 1), (64, 1, 4), (64, 32, 3), (256, 32, 3)]  # (blocks, layers per transfer, reps)
    if rank == 1:
        rec, boot = open_receiver("127.0.0.1", 0, "probe", caches=caches, layout=layout, op_timeout_s=20)
        q_out.put(boot)
        tid = 0
        for blocks, layers, reps in cases:
            for _ in range(reps):
                tid += 1
                h = rec.expect(tid, f"r{tid}", list(range(1, blocks + 1)), LAYERS, deadline_s=15)
                q_out.put(tid)
                t0 = q_in.get()
                while not (st := rec.poll(h)).is_terminal:
                    time.sleep(2e-5)
                dt = time.time() - t0
                mb = blocks * BLOCK * 128 * 1024 * layers / LAYERS / 1e6
                print(f"recv blocks={blocks} layers={layers}: {st.name} {dt * 1e3:.2f} ms {mb / dt / 1e3:.1f} GB/s "
                      f"err={h.error}", flush=True)
        q_out.put("bye")
        rec.close()
    else:
        boot = q_in.get()
        snd = open_sender(boot, caches, layout, op_timeout_s=20)
        for blocks, layers, reps in cases:
            for _ in range(reps):
                tid = q_in.get()
                ids = list(range(1, blocks + 1))
                h = snd.begin(tid, f"r{tid}", ids)
                torch.cuda.synchronize()
                q_out.put(time.time())
                for layer in range(layers):
                    snd.send_layer(h, layer, caches[layer], ids[::-1], (0, blocks))
                if layers < LAYERS:  # make coverage complete with the other layers later
                    for layer in range(layers, LAYERS):
                        snd.send_layer(h, layer, caches[layer], ids[::-1], (0, blocks))
                snd.finish(h, [1])
                st = snd.wait(h, 15)
                print(f"send blocks={blocks}: {st.name} err={h.error}", flush=True)
        q_in.get()
        snd.close()


if __name__ == "__main__":
    ctx = mp.get_context("spawn")
    a, b = ctx.Queue(), ctx.Queue()
    ps = [ctx.Process(target=worker, args=(0, b, a)), ctx.Process(target=worker, args=(1, a, b))]
    for p in ps:
        p.start()
    for p in ps:
        p.join(120)
        if p.is_alive():
            print("process still alive: killing", flush=True)
            p.kill()
    sys.exit(0)
