"""Launcher entry modules, one per job, for the deepspeed launcher in any folder:

    deepspeed --module toolkit.launchers.distill --ds_config zero2_bf16.json --config job.yaml [key=value ...]

They do what the checkout's ``launchers/<job>.py`` scripts do (``toolkit.jobs.launcher_main``),
but ship inside the package, so an installed toolkit needs no checkout. ``python -m
toolkit.launchers.<job>``, ``torchrun -m`` and ``srun python -m`` start them too.
"""

#: job name -> module in this package (the same names as the checkout's launchers/ scripts).
MODULES = {"teacher": "train_teacher", "distill": "distill", "finetune": "finetune", "eval": "evaluate",
           "pipeline": "pipeline"}
