"""Runnable demos and toy tasks: the CPU demo, the InstructGPT pipeline, digit tasks, toy preferences."""
