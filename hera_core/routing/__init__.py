"""Layer 3, routing: the live decision for one agent step, with no HTTP and no offline code.

- `runtime`: `Runtime.complete()` (prefill -> features -> predictor -> policy -> local decode or
  cloud -> ledger row) and `Runtime.passthrough()` for requests that bypass routing.
- `predictor`: the feature schema and the predictor file; kappa(step).
- `policy`: the pure routing rule and overrides (local-only, cloud-only).
- `budget`: cloud spend caps. `ledger`: the SQLite cost ledger.

Sees model backends only through `hera_core.backends.base.Engine` (a contract the tests check).
"""
