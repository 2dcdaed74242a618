"""Benchmarks: `python -m bench` runs every module here that defines ``main(argv)``; `python -m bench NAME` runs one."""
