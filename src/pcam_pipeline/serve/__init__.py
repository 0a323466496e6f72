"""`pcam serve`: the exported ONNX model behind the Open Inference Protocol (KServe V2 over
HTTP/REST), with batching of concurrent requests, Prometheus metrics, limits on what a request
may hold, and a web page. Imports neither torch nor DVC: the serving image holds ONNX Runtime and
this package only (docs/serving.md)."""
