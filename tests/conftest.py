"""Shared test plumbing: `report(line)` collects measurements that tests print for a reader (not
assertions); they appear once, at the end of the run, instead of among pytest's progress dots."""
import pytest

LINES = []


@pytest.fixture
def report():
    return LINES.append


def pytest_terminal_summary(terminalreporter):
    if LINES:
        terminalreporter.section("measurements")
        for line in LINES:
            terminalreporter.write_line(line)


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Micro models are dispatch-bound: one thread is as fast, and immune to the stalls a two-thread
    pool suffers when another process shares a two-core machine."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run_scripts(script, argvs, cwd, timeout=120):
    """subprocess results of `python script *argv` for each argv, four at a time: each process pays
    for importing torch, so a few side by side keep two cores busy without thrashing them."""
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor
    run = lambda argv: subprocess.run([sys.executable, script, *argv], cwd=cwd, capture_output=True, text=True,  # noqa: E731
                                      timeout=timeout)
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(run, argvs))
