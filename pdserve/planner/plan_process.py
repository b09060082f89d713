"""One planning round in a child process: the router's online planner runs :func:`~pdserve.planner.plan.plan`
(seconds of pure Python) here, so it never holds the GIL of the router's process.

Contract: :func:`plan_in_subprocess` starts ``python -m pdserve.planner.plan_process`` (a fresh
interpreter: nothing of the caller's ``__main__`` runs again, unlike a multiprocessing spawn), writes the
round's inputs to its stdin as JSON, and returns the ``plan(...)`` result it prints; the child lowers its
priority first. A failed child raises ``RuntimeError`` with its last error lines; a cancelled call kills
the child. Inputs: the profile (``Profile.to_dict``: step-time coefficients, live calibration, KV
figures), the workload's requests, the GPU and worker counts and the SLOs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from typing import Any

from pdserve.planner.plan import Profile, Workload, plan
from pdserve.planner.simulate import SimRequest


def encode_round(profile: Profile, workload: Workload, num_gpus: int, *, ttft_slo_s: float,
                 tpot_slo_s: float, num_workers: int | None = None, borrow_tokens: int = 0) -> bytes:
    """The round's inputs as JSON (what the child reads)."""
    return json.dumps({
        "profile": profile.to_dict(), "workload": workload.name,
        "requests": [[r.arrival_s, r.prompt_tokens, r.output_tokens] for r in workload.requests],
        "num_gpus": num_gpus, "num_workers": num_workers, "ttft_slo_s": ttft_slo_s,
        "tpot_slo_s": tpot_slo_s, "borrow_tokens": borrow_tokens}).encode()


def run_round(data: dict[str, Any]) -> dict[str, Any]:
    """``plan(...)`` on inputs decoded from :func:`encode_round`."""
    profile = Profile.from_dict(data["profile"], "the planner's round")
    workload = Workload(tuple(SimRequest(float(a), int(p), int(o)) for a, p, o in data["requests"]),
                        str(data["workload"]))
    workers = data.get("num_workers")
    return plan(profile, workload, int(data["num_gpus"]), ttft_slo_s=float(data["ttft_slo_s"]),
                tpot_slo_s=float(data["tpot_slo_s"]), num_workers=int(workers) if workers else None,
                borrow_tokens=int(data.get("borrow_tokens", 0)))


async def plan_in_subprocess(profile: Profile, workload: Workload, num_gpus: int, *, ttft_slo_s: float,
                             tpot_slo_s: float, num_workers: int | None = None,
                             borrow_tokens: int = 0) -> dict[str, Any]:
    """``plan(...)`` computed by a child interpreter (see module)."""
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pdserve.planner.plan_process", stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await child.communicate(encode_round(profile, workload, num_gpus, ttft_slo_s=ttft_slo_s,
                                                        tpot_slo_s=tpot_slo_s, num_workers=num_workers,
                                                        borrow_tokens=borrow_tokens))
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            child.kill()
        raise
    if child.returncode != 0:
        lines = err.decode(errors="replace").strip().splitlines()
        raise RuntimeError(f"the planning process exited with {child.returncode}: {' | '.join(lines[-3:])}")
    return dict(json.loads(out))


def main() -> None:
    with contextlib.suppress(OSError):
        os.nice(10)  # yield the CPU to the router and the workers
    json.dump(run_round(json.load(sys.stdin)), sys.stdout)


if __name__ == "__main__":
    main()
