"""Test doubles, fact sets and measurement code shared by tests/ and bench/; not part of the service.

    fake_plane    FakeDataPlane: a real in-memory DataPlaneProtocol without a model (transport tests)
    editing       HashEncoder and ScriptedEditor: an encoder and an editor without models
    editlog       helpers that build log entries
    facts         20 hand-written counterfactual edits for the SmolLM2 tests and benchmarks
    hook_layers   the hook-layer sweep behind the default layer (run: bench/hook_layers.py)
    scope_eval    the scope detector's evaluation on CounterFact/zsRE (run: bench/scope_detection.py)
"""
