"""The ``pdserve`` command line.

``pdserve generate --model tiny-random "Hello"`` runs an engine in this process and streams the
completion; ``--file prompts.txt`` runs a batch (one prompt per line, or JSONL with a "prompt" key)
with a progress bar. ``pdserve generate --target HOST:PORT "Hello"`` streams the completion from a
running cluster through the client SDK instead (torch is not loaded). Errors a user can fix are printed
as one line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pdserve.cluster.profile_cli import run_profile
from pdserve.cluster.serve_cli import add_serve_parser, run_serve
from pdserve.common.config import TINY_RANDOM_MODEL
from pdserve.common.errors import PdserveError
from pdserve.common.roles import WorkerRole
from pdserve.planner.cli import add_planner_parsers, run_plan

if TYPE_CHECKING:
    from pdserve.client import Client
    from pdserve.rpc.types import PlannerStatus


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pdserve")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description="Disaggregated prefill/decode LLM serving.")
    parser.add_argument("--log-level", default="WARNING", type=str.upper,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
                        help="logging level (default: WARNING)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate",
                         help="generate completions with a local engine, or a running cluster (--target)")
    gen.add_argument("prompts", nargs="*", help="prompt texts (or use --file)")
    gen.add_argument("--file", type=Path, help="a file of prompts: one per line, or JSONL with a 'prompt' key")
    gen.add_argument("--model", default=None,
                     help="local model directory or 'tiny-random' (the default); with --target, the name the "
                          "cluster must serve (default: whatever it serves)")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    gen.add_argument("--json", action="store_true", help="print one JSON object per completion")
    gen.add_argument("--target", metavar="HOST:PORT",
                     help="generate with a running cluster (its router's address) instead of a local engine")
    gen.add_argument("--timeout", type=float, default=300.0,
                     help="with --target: deadline of each request in seconds, 0 for none (default: 300)")
    _add_sampling_args(gen)
    _add_engine_args(gen)
    add_serve_parser(sub)
    add_planner_parsers(sub)
    status = sub.add_parser("status", help="show a running cluster's workers and load (its router's address)")
    status.add_argument("--target", metavar="HOST:PORT", required=True, help="the router's gRPC address")
    status.add_argument("--json", action="store_true", help="print the status as one JSON object")
    status.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the router (default: 10)")
    scale = sub.add_parser("scale", help="grow or shrink one pool of a running cluster (its router's address)")
    scale.add_argument("--target", metavar="HOST:PORT", required=True, help="the router's gRPC address")
    scale.add_argument("--role", required=True, choices=list(WorkerRole), help="the pool")
    scale.add_argument("--replicas", type=int, required=True, help="how many workers the pool should have")
    scale.add_argument("--grace-s", type=float, default=0.0,
                       help="how long removed workers may finish their requests (default 0: the router's "
                            "shutdown_grace_s); streams left then move to another worker")
    scale.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the change (default: 600)")
    switch = sub.add_parser("switch", help="turn one worker of a running cluster into a prefill or decode worker, "
                                           "without a restart (its router's address)")
    switch.add_argument("--target", metavar="HOST:PORT", required=True, help="the router's gRPC address")
    switch.add_argument("--worker", required=True, help="the worker's id (see `pdserve status`), e.g. prefill-1")
    switch.add_argument("--role", required=True, choices=list(WorkerRole),
                        help="its new role (colocated: it prefills every prompt it gets)")
    switch.add_argument("--grace-s", type=float, default=0.0,
                        help="how long it may finish its requests first (default 0: the router's shutdown_grace_s); "
                             "streams left then move to another worker")
    switch.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the switch (default: 600)")
    return parser


def _scale(args: argparse.Namespace) -> int:
    """``scale --target --role --replicas``: the router's launcher starts or drains workers."""
    changed = _on_router(args, lambda client: client.scale_pool(args.role, args.replicas, grace_s=args.grace_s))
    print(f"pdserve: {args.role} pool at {args.replicas}: " + (", ".join(changed) + " changed" if changed
                                                                else "no change"))
    return 0


def _switch(args: argparse.Namespace) -> int:
    """``switch --target --worker --role``: the router drains the worker and its launcher switches it."""
    new_id = _on_router(args, lambda client: client.switch_role(args.worker, args.role, grace_s=args.grace_s))
    print(f"pdserve: {args.worker} is now {args.role} worker {new_id}")
    return 0


