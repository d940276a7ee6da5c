"""Layer 3, routing: the live decision for one agent step, with no HTTP and no offline code.

- `runtime`: `Runtime.complete()` / `run_step()` (prefill -> features -> predictor -> step plan ->
  local decode or cloud -> ledger row) and `Runtime.passthrough()` for requests that bypass routing.
- `step`: what one subtask asks (`StepRequest`), the step in flight (`StepRun`), its result.
- `scoring`: the features and the predictor over prefills that come back together (batched).
- `drafting`: the SLM's answer, its draft checked on the device and voted on by samples.
- `booking`: every call as one ledger row; cloud spend held against the budget until booked.
- `plan`: the step plan, one pure function of what is known about a step (local, cloud, draft and
  check, vote, each with its reason); the runtime executes it and `hera eval` replays it.
- `predictor`: the feature schema and the predictor file; kappa(step).
- `policy`: the pure routing rule and overrides (local-only, cloud-only).
- `familiarity`: is this step like the predictor's training tasks?
- `budget`: cloud spend caps. `ledger`: the `CostLedger` protocol and the SQLite ledger;
  `ledger_pg`: the PostgreSQL ledger and budget a fleet shares.
- `traces`, `learning`, `shadow`: learning the served agent from its traffic.

Sees model backends only through `hera_core.backends.base.Engine` (a contract the tests check).
"""
