"""The driver's side of Ray: join a cluster or start a local one, and what it refuses before
anything starts (an --address where no Ray cluster answers, GPUs this machine lacks, a local
cluster that can never place a worker)."""

from __future__ import annotations

import os
import re
import socket
import sys

from ..config import ConfigError

_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # + empty SETTINGS


def check_reachable(address: str, timeout: float = 5) -> None:
    """Fail in seconds where no Ray cluster answers at HOST:PORT: Ray itself retries for many
    minutes, even against a server of another kind. Ray's GCS speaks gRPC, so sent the HTTP/2
    connection preface it answers with a SETTINGS frame; anything else is not Ray."""
    m = re.fullmatch(r"([\w.\-]+):(\d+)", address.strip())
    if not m:
        return  # auto, ray://...: Ray reports those itself
    try:
        with socket.create_connection((m.group(1), int(m.group(2))), timeout=timeout) as sock:
            if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
                return  # a TLS handshake comes first: leave the rest to Ray
            sock.sendall(_HTTP2_PREFACE)
            head = b""
            while len(head) < 9:
                chunk = sock.recv(9 - len(head))
                if not chunk:
                    break
                head += chunk
    except OSError as exc:
        raise ConfigError(f"--address: no Ray cluster answers at {address} ({exc.strerror or exc})") from None
    if len(head) < 9 or head[3] != 0x04:
        raise ConfigError(
            f"--address: {address} answers, but not as a Ray cluster (it replied {head[:16]!r} to a "
            "gRPC greeting); give the head node's address (`ray start --head` prints it, port 6379 by default)"
        )


def check_local_gpus(config) -> None:
    """A local cluster has this machine's GPUs only: asking workers for more is an error,
    found before Ray starts."""
    ex = config.execution
    if ex.gpus_per_worker > 0:
        import torch

        have = torch.cuda.device_count()
        if ex.gpus_per_worker > have:
            raise ConfigError(
                f"execution.gpus_per_worker: {ex.gpus_per_worker:g} GPU per worker, but this machine has "
                f"{have:g}; use 0 to run on the CPU, or join a GPU cluster with --address"
            )


def connect(address: str | None, config) -> bool:
    """Join `address`, or start a local Ray big enough for every worker; True if we started it."""
    if not address and "ray" not in sys.modules:
        # A local cluster serves this machine only: keep Ray on the loopback interface (as Ray
        # does on macOS and Windows) rather than on the machine's network address. Ray reads
        # this when it is imported.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        # A new local cluster turns Ray's token authentication on by default and warns at every
        # start that it did ("Set RAY_AUTH_MODE=disabled to opt out"); asking for it explicitly
        # keeps it on without the warning (ray._private.authentication.authentication_token_setup:
        # "Mode set explicitly; respect it without warning"). Ray reads this when it is imported,
        # so a choice of the user's (RAY_AUTH_MODE set) stands.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray

    if ray.is_initialized():  # e.g. a test or a notebook that already connected
        return False
    if address:
        try:
            ray.init(address=address, log_to_driver=False)
        except ConnectionError as exc:
            raise ConfigError(f"--address: cannot join a Ray cluster at {address!r} ({exc})") from None
    else:
        ex = config.execution
        need = ex.workers * ex.cpus_per_worker  # never fewer CPUs than the workers ask for
        ray.init(num_cpus=max(os.cpu_count() or 1, int(need + 0.999)), include_dashboard=False, log_to_driver=False)
    return True


def check_resources(config, local: bool) -> None:
    """Print what the cluster has; a local cluster that can never place a worker is an error."""
    import ray

    ex = config.execution
    res = ray.cluster_resources()
    gpus, cpus = res.get("GPU", 0), res.get("CPU", 0)
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    print(
        f"ray: {nodes} node(s), {cpus:g} CPUs, {gpus:g} GPUs; "
        f"{ex.workers} worker(s) per model with {ex.cpus_per_worker:g} CPU / {ex.gpus_per_worker:g} GPU each"
    )
    if ex.gpus_per_worker > gpus:
        if local:
            raise ConfigError(
                f"execution.gpus_per_worker: {ex.gpus_per_worker:g} GPU per worker, but this machine has "
                f"{gpus:g}; use 0 to run on the CPU, or join a GPU cluster with --address"
            )
        print(
            "ray: not enough GPUs in the cluster yet: the workers wait until the autoscaler adds GPU nodes "
            f"(up to execution.placement_timeout_s = {ex.placement_timeout_s:g} s)"
        )
