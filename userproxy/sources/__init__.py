"""Where Services and endpoints come from: manifest files (`manifests.py`), the API server
(`kube.py`) or Python code (`UserProxy.apply`), all through the `ObjectRouter` (`router.py`),
which converts objects and calls the `SourceSink` handlers (`handlers.py`) of the provider.
A new source is a module here that feeds the router."""
