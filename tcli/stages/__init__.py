"""The pipeline stages as library functions over records (the commands and `loop` call these)."""
