"""Metrics records as TensorBoard scalars (``loop --tensorboard DIR``), through PyTorch's writer."""

from __future__ import annotations

from tcli.errors import UsageError


def check_available() -> None:
    """Fail before the run starts when the tensorboard package is missing."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        raise UsageError("--tensorboard needs the tensorboard package: pip install tensorboard")


class TensorBoardSink:
    """Every numeric field of a metrics record becomes the scalar ``kind/field`` at its step."""

    def __init__(self, log_dir: str):
        check_available()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=log_dir)

    def write(self, records: list[dict]) -> None:
        for rec in records:
            kind, step = rec.get("kind", "metrics"), int(rec.get("step", 0))
            for key, value in rec.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                    self.writer.add_scalar(f"{kind}/{key}", value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
