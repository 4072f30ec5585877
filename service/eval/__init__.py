"""Evaluation harness: CounterFact / zsRE / KnowEdit metrics through the service's public gRPC API,
sequential and single editing protocols, an in-place ROME baseline, and a report (`editserve eval`)."""