def _on_router(args: argparse.Namespace, call: Any) -> Any:
    """``call(client)`` on the router at ``args.target`` (an operator's command)."""
    from pdserve.client import Client, UnavailableError

    try:
        with Client(args.target, timeout=args.timeout) as client:
            return call(client)
    except UnavailableError as exc:
        raise PdserveError(f"no router answered at {args.target} ({exc.details})") from None


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")


def _add_engine_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("engine")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--load-format", default="auto", choices=["auto", "dummy"])


def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompts)
    if args.file is not None:
        try:
            lines = args.file.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise PdserveError(f"--file {args.file}: {exc.strerror or exc}") from None
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            if args.file.suffix == ".jsonl":
                try:
                    prompts.append(str(json.loads(line)["prompt"]))
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise PdserveError(f"{args.file}:{number}: expected a JSON object with a 'prompt' key") from None
            else:
                prompts.append(line)
    if not prompts:
        raise PdserveError("no prompt given: pass prompt texts as arguments or --file FILE")
    return prompts


def _generate(args: argparse.Namespace) -> int:
    if args.target is not None:
        return _generate_remote(args)
    from pdserve.common.sampling_params import SamplingParams
    from pdserve.engine.llm import LLM

    prompts = _read_prompts(args)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, min_p=args.min_p, seed=args.seed, stop=tuple(args.stop),
                            ignore_eos=args.ignore_eos)
    llm = LLM(model=args.model or TINY_RANDOM_MODEL, dtype=args.dtype, device=args.device,
              max_model_len=args.max_model_len, load_format=args.load_format)
    if args.chat:
        ids = [llm.tokenizer.encode_chat([{"role": "user", "content": p}]) for p in prompts]
    else:
        ids = [llm.engine.encode_prompt(p, None) for p in prompts]
    if len(prompts) == 1 and not args.json:
        return _stream_one(llm, ids[0], params)
    outputs = llm.generate(prompt_token_ids=ids, sampling_params=params, use_tqdm=len(prompts) > 1)
    for prompt, out in zip(prompts, outputs):
        if args.json:
            print(json.dumps({"prompt": prompt, "text": out.text, "token_ids": out.token_ids,
                              "finish_reason": str(out.finish_reason)}, ensure_ascii=False))
        else:
            print(f"--- {prompt!r} ({out.finish_reason}, {len(out.token_ids)} tokens)\n{out.text}")
    return 0


def _stream_one(llm, prompt_ids: list[int], params) -> int:  # noqa: ANN001 (LLM, SamplingParams)
    """Print one completion as it is generated."""
    engine = llm.engine
    engine.add_request("cli-0", prompt_token_ids=prompt_ids, params=params)
    try:
        finished = None
        while finished is None:
            for delta in engine.step():
                sys.stdout.write(delta.new_text)
                sys.stdout.flush()
                if delta.finished:
                    finished = delta
    except BaseException:
        engine.abort_request("cli-0")
        raise
    sys.stdout.write("\n")
    print(f"[finish_reason={finished.finish_reason}]", file=sys.stderr)
    return 0


def _generate_remote(args: argparse.Namespace) -> int:
    """``generate --target``: the prompts go to a running cluster through the client SDK (no engine here)."""
    from pdserve.client import Client, UnavailableError

    if args.timeout < 0:
        raise PdserveError(f"--timeout must be >= 0 seconds (0: no deadline), got {args.timeout:g}")
    prompts = _read_prompts(args)
    sampling: dict[str, Any] = {  # sent as given: the cluster validates, and names a bad field
        "max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
        "min_p": args.min_p, "seed": args.seed, "stop": list(args.stop) or None, "ignore_eos": args.ignore_eos}
    try:
        with Client(args.target, timeout=args.timeout or None, model=args.model) as client:
            if len(prompts) == 1 and not args.json:
                return _stream_remote(client, _remote_prompt(prompts[0], args.chat), sampling)
            for prompt in prompts:
                out = client.generate(**_remote_prompt(prompt, args.chat), **sampling)
                if args.json:
                    print(json.dumps({"prompt": prompt, "text": out.text, "token_ids": out.token_ids,
                                      "finish_reason": str(out.finish_reason),
                                      "usage": {"prompt_tokens": out.usage.prompt_tokens,
                                                "completion_tokens": out.usage.completion_tokens,
                                                "cached_prompt_tokens": out.usage.cached_prompt_tokens}},
                                     ensure_ascii=False))
                else:
                    print(f"--- {prompt!r} ({out.finish_reason}, {len(out.token_ids)} tokens)\n{out.text}")
    except UnavailableError as exc:
        if exc.unreachable:
            raise PdserveError(f"no server answered at {args.target} ({exc.details})") from None
        raise PdserveError(f"the cluster at {args.target} is unavailable: {exc.details}") from None
    return 0


