"""Launcher for the `distill` job: ``deepspeed --module toolkit.launchers.distill --ds_config X.json --config job.yaml``.

All logic lives in the recipe; this module only hands over the command line.
"""
from toolkit.jobs import launcher_main

if __name__ == "__main__":
    launcher_main("distill")
