"""``toolkit plan`` and the checks every job runs before it loads a model.

* :func:`preflight` ``(job, cfg)``: called at the top of each recipe's setup; raises one
  :class:`~toolkit.errors.ConfigError` naming the field and file for a bad config (DeepSpeed
  JSON keys and types, the batch over the ranks, model shapes from ``config.json`` at full
  size on the meta device, layer ranges, relation heads, vocabularies, sequence length).
* :func:`make_plan` / :func:`render`: the same checks for a given cluster shape, plus the
  parameters, memory per GPU, tokens and step time of the job (docs/PLAN.md).
"""
from toolkit.plan.checks import JobFacts, inspect_job, preflight
from toolkit.plan.estimate import Hardware, MemoryPlan, estimate_memory, step_flops, step_seconds
from toolkit.plan.report import Plan, make_plan, render

__all__ = ["JobFacts", "inspect_job", "preflight", "Hardware", "MemoryPlan", "estimate_memory", "step_flops",
           "step_seconds", "Plan", "make_plan", "render"]
