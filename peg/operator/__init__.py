"""The pipeline operator: one EmbeddingPipeline custom resource runs a whole peg pipeline.

`model` (spec/status models), `crd` (the generated CRD), `reconcile` (pure decisions),
`api` (the Kubernetes calls the controller makes), `handlers` (kopf wiring).
"""
