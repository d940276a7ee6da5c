"""Offline tools: tasks, the agent harness, profiling, training, evaluation, the demo.

- `workloads` (task families with scorers), `harness` (the multi-step agent), `sandbox` (where
  model-written code runs), `profiling` (`hera profile`), `training` (`hera train`),
  `evaluation` (`hera eval`), `similarity` (the paper's embedding label), `demo` (`hera demo`).

Nothing on the live path (native, backends, routing, serving) imports this package.
"""
