#!/usr/bin/env python
"""Launcher for the `pipeline` job.

    deepspeed launchers/pipeline.py --ds_config ds_configs/<file>.json --config <job.yaml> [key=value ...]

An installed toolkit (no checkout) runs the same job with
`deepspeed --module toolkit.launchers.pipeline --ds_config zero2_bf16.json --config <job.yaml>`.
Also runs as a plain `python launchers/pipeline.py ...` (one process) and under torchrun or srun.
All logic lives in the recipe; this file only hands over the command line.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from toolkit.jobs import launcher_main  # noqa: E402

if __name__ == "__main__":
    launcher_main("pipeline")
