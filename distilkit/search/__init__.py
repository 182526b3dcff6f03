"""Compression to a budget (issue #16): the student structure a search may choose
(:mod:`~distilkit.search.structure`: shapes and exact parameter counts, no measurement), what
each structure costs in a runtime (:mod:`~distilkit.search.latency`: a latency table measured
once per model shape, runtime and machine, cached on disk) and the search itself
(:mod:`~distilkit.search.netadapt`). Submodules are imported where they are used, so importing
this package needs neither onnxruntime nor a model."""
