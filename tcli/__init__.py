"""tcli: RL with verifiable rewards and tree-structured credit assignment, as Unix tools."""

__version__ = "0.1.0"
SCHEMA = "tcli.rollout/1"
SCHEMA_MAJOR = 1
