"""Wait until SGLang servers generate: ``python -m megatron_ivr.rollout.sglang.wait URL [URL ...]``.

The launchers' node scripts call this before the trainer starts, so that the trainer's first
rollout does not race the servers' start-up. The API key, if any, comes from the
``MEGATRON_IVR_API_KEY`` environment variable (not the command line, which others can read).
Exit status 0 when every server answers ``/health_generate``, 1 on timeout.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from megatron_ivr.rollout.sglang.server import probe


def wait_for_servers(urls: list[str], api_key: str | None = None, timeout_s: float = 1200.0,
                     interval_s: float = 5.0) -> list[str]:
    """Poll every URL until all are ready or ``timeout_s`` passes; returns the ones not ready."""
    pending = [u.rstrip("/") for u in urls]
    deadline = time.monotonic() + timeout_s
    while pending:
        pending = [u for u in pending if not probe(u + "/health_generate", api_key)]
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(interval_s)
    return pending


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("urls", nargs="+")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds (default 1200)")
    args = parser.parse_args(argv)
    start = time.monotonic()
    pending = wait_for_servers(args.urls, os.environ.get("MEGATRON_IVR_API_KEY"), args.timeout)
    if pending:
        print(f"SGLang servers not ready after {args.timeout:.0f}s: {' '.join(pending)}", file=sys.stderr)
        return 1
    print(f"{len(args.urls)} SGLang server(s) ready after {time.monotonic() - start:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