def _remote_prompt(prompt: str, chat: bool) -> dict[str, Any]:
    """The prompt keyword of a client call: the text, or (``--chat``) one user message, which the
    serving worker renders with the model's chat template."""
    return {"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt}


def _stream_remote(client: Client, prompt: dict[str, Any], sampling: dict[str, Any]) -> int:
    """Print one completion from the cluster as it streams; finish reason and usage go to stderr."""
    last = None
    stream = client.generate_stream(**prompt, **sampling)
    with contextlib.closing(stream):  # close() cancels the call (Ctrl-C, errors while printing)
        for chunk in stream:
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
            last = chunk
    sys.stdout.write("\n")
    if last is not None:
        print(f"[finish_reason={last.finish_reason}]", file=sys.stderr)
        if last.usage is not None:
            usage = last.usage
            print(f"[usage: prompt_tokens={usage.prompt_tokens} completion_tokens={usage.completion_tokens} "
                  f"cached_prompt_tokens={usage.cached_prompt_tokens}]", file=sys.stderr)
    return 0


def _status(args: argparse.Namespace) -> int:
    """``status --target``: the router's view of the cluster, a line per worker (what sizing the pools needs)."""
    from pdserve.client import Client, UnavailableError

    if not args.timeout > 0:
        raise PdserveError(f"--timeout must be > 0 seconds, got {args.timeout:g}")
    try:
        with Client(args.target, timeout=args.timeout) as client:
            status = client.cluster_status()
    except UnavailableError as exc:
        raise PdserveError(f"no router answered at {args.target} ({exc.details})") from None
    if args.json:
        print(json.dumps(dataclasses.asdict(status)))
        return 0
    healthy = sum(w.healthy for w in status.workers)
    print(f"{status.model} ({status.mode}): {healthy}/{len(status.workers)} workers healthy, "
          f"{status.requests_in_flight} requests in flight")
    header = ("worker", "role", "address", "healthy", "running", "waiting", "kv_usage", "queued_prefill_tokens",
              "restarts", "last_recovery_s")
    rows = [(w.worker_id, w.role, w.address, "yes" if w.healthy else "NO", str(w.running_requests),
             str(w.waiting_requests), f"{w.kv_usage:.2f}", str(w.queued_prefill_tokens), str(w.restarts),
             f"{w.last_recovery_s:.1f}" if w.restarts else "-") for w in status.workers]
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    if status.planner is not None:
        print(planner_line(status.planner))
    return 0


def planner_line(planner: PlannerStatus) -> str:
    """``pdserve status``'s line about the online planner's last round."""
    if planner.status != "ok":
        return f"planner ({planner.mode}): {planner.status}"
    goodputs = ", ".join(f"{p.config} {p.goodput_per_gpu:.3g}" for p in planner.predictions)
    line = (f"planner ({planner.mode}): recommends {planner.recommended} (now {planner.current}); "
            f"predicted goodput per GPU: {goodputs}")
    return line + (f"; apply: {planner.apply_status}" if planner.apply_status else "")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "generate":
            return _generate(args)
        if args.command == "serve":
            return run_serve(args)
        if args.command == "status":
            return _status(args)
        if args.command == "scale":
            return _scale(args)
        if args.command == "switch":
            return _switch(args)
        if args.command == "profile":
            return run_profile(args)
        if args.command == "plan":
            return run_plan(args)
    except PdserveError as exc:
        print(f"pdserve: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. the router's port is taken
        print(f"pdserve: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pdserve: interrupted", file=sys.stderr)
        return 130
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
