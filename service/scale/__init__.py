"""The same service on Ray Serve: replicas across nodes, scaled on load (optional extra `ray`).

`python -m service.scale` (or `serve run service.scale.deployment:build_app`, or `serve deploy
service/deploy/ray/serve.yaml`) runs the app built by `service.api.app.create_app` as a Serve
ingress deployment: every replica is the whole app with its own engine (queue, batcher,
workers), so a request is batched with the others that Ray's proxy sent to the same replica.

- `deployment`: the replica class, its options (autoscaling, concurrency caps) and the builder.
- `proxy`: middleware run inside Ray's HTTP proxy, so that what the proxy itself answers (a
  replica lost mid-request, Ray's back-pressure) has the service's error shape and status.
- `targets`: each replica's `/metrics` as its own Prometheus target, labelled by replica.

Nothing here is imported by `python -m service`; Ray is needed only for this package.
"""
