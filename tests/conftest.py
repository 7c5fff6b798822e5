"""Test configuration: Triton's interpreter for the GPU kernel's tests, one torch thread, shared fixtures.

The tiny models and inputs live in `tests.helpers.models`; import them from there.
"""

from __future__ import annotations

import os

# Without a GPU, the Triton kernel (chunked_decomp.backends.triton) runs in Triton's interpreter; the variable
# is read when the kernel is defined, so it is set before anything imports it. It changes nothing else.
os.environ.setdefault("TRITON_INTERPRET", "1")

from collections.abc import Callable  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.helpers.models import (  # noqa: E402
    make_tiny_model,
    tiny_gpt2,
    tiny_llama,
    tiny_mistral,
    tiny_qwen2,
)

# Optional groups: tests that need an optional part (the C++ kernel, Triton) skip where it is missing; with
# CHUNKED_DECOMP_REQUIRE_OPTIONAL=1 (CI) a group whose every test skipped fails the run instead of passing quietly.
OPTIONAL_GROUPS = {"needs_cpu_kernel": "the fused C++ kernel", "needs_triton": "Triton"}
_GROUP_RUNS: dict[str, list[int]] = {name: [0, 0] for name in OPTIONAL_GROUPS}  # [ran, skipped]


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    for name, counts in _GROUP_RUNS.items():
        if name not in report.keywords:
            continue
        if report.skipped:
            counts[1] += 1
        elif report.when == "call":
            counts[0] += 1


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.environ.get("CHUNKED_DECOMP_REQUIRE_OPTIONAL") != "1":
        return
    missing = [OPTIONAL_GROUPS[n] for n, (ran, skipped) in _GROUP_RUNS.items() if skipped and not ran]
    if missing:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(
                f"CHUNKED_DECOMP_REQUIRE_OPTIONAL=1: every test of {', '.join(missing)} skipped; "
                "install the optional group (pip install -e '.[dev]') or fix its build",
                red=True,
            )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_configure(config: pytest.Config) -> None:
    for name, what in OPTIONAL_GROUPS.items():
        config.addinivalue_line("markers", f"{name}: needs {what} (an optional part; CI requires it)")
    # The tiny models are dominated by thread start-up: one thread is ~10x faster on a busy 2-core machine.
    # Setting OMP_NUM_THREADS keeps torch's own choice (e.g. for the slow tests on the real model).
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_factory() -> Callable[..., torch.nn.Module]:
    return make_tiny_model


@pytest.fixture(scope="module")
def llama_model() -> torch.nn.Module:
    return tiny_llama()


@pytest.fixture(scope="module")
def qwen2_model() -> torch.nn.Module:
    return tiny_qwen2()


@pytest.fixture(scope="module")
def gpt2_model() -> torch.nn.Module:
    return tiny_gpt2()


@pytest.fixture(scope="module")
def mistral_model() -> torch.nn.Module:
    return tiny_mistral()
