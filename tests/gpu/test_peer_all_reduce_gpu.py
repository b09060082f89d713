"""The one-shot peer all-reduce against torch's sum: ranks on threads of one process, each on its own
stream, with tensors of changing sizes and dtypes, eagerly and replayed from CUDA graphs. With one GPU
both ranks share it (the kernels' flags and epochs are what is tested, not NVLink); with two, the ranks
sit on cuda:0 and cuda:1 as tensor-parallel ranks do."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import torch

from pdserve.engine.peer_all_reduce import PeerAllReduce

pytestmark = pytest.mark.gpu

SIZES = (1, 7, 1024, 4096, 4097, 40_000, 131_072, 786_433, 2_000_000)  # the last two: the wide grid (> 1 MiB)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _devices(world: int) -> list[torch.device]:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    count = torch.cuda.device_count()
    return [torch.device("cuda", rank % count) for rank in range(world)]


def _inputs(rank: int, call: int, size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 * call + rank)
    return torch.randn(size, generator=generator).to(dtype=dtype, device=device)


def _on_ranks(world: int, work: Callable[[int], None]) -> None:
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        try:
            work(rank)
        except BaseException as exc:  # noqa: BLE001 (re-raised in the caller)
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=40)
        assert not thread.is_alive(), "a rank hung in the peer all-reduce"
    if errors:
        raise errors[0]


def _expected(world: int, call: int, size: int, dtype: torch.dtype) -> torch.Tensor:
    total = sum(_inputs(rank, call, size, dtype, torch.device("cpu")).float() for rank in range(world))
    return total.to(dtype)  # type: ignore[union-attr]


@pytest.mark.parametrize(("world", "max_bytes"), [(2, 131_072 * 4), (3, 131_072 * 4), (2, 8 << 20)])
def test_eager_calls_of_changing_sizes_and_dtypes_sum_over_the_ranks(world: int, max_bytes: int) -> None:
    """With 8 MiB of staging, tensors above 1 MiB take the wide grid, between calls of the small one."""
    devices = _devices(world)
    peer = PeerAllReduce.build(devices, max_bytes)
    assert peer is not None
    calls = [(size, dtype) for dtype in DTYPES for size in SIZES if size * dtype.itemsize <= peer.max_bytes]
    results: dict[int, list[torch.Tensor]] = {}
    ready = threading.Barrier(world, timeout=120)

    def work(rank: int) -> None:
        with torch.cuda.device(devices[rank]), torch.cuda.stream(torch.cuda.Stream(devices[rank])):
            # every rank's inputs exist before the first call: with ranks sharing a GPU, no rank may
            # allocate while another's kernel spins
            outs = [_inputs(rank, call, size, dtype, devices[rank]) for call, (size, dtype) in enumerate(calls)]
            torch.cuda.current_stream().synchronize()
            ready.wait()
            for tensor in outs:
                assert peer.fits(tensor)
                peer.all_reduce(rank, tensor)
            torch.cuda.current_stream().synchronize()
            results[rank] = [out.cpu() for out in outs]

    _on_ranks(world, work)
    for call, (size, dtype) in enumerate(calls):
        expected = _expected(world, call, size, dtype)
        for rank in range(world):
            got = results[rank][call]
            # every rank sums in rank order, so all get the same bits; float32 sums match torch's closely
            assert torch.equal(got, results[0][call])
            torch.testing.assert_close(got, expected, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-5)


def test_graph_replays_advance_the_epochs_and_sum_fresh_inputs() -> None:
    world, size, replays = 2, 4096, 20
    devices = _devices(world)  # (the test allocates nothing while a rank's kernel may spin: see above)
    peer = PeerAllReduce.build(devices, 1 << 20, norm_widths=(1024,))
    assert peer is not None
    results: dict[int, list[torch.Tensor]] = {}
    normed: dict[int, list[torch.Tensor]] = {}
    captured = threading.Barrier(world, timeout=120)
    first_residual = _inputs(99, 0, size, torch.float32, torch.device("cpu")).view(4, 1024)
    weight = torch.linspace(0.5, 1.5, 1024)

    def work(rank: int) -> None:
        device = devices[rank]
        with torch.cuda.device(device):
            stream = torch.cuda.Stream(device)
            static = torch.zeros(size, device=device)
            out = torch.empty_like(static)
            with torch.cuda.stream(stream):
                buffer = static.clone()
                inputs = [_inputs(rank, call, size, torch.float32, device) for call in range(replays)]
                outs = torch.empty(replays, size, device=device)
                # the fused all-reduce + residual add + RMSNorm in the same graph, after the plain one
                rows, residual, residual0 = torch.zeros(4, 1024, device=device), torch.zeros(4, 1024, device=device), \
                    first_residual.to(device)
                norm_weight, norm_outs = weight.to(device), torch.empty(replays, 4, 1024, device=device)
                stream.synchronize()
                captured.wait()
                peer.all_reduce(rank, buffer)  # an eager call before capture, as the engine's warm-up does
                stream.synchronize()
                captured.wait()  # both warmed up, neither capturing yet
                graph = torch.cuda.CUDAGraph()
                graph.capture_begin(capture_error_mode="thread_local")
                try:
                    buffer.copy_(static)
                    peer.all_reduce(rank, buffer)
                    out.copy_(buffer)
                    rows.copy_(static.view(4, 1024))
                    residual.copy_(residual0)
                    peer.all_reduce_rmsnorm(rank, rows, residual, norm_weight, 1e-6)
                finally:
                    graph.capture_end()
                captured.wait()
                for call in range(replays):
                    static.copy_(inputs[call])
                    graph.replay()
                    outs[call].copy_(out)
                    norm_outs[call].copy_(rows)
                stream.synchronize()
            results[rank] = list(outs.cpu())
            normed[rank] = list(norm_outs.cpu())

    _on_ranks(world, work)
    for call in range(replays):
        expected = _expected(world, call, size, torch.float32)
        partials = [_inputs(rank, call, size, torch.float32, devices[0]).view(4, 1024) for rank in range(world)]
        expected_norm, _ = _fused_reference(partials, first_residual.to(devices[0]), weight.to(devices[0]), 1e-6)
        for rank in range(world):
            torch.testing.assert_close(results[rank][call], expected, rtol=1e-5, atol=1e-5)
            assert torch.equal(normed[rank][call], expected_norm.cpu())


def test_what_fits_and_what_goes_to_nccl() -> None:
    devices = _devices(2)
    assert PeerAllReduce.build(devices, 0) is None
    peer = PeerAllReduce.build(devices, 4096)
    assert peer is not None
    assert peer.fits(torch.zeros(1024, device=devices[0]))
    assert not peer.fits(torch.zeros(1025, device=devices[0]))  # more bytes than a staging half
    assert not peer.fits(torch.zeros(64, 2, device=devices[0]).t())  # not contiguous
    assert not peer.fits(torch.zeros(8, dtype=torch.int32, device=devices[0]))  # not a summed dtype
    rows = torch.zeros(2, 256, device=devices[0])
    assert not peer.fits_rows(rows, rows)  # no norm width loaded
    normed = PeerAllReduce.build(devices, 4096, norm_widths=(256,))
    assert normed is not None and normed.fits_rows(rows, rows.clone())
    assert not normed.fits_rows(torch.zeros(2, 128, device=devices[0]), torch.zeros(2, 128, device=devices[0]))
    assert not normed.fits_rows(torch.zeros(8, 256, device=devices[0]), torch.zeros(8, 256, device=devices[0]))
    assert not normed.fits_rows(rows, rows.t().contiguous().t())  # a residual that is not contiguous


NORM_ROWS = (1, 7, 64, 130)
NORM_WIDTHS = (4096, 96)


def _fused_reference(partials: list[torch.Tensor], residual: torch.Tensor, weight: torch.Tensor, eps: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """What the unfused path gives: the peer all-reduce's sum (float32, in rank order, rounded once),
    then the fused residual-add RMSNorm kernel."""
    from pdserve.engine.kernels.rmsnorm import fused_rmsnorm

    total = torch.zeros(partials[0].shape, dtype=torch.float32, device=partials[0].device)
    for partial in partials:
        total += partial.float()
    out, summed = fused_rmsnorm(total.to(partials[0].dtype), weight, eps, residual.clone())  # type: ignore[misc]
    return out, summed


@pytest.mark.parametrize("world", [2, 3])
def test_fused_rmsnorm_gives_the_bits_of_all_reduce_then_norm(world: int) -> None:
    """The all-reduce fused with the residual add and RMSNorm that follow it: every rank gets the bits
    the peer all-reduce followed by the fused norm kernel gives, for several row counts, widths and
    dtypes, with plain all-reduces interleaved (on the small grid the two kernels share the epochs; every
    other plain one takes the wide grid)."""
    devices = _devices(world)
    peer = PeerAllReduce.build(devices, 130 * 4096 * 4, norm_widths=NORM_WIDTHS)
    assert peer is not None
    eps = 1e-5
    # the fused kernel runs on the small grid (its rows up to 1 MiB: a 4,096-wide decode step of 64-128
    # sequences); larger rows go through the all-reduce, then the norm kernel, in the model
    calls = [(rows, width, dtype) for dtype in DTYPES for width in NORM_WIDTHS for rows in NORM_ROWS
             if rows * width * dtype.itemsize <= 1 << 20]
    too_wide = torch.zeros(130, 4096, device=devices[0])
    assert peer.fits(too_wide) and not peer.fits_rows(too_wide, too_wide.clone())
    residuals = [_inputs(99, call, rows * width, dtype, torch.device("cpu")).view(rows, width)
                 for call, (rows, width, dtype) in enumerate(calls)]
    weights = {(width, dtype): (1 + 0.1 * torch.randn(width, generator=torch.Generator().manual_seed(width))).to(dtype)
               for _, width, dtype in calls}
    results: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
    ready = threading.Barrier(world, timeout=120)

    def work(rank: int) -> None:
        device = devices[rank]
        with torch.cuda.device(device), torch.cuda.stream(torch.cuda.Stream(device)):
            partials = [_inputs(rank, call, rows * width, dtype, device).view(rows, width)
                        for call, (rows, width, dtype) in enumerate(calls)]
            streams = [residual.to(device) for residual in residuals]
            norm_weights = {key: weight.to(device) for key, weight in weights.items()}
            # plain all-reduces in between, every other one on the wide grid (above 1 MiB)
            plain = [_inputs(rank, 500 + call, 4096 if call % 2 else 300_000, torch.float32, device)
                     for call in range(len(calls))]
            torch.cuda.current_stream().synchronize()
            ready.wait()
            for call, (_, width, dtype) in enumerate(calls):
                assert peer.fits_rows(partials[call], streams[call])
                peer.all_reduce_rmsnorm(rank, partials[call], streams[call], norm_weights[(width, dtype)], eps)
                peer.all_reduce(rank, plain[call])
            torch.cuda.current_stream().synchronize()
            results[rank] = [(p.cpu(), s.cpu(), q.cpu()) for p, s, q in zip(partials, streams, plain, strict=True)]

    _on_ranks(world, work)
    device = devices[0]
    for call, (rows, width, dtype) in enumerate(calls):
        partials = [_inputs(rank, call, rows * width, dtype, device).view(rows, width) for rank in range(world)]
        out, summed = _fused_reference(partials, residuals[call].to(device), weights[(width, dtype)].to(device), eps)
        for rank in range(world):
            got_out, got_summed, got_plain = results[rank][call]
            assert torch.equal(got_summed, summed.cpu()), (rank, rows, width, dtype)
            assert torch.equal(got_out, out.cpu()), (rank, rows, width, dtype)
            expected_plain = _expected(world, 500 + call, 4096 if call % 2 else 300_000, torch.float32)
            torch.testing.assert_close(got_plain, expected_plain, rtol=1e-5, atol=1e-5)
