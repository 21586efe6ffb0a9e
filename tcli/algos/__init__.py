"""Numeric algorithms on whole groups: the P2T prefix tree and the advantage estimators."""
