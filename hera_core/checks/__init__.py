"""Checks that run on the device: is the SLM's draft of a step usable, or must the step escalate?

- `sandbox`: runs model-written code in an isolated child process (limits, timeout, no network).
- `drafts`: cheap checks of one draft (its program runs and prints, its answer parses, the
  prompt's docstring examples pass) and the output-side features of the second-stage predictor.

Live path: imported by routing; imports nothing above the backends.
"""
