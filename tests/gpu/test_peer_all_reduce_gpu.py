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

SIZES = (1, 7, 1024, 4096, 4097, 40_000, 131_072)
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


@pytest.mark.parametrize("world", [2, 3])
def test_eager_calls_of_changing_sizes_and_dtypes_sum_over_the_ranks(world: int) -> None:
    devices = _devices(world)
    peer = PeerAllReduce.build(devices, 131_072 * 4)
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
    peer = PeerAllReduce.build(devices, 1 << 20)
    assert peer is not None
    results: dict[int, list[torch.Tensor]] = {}
    captured = threading.Barrier(world, timeout=120)

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
                finally:
                    graph.capture_end()
                captured.wait()
                for call in range(replays):
                    static.copy_(inputs[call])
                    graph.replay()
                    outs[call].copy_(out)
                stream.synchronize()
            results[rank] = list(outs.cpu())

    _on_ranks(world, work)
    for call in range(replays):
        expected = _expected(world, call, size, torch.float32)
        for rank in range(world):
            torch.testing.assert_close(results[rank][call], expected, rtol=1e-5, atol=1e-5)


def test_what_fits_and_what_goes_to_nccl() -> None:
    devices = _devices(2)
    assert PeerAllReduce.build(devices, 0) is None
    peer = PeerAllReduce.build(devices, 4096)
    assert peer is not None
    assert peer.fits(torch.zeros(1024, device=devices[0]))
    assert not peer.fits(torch.zeros(1025, device=devices[0]))  # more bytes than a staging half
    assert not peer.fits(torch.zeros(64, 2, device=devices[0]).t())  # not contiguous
    assert not peer.fits(torch.zeros(8, dtype=torch.int32, device=devices[0]))  # not a summed dtype
