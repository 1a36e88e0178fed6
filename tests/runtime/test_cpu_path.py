"""The CPU path for megatron-core: device redirection, the CPU RNG tracker, version check, the rank launcher."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_patch.errors import WorkerError
from megatron_patch.runtime import run_on_local_ranks
from megatron_patch.runtime.cpu import CPURNGStatesTracker


def test_rng_tracker_fork_restores_outer_stream_and_continues_its_own():
    tracker = CPURNGStatesTracker()
    tracker.add("model-parallel-rng", 123)
    torch.manual_seed(0)
    outer_state = torch.get_rng_state()
    with tracker.fork():
        first = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), outer_state)  # the default stream did not move
    with tracker.fork():
        second = torch.rand(4)
    assert torch.equal(first, torch.rand(4, generator=torch.Generator().manual_seed(123)))  # seeded as asked
    assert not torch.equal(first, second)  # the forked stream continues where it stopped
    with pytest.raises(ValueError, match="already exists"):
        tracker.add("other", 123)
    with pytest.raises(KeyError):
        with tracker.fork("missing"):
            pass


# CUDA requests as megatron-core makes them (run below as if they were its code).
_CUDA_REQUESTS = """
made = [
    torch.zeros(2, device="cuda"),
    torch.ones(2, device=torch.cuda.current_device()),
    torch.empty(2, device=torch.device("cuda", 0)),
    torch.arange(3).cuda(),
    torch.arange(3).to("cuda"),
    torch.arange(3).to(device="cuda:0"),
    torch.zeros(2, pin_memory=True),
    next(torch.nn.Linear(2, 2).cuda().parameters()),  # torch's own code moving tensors on megatron-core's behalf
]
torch.cuda.synchronize()
devices = [t.device.type for t in made]
"""


def _run_as(module_name: str, source: str) -> dict:
    """Execute ``source`` with ``module_name`` as its module (what the CPU path looks at to decide who asked)."""
    scope = {"__name__": module_name, "torch": torch}
    exec(compile(source, f"<{module_name}>", "exec"), scope)
    return scope


def _refused(module_name: str, source: str) -> bool:
    try:
        _run_as(module_name, source)
    except (RuntimeError, AssertionError):  # what torch raises for CUDA requests on a machine without a driver
        return True
    return False


def _cuda_requests_by_caller():
    from megatron_patch.runtime import disable_cpu_path, enable_cpu_path

    assert enable_cpu_path() is True
    by_megatron_core = _run_as("megatron.core.some_module", _CUDA_REQUESTS)["devices"]
    others = {
        name: [_refused(name, request) for request in (
            "torch.zeros(2, device='cuda')", "torch.arange(3).cuda()", "torch.cuda.current_device()",
            "torch.cuda.synchronize()", "torch.nn.Linear(2, 2).cuda()")]
        for name in ("transformers.modeling_utils", "__main__", "megatron_patch.training.loop")
    }
    types = [_run_as(name, "spelled = torch.zeros(2).type()")["spelled"]
             for name in ("megatron.core.optimizer.clip_grads", "transformers.modeling_utils")]
    disable_cpu_path()
    after = _refused("megatron.core.some_module", "torch.zeros(2, device='cuda')")
    return by_megatron_core, others, types, after


def test_cuda_requests_are_redirected_for_megatron_core_only_and_until_disabled():
    if torch.cuda.is_available():
        pytest.skip("the CPU path is inactive on a CUDA machine")
    by_megatron_core, others, types, after = run_on_local_ranks(_cuda_requests_by_caller, 1)[0]
    assert by_megatron_core == ["cpu"] * 8
    # transformers, users and this package see torch as it is: CUDA requests fail on a machine without CUDA.
    assert others == {name: [True] * 5 for name in others}
    assert types == ["torch.cuda.FloatTensor", "torch.FloatTensor"]
    assert after  # disable_cpu_path (destroy_distributed) leaves nothing behind


def _type_strings_and_seeded_streams():
    from megatron.core.tensor_parallel import random as mcore_random

    from megatron_patch.runtime import init_distributed

    init_distributed(1, 1, seed=77)
    ours = torch.zeros(2).type()
    # The same call made by megatron-core's code (its optimizer asserts 'torch.cuda.FloatTensor').
    as_mcore = {"__name__": "megatron.core.optimizer.clip_grads", "torch": torch}
    exec(compile("spelled = torch.zeros(2).type()", "<megatron-core>", "exec"), as_mcore)
    from transformers import PreTrainedModel  # noqa: F401  (a third-party import under the CPU path)

    tracker = mcore_random.get_cuda_rng_tracker()
    with tracker.fork(mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
        model_parallel = torch.rand(3)
    with tracker.fork(mcore_random._DATA_PARALLEL_RNG_TRACKER_NAME):
        data_parallel = torch.rand(3)
    return ours, as_mcore["spelled"], model_parallel, data_parallel


def test_type_rewrite_is_for_megatron_core_only_and_streams_use_its_seeding():
    if torch.cuda.is_available():
        pytest.skip("the CPU path is inactive on a CUDA machine")
    ours, spelled, model_parallel, data_parallel = run_on_local_ranks(_type_strings_and_seeded_streams, 1)[0]
    assert ours == "torch.FloatTensor" and spelled == "torch.cuda.FloatTensor"
    # megatron-core's model_parallel_cuda_manual_seed: data-parallel stream = seed, model-parallel = seed + 2718 + tp.
    assert torch.equal(data_parallel, torch.rand(3, generator=torch.Generator().manual_seed(77)))
    assert torch.equal(model_parallel, torch.rand(3, generator=torch.Generator().manual_seed(77 + 2718)))


def _fail_on_rank_one():
    import os

    from megatron_patch.errors import ConfigError

    if os.environ["RANK"] == "1":
        raise ConfigError("rank one refuses")
    return os.environ["RANK"]


def _bug_on_rank_zero():
    raise ValueError("not a user error")


def test_launcher_reports_the_failing_rank():
    with pytest.raises(WorkerError, match="rank 1 failed: rank one refuses$"):  # a user error: its one line
        run_on_local_ranks(_fail_on_rank_one, 2, timeout=120)
    with pytest.raises(WorkerError, match=r"(?s)rank 0 failed: Traceback .*ValueError: not a user error"):
        run_on_local_ranks(_bug_on_rank_zero, 1, timeout=120)  # anything else: the traceback


def _hang():
    import time

    time.sleep(600)


def test_launcher_times_out_instead_of_hanging():
    with pytest.raises(WorkerError, match="made no progress for"):
        run_on_local_ranks(_hang, 2, timeout=5)


def _busy(seconds):
    import time

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
    return "done"


def test_launcher_waits_for_a_slow_rank_that_works():
    """The timeout is a watchdog on progress (CPU time used), not on the total: 6 s of work outlive timeout=3."""
    assert run_on_local_ranks(_busy, 1, 6.0, timeout=3) == ["done"]


def _start_grandchild_then_hang(pid_file):
    import subprocess
    import time

    child = subprocess.Popen(["sleep", "600"])
    with open(pid_file, "w") as handle:
        handle.write(str(child.pid))
    time.sleep(600)


def test_launcher_stops_what_a_hung_rank_started(tmp_path):
    import psutil

    pid_file = tmp_path / "grandchild.pid"
    with pytest.raises(WorkerError, match="made no progress for"):
        run_on_local_ranks(_start_grandchild_then_hang, 1, str(pid_file), timeout=8)
    pid = int(pid_file.read_text())
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def _write_pid_then_hang(pid_dir):
    import os
    import time

    with open(os.path.join(pid_dir, os.environ["RANK"]), "w") as handle:
        handle.write(str(os.getpid()))
    time.sleep(600)


def test_ranks_die_with_a_killed_launcher(tmp_path):
    """kill -9 of the launching process must not leave its ranks running (issue 13, item 6)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    parent = subprocess.Popen([sys.executable, "-c", (
        "import sys; from tests.runtime.test_cpu_path import _write_pid_then_hang; "
        "from megatron_patch.runtime.launch import run_on_local_ranks; "
        f"run_on_local_ranks(_write_pid_then_hang, 2, {str(tmp_path)!r}, timeout=600)")],
        cwd=str(Path(__file__).resolve().parents[2]), env={**os.environ, "MEGATRON_PATCH_START_METHOD": "spawn"})
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        pids = [int(p.read_text()) for p in tmp_path.iterdir()]
        assert len(pids) == 2
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
    gone, alive = psutil.wait_procs([psutil.Process(p) for p in pids if psutil.pid_exists(p)], timeout=15)
    assert not alive, f"ranks {[p.pid for p in alive]} outlived the launcher"
