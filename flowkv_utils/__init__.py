"""flowkv_utils — the library behind the FlowKV notebooks.

Data flows one way, one module per stage:
    models (load) → capture (prefill + Q/K/V/W_O per layer) → policies/ (scores → keep masks; budgets)
    → cache (ragged compressed cache) → generate (decode) → tasks/, metrics, sweep (tidy tables) → plots
"""

__version__ = "0.1.0"
