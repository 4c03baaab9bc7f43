"""Starting jobs on many processes and nodes: the deepspeed launcher, SLURM batch submission."""
