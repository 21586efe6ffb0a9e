"""Countdown chains: an embedded task whose reward hangs on one early choice (see task.py).
Importing the package registers the ``countdown`` verifier."""

from examples.countdown import verify as _verify  # noqa: F401  (registers "countdown")
