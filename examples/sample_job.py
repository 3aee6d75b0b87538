"""`make run`: a broker on SQLite that starts local agents on demand, and a real job.

Starts ``python -m gpubroker.broker`` as a child process with its default ``local`` provider: no
agent runs until work arrives, then the autoscaler starts ``gpu_agent`` processes (as it would start
GPU VMs on Google Cloud) and stops them when they are idle. Submits several workloads, one large
tensor and a thousand tiny tasks through ``Client.map``; uploads two models built here (a small
CNN and a transformer encoder block), runs them remotely against local torch, batches 64 requests
and uploads the CNN again to show nothing is re-sent; prints the results, the billing report and
the machine-cost report, then shuts the broker down. Data lives in ./gpubroker-data.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from torch import nn

from gpubroker import Client, TaskResult

DATA = Path("gpubroker-data")
API_KEY = "demo-key"
console = Console()


def main() -> int:
    """Runs the demo; returns the exit code."""
    DATA.mkdir(exist_ok=True)
    # The broker below and the billing commands after it both read their data from here.
    os.environ["GPUBROKER_DATA_DIR"] = str(DATA.absolute())
    port_file = DATA / "broker.port"
    port_file.unlink(missing_ok=True)
    broker = _spawn(
        "gpubroker.broker", "--listen", "127.0.0.1:0", "--port-file", str(port_file),
        "--api-keys", f"{API_KEY}=demo", "--migrate", "--data-dir", str(DATA),
        log=DATA / "broker.log",
    )  # fmt: skip
    try:
        address = f"127.0.0.1:{_wait_for_port(port_file, broker)}"
        console.print(f"broker listening on [bold]{address}[/] (log: {DATA / 'broker.log'})")
        console.print("no agent runs yet: the broker starts local agents when work arrives")
        with Client(address, API_KEY) as client:
            _run_job(client)
            _run_many(client)
            _run_models(client)
    finally:
        console.print(f"broker stopped (exit code {_stop(broker)}); its agents with it")
    console.rule("billing report")
    subprocess.run([sys.executable, "-m", "gpubroker.billing", "report"], check=True)
    console.rule("machine cost vs billed compute")
    subprocess.run([sys.executable, "-m", "gpubroker.billing", "overhead"], check=True)
    return 0


def _run_many(client: Client) -> None:
    """A thousand tiny tasks on one call: each is a full, billed task."""
    started = time.perf_counter()
    items = [[torch.tensor([float(i)]), torch.tensor([0.5])] for i in range(1000)]
    total = sum(r.output.item() for r in client.map("add", items))
    elapsed = time.perf_counter() - started
    assert total == sum(i + 0.5 for i in range(1000))
    console.print(f"map: 1,000 tiny tasks in {elapsed:.2f} s ({1000 / elapsed:,.0f} tasks/s)")


def _run_models(client: Client) -> None:
    """Your own models: exported here, uploaded once, run remotely, batched on the agent."""
    torch.manual_seed(0)
    cnn = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(32, 10),
    ).eval()  # fmt: skip
    block = nn.TransformerEncoderLayer(64, 4, 128, batch_first=True).eval()
    images, tokens = torch.randn(8, 3, 32, 32), torch.randn(4, 16, 64)

    table = Table("model", "bytes uploaded", "load s (not billed)", "compute s", "max |diff|")
    for name, module, x in (("small CNN", cnn, images), ("transformer block", block, tokens)):
        before = client.model_bytes_sent
        model = client.upload_model(
            module, (x,), name=name, batch_dim_varies=True, max_batch_size=64
        )
        result = client.run(model, [x], timeout=300)
        with torch.enable_grad():  # the plain (not fused) path: the ATen ops the export holds
            expected = module(x).detach()
        diff = (result.output - expected).abs().max().item()
        assert diff < 1e-4, f"{name}: remote and local differ by {diff}"
        table.add_row(
            name,
            f"{client.model_bytes_sent - before:,}",
            f"{result.model_load_seconds:.3f}",
            f"{result.compute_seconds:.4f}",
            f"{diff:.1e}",
        )
    before = client.model_bytes_sent
    model = client.upload_model(
        cnn, (images,), name="small CNN", batch_dim_varies=True, max_batch_size=64
    )
    table.add_row(
        "small CNN, uploaded again", f"{client.model_bytes_sent - before:,}", "", "", "same id"
    )
    console.print(table)

    singles = [[images[i % 8 : i % 8 + 1]] for i in range(64)]
    results = list(client.map(model, singles))  # one call, so they reach the agent together
    batched = sum(r.batch_tasks > 1 for r in results)
    billed = sum(r.compute_seconds for r in results)
    console.print(
        f"64 single-image requests: {batched} ran in shared batches "
        f"(largest {max(r.batch_tasks for r in results)} tasks), {billed:.4f} s billed in all"
    )


def _run_job(client: Client) -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(2048, 2048, generator=gen), torch.randn(2048, 1024, generator=gen)
    spd = torch.randn(64, 64, generator=gen, dtype=torch.float64)
    spd = spd @ spd.T + 64 * torch.eye(64, dtype=torch.float64)
    image, kernel = (
        torch.randn(8, 3, 64, 64, generator=gen),
        torch.randn(16, 3, 3, 3, generator=gen),
    )
    signal_ = torch.randn(16, 4096, generator=gen)
    big = torch.randn(64 * 1024 * 1024 // 4, generator=gen)  # 64 MiB
    jobs = {
        "matmul 2048x2048 @ 2048x1024": (client.submit("matmul", [a, b]), a @ b),
        "conv2d 8x3x64x64": (
            client.submit("conv2d", [image, kernel], padding=1),
            torch.nn.functional.conv2d(image, kernel, padding=1),
        ),
        "fft 16x4096": (client.submit("fft", [signal_]), torch.fft.fft(signal_)),
        "linalg.solve 64x64": (
            client.submit("linalg.solve", [spd, spd[:, :4]]),
            torch.linalg.solve(spd, spd[:, :4]),
        ),
        "sum of 64 MiB": (client.submit("sum", [big]), big.sum()),
        "echo of 64 MiB": (client.submit("echo", [big]), big),
    }
    table = Table("task", "state", "compute s", "matches local torch")
    with Progress(console=console, transient=True) as progress:
        bar = progress.add_task("running sample job", total=len(jobs))
        for name, (handle, expected) in jobs.items():
            result = handle.result(timeout=300)
            table.add_row(
                name, "succeeded", f"{result.compute_seconds:.4f}", _check(result, expected)
            )
            progress.advance(bar)
    console.print(table)


def _check(result: TaskResult, expected: torch.Tensor) -> str:
    output = result.output
    assert isinstance(output, torch.Tensor)
    same = torch.allclose(output, expected, rtol=1e-4, atol=1e-3)
    return "[green]yes[/]" if same else "[red]NO[/]"


def _spawn(module: str, *args: str, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", module, *args], stdout=out, stderr=subprocess.STDOUT
        )


def _wait_for_port(port_file: Path, process: subprocess.Popen[bytes]) -> int:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if port_file.exists() and port_file.read_text().strip():
            return int(port_file.read_text())
        if process.poll() is not None:
            raise SystemExit(f"broker exited with {process.returncode}; see {DATA / 'broker.log'}")
        time.sleep(0.05)
    raise SystemExit("broker did not start within 60 s")


def _stop(process: subprocess.Popen[bytes]) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
