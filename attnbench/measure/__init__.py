"""Measuring one configuration: timing and memory (``timing``), the machine probe (``probe``), the
fitted exponents (``fit``), and the worker processes each configuration runs in (``worker``,
``decode_worker``)."""
